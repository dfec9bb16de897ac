"""untrained_student_report on a tiny random Llama (the SmolLM2 numbers are produced by hand, see the report)."""

import json
import math

import pytest
import torch

from zebra.compose.report import untrained_student_report
from zebra.compose.teacher import Teacher


def test_report_on_tiny_teacher(tiny_llama, tmp_path):
    from test_teacher import tiny_tokenizer  # same directory

    base = tiny_llama(g=2, layers=6)
    tok = tiny_tokenizer()
    teacher = Teacher(model=base, tokenizer=tok, source="tiny", path="", converted=False,
                      load_seconds=0.0)
    gen = torch.Generator().manual_seed(0)
    text = " ".join(f"w{int(i)}" for i in torch.randint(3, 97, (150,), generator=gen))
    out = untrained_student_report(teacher, text=text, zebra_config_kwargs={"q_lora_rank": 32, "kv_lora_rank": 16},
                                   n_mla=2, seq_len=64, out_path=tmp_path / "r.json", log=lambda *_: None,
                                   calibration_text=" ".join(f"w{int(i)}" for i in torch.randint(3, 97, (100,))))
    models = out["models"]
    assert set(models) == {"teacher", "mla_pairs", "mla_reference", "mamba", "hybrid"}
    n = len(tok(text).input_ids)
    assert models["teacher"]["tokens"] == n - math.ceil(n / 64)  # rows of 64 tokens: one prediction fewer per row
    assert "kl_to_teacher" not in models["teacher"]
    for name, m in models.items():
        assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
        if name != "teacher":
            assert m["kl_to_teacher"] >= 0
    assert models["hybrid"]["mla_indices"] == [0, 3]
    assert models["hybrid"]["mla_rope"] in ("pairs", "reference")
    assert json.loads((tmp_path / "r.json").read_text())["models"]["mamba"] == models["mamba"]
    assert out["init"]["mla_svd"] in ("plain", "activation_aware")  # the shipped conf/init/default.yaml


def test_init_options_report_on_tiny_teacher(tiny_llama, tmp_path):
    from test_teacher import tiny_tokenizer  # same directory

    from zebra.compose.report import init_options_report

    base = tiny_llama(g=2, layers=4)
    tok = tiny_tokenizer()
    teacher = Teacher(model=base, tokenizer=tok, source="tiny", path="", converted=False, load_seconds=0.0)
    gen = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(f"w{int(i)}" for i in torch.randint(3, 97, (n,), generator=gen))  # noqa: E731
    kw = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8}
    out = init_options_report(teacher, text=words(120), calibration_text=words(200), zebra_config_kwargs=kw,
                              budget_rope_dims=(4,), n_mla=2, seq_len=64, calibration_rows=2,
                              out_path=tmp_path / "grid.json", log=lambda *_: None)
    models = out["models"]
    mla = [f"mla/{k}/{s}" for k in ("shared", "per_kv_head", "per_kv_head_d4") for s in ("plain", "activation_aware")]
    mamba = [f"mamba/{c}/{s}" for c in ("default", "identity") for s in ("none", "matched")]
    assert set(models) == {"teacher", *mla, "mla_full_rank/shared", "mla_full_rank/per_kv_head", *mamba,
                           *(f"hybrid/{m}+{n}" for m in mla for n in mamba)}
    assert out["calibration_tokens"] > 64 and out["hybrid_mla_indices"] == [0, 2]
    for name, m in models.items():
        assert name == "teacher" or (m["kl_to_teacher"] >= 0 and m["kv_fraction"] >= 0)  # all-Mamba2: 0
    # KV per token per MLA layer: r_kv + d_rope (shared) | r_kv + g d_rope (per KV head) | the shared size again
    base_kv = 2 * 2 * 16
    assert models["mla/shared/plain"]["kv_fraction"] == pytest.approx((16 + 8) / base_kv)
    assert models["mla/per_kv_head/plain"]["kv_fraction"] == pytest.approx((16 + 2 * 8) / base_kv)
    assert models["mla/per_kv_head_d4/plain"]["kv_fraction"] == pytest.approx((16 + 8) / base_kv)
    # at full rank with one rope key per KV head the rope keys are exact: closer to the teacher than one shared
    assert models["mla_full_rank/per_kv_head"]["kl_to_teacher"] < models["mla_full_rank/shared"]["kl_to_teacher"]
    assert json.loads((tmp_path / "grid.json").read_text())["models"].keys() == models.keys()
