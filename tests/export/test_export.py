"""Exports load with plain transformers, in a fresh process that never imported zebra: every way a user loads a
hub model (AutoConfig, AutoTokenizer with and without trust_remote_code, AutoModelForCausalLM, the
text-generation pipeline, lm-eval's HFLM), on a tiny hybrid exported with the embedded teacher's tokenizer."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from zebra.model import ZebraConfig, ZebraForCausalLM, export
from zebra.model.export import save_hf_model
from zebra.utils.files import atomic_dir


def tiny_hybrid():
    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=24,
                      qk_rope_head_dim=8, hybrid_layer_types=["mla", "mamba", "mla"], mamba_chunk_size=16)
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
ref = torch.load({str(tmp_path / 'ref.pt')!r}, weights_only=True)
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


# ------------------------------------------------------------------------------------------------ loading paths
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(export dir, model, tokenizer): a tiny hybrid at the embedded tokenizer's vocabulary, exported."""
    from zebra.stages.teacher import load_model_tokenizer

    tok = load_model_tokenizer("smollm2_135m")
    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, hybrid_layer_types=["mla", "mamba"], mamba_chunk_size=16,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = ZebraForCausalLM(cfg).eval()
    out = save_hf_model(model, tmp_path_factory.mktemp("export") / "model", tok, model_card="# tiny\n")
    return out, model, tok


def fresh_process(code: str, cwd) -> str:
    """Run `code` in a Python that never imported zebra (which it asserts at the end); returns its stdout."""
    code = textwrap.dedent(code) + textwrap.dedent("""
        import sys
        assert not any(k == "zebra" or k.startswith("zebra.") for k in sys.modules), "zebra was imported"
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300,
                         stdin=subprocess.DEVNULL,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(cwd)})
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_autoconfig_loads_the_export(exported, tmp_path):
    path, model, _ = exported
    out = fresh_process(f"""
        from transformers import AutoConfig
        c = AutoConfig.from_pretrained({str(path)!r}, trust_remote_code=True)
        print("GOT", type(c).__name__, c.hybrid_layer_types, c.mla_layers)
    """, tmp_path)
    assert "GOT ZebraConfig ['mla', 'mamba'] [0]" in out
    saved = json.loads((path / "config.json").read_text())
    assert "layer_types" not in saved  # transformers validates that name against its own layer kinds


@pytest.mark.parametrize("trust", [False, True])
def test_autotokenizer_loads_the_export(exported, tmp_path, trust):
    """The tokenizer needs no remote code: tokenizer_config.json names a transformers class and has no auto_map.
    (Without trust_remote_code, transformers first asks whether to run config.json's code, as it does for every
    repository with custom code; answered no, or non-interactively, it loads the tokenizer.)"""
    path, _, tok = exported
    assert "auto_map" not in json.loads((path / "tokenizer_config.json").read_text())
    out = fresh_process(f"""
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained({str(path)!r}{", trust_remote_code=True" if trust else ""})
        print("IDS", t("The capital of France is").input_ids, t.eos_token)
    """, tmp_path)
    assert f"IDS {tok('The capital of France is').input_ids} {tok.eos_token}" in out


def test_automodel_loads_the_export(exported, tmp_path):
    path, model, _ = exported
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    out = fresh_process(f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(path)!r}, trust_remote_code=True).eval()
        ref = torch.load({str(tmp_path / "ref.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(m(ref["ids"]).logits, ref["logits"])
        print("OK", type(m).__name__)
    """, tmp_path)
    assert "OK ZebraForCausalLM" in out


def test_text_generation_pipeline_loads_the_export(exported, tmp_path):
    path, model, tok = exported
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    out = fresh_process(f"""
        from transformers import pipeline
        g = pipeline("text-generation", model={str(path)!r}, trust_remote_code=True, device="cpu")
        r = g({prompt!r}, max_new_tokens=4, do_sample=False, return_full_text=False)
        print("GEN", repr(r[0]["generated_text"]))
    """, tmp_path)
    assert f"GEN {tok.decode(new, skip_special_tokens=True)!r}" in out


def test_lm_eval_hflm_loads_the_export(exported, tmp_path):
    """lm-eval's HFLM scores a continuation as the model in memory does (sum of its log-probabilities)."""
    path, model, tok = exported
    context, continuation = "The capital of France is", " Paris"
    whole = tok(context + continuation).input_ids
    n_ctx = len(tok(context).input_ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    expected = sum(float(logp[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))
    out = fresh_process(f"""
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        lm = HFLM(pretrained={str(path)!r}, trust_remote_code=True, device="cpu", batch_size=1)
        req = Instance(request_type="loglikelihood", doc={{}}, arguments=({context!r}, {continuation!r}), idx=0)
        print("LL", repr(lm.loglikelihood([req])[0][0]))
    """, tmp_path)
    got = float(out.split("LL ")[1].split()[0])
    assert abs(got - expected) < 1e-4, (got, expected)


def test_exports_written_with_layer_types_still_load(tmp_path):
    """Exports from before the field was renamed carry `layer_types`; they load as the same model."""
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = tiny_hybrid()
    save_hf_model(model, tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["layer_types"] = cfg.pop("hybrid_layer_types")
    cfg_path.write_text(json.dumps(cfg))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.hybrid_layer_types == ["mla", "mamba", "mla"] and not hasattr(loaded.config, "layer_types")
    ids = torch.randint(0, 101, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
