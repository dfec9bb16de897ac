"""Exports load with plain transformers, in a fresh process that never imported zebra."""

import subprocess
import sys

import pytest
import torch

from zebra.model import ZebraConfig, ZebraForCausalLM, export
from zebra.model.export import save_hf_model
from zebra.utils.files import atomic_dir


def tiny_hybrid():
    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=24,
                      qk_rope_head_dim=8, layer_types=["mla", "mamba", "mla"], mamba_chunk_size=16)
    return ZebraForCausalLM(cfg).eval()


def test_export_loads_in_fresh_process_with_trust_remote_code(tmp_path):
    model = tiny_hybrid()
    out = save_hf_model(model, tmp_path / "model", model_card="# tiny\n")
    ids = torch.randint(0, 101, (2, 11))
    torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
assert not any(k == "zebra" or k.startswith("zebra.") for k in sys.modules), "zebra was imported"
ref = torch.load({str(tmp_path / 'ref.pt')!r})
with torch.no_grad():
    got = m(ref["ids"]).logits
assert torch.equal(got, ref["logits"]), (got - ref["logits"]).abs().max()
gen = m.generate(ref["ids"][:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
assert gen.shape == (2, 7)
print("OK", type(m).__module__)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK transformers_modules" in res.stdout


def test_export_loads_without_remote_code_once_zebra_imported(tmp_path):
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = tiny_hybrid()
    save_hf_model(model, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(loaded) is ZebraForCausalLM
    ids = torch.randint(0, 101, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_atomic_dir_keeps_old_export_on_failure(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("partial")
            raise RuntimeError("crash mid-export")
    assert (target / "keep.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_sources_are_flattened_for_the_remote_code_loader(tmp_path, monkeypatch):
    """zebra/model/ops/x.py lands beside zebra/model's files; imports across the two folders become `from .x`."""
    model, ops = tmp_path / "model", tmp_path / "model" / "ops"
    ops.mkdir(parents=True)
    (model / "__init__.py").write_text("from .layer import Layer\n")
    (model / "layer.py").write_text("from .ops.kernel import k\n\n\ndef f():\n    from .ops.kernel import j\n")
    (model / "shapes.py").write_text("N = 1\n")
    (ops / "__init__.py").write_text("")
    (ops / "kernel.py").write_text("from ..shapes import N\nfrom .util import u\n")
    (ops / "util.py").write_text("u = 0\n")
    monkeypatch.setattr(export, "MODEL_DIR", model)
    monkeypatch.setattr(export, "OPS_DIR", ops)
    got = export.model_sources()
    assert sorted(got) == ["kernel.py", "layer.py", "shapes.py", "util.py"]
    assert got["layer.py"] == "from .kernel import k\n\n\ndef f():\n    from .kernel import j\n"
    assert got["kernel.py"] == "from .shapes import N\nfrom .util import u\n"
    (model / "layer.py").write_text("from .ops import kernel\n")  # would need an ops.py in the export
    with pytest.raises(ValueError, match="from .ops import"):
        export.model_sources()
