"""untrained_student_report on a tiny random Llama (the SmolLM2 numbers are produced by hand, see the report)."""

import json
import math

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
                                   n_mla=2, seq_len=64, out_path=tmp_path / "r.json", log=lambda *_: None)
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
