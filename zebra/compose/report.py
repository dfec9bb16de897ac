"""How good are the students before any training? Next-token KL to the teacher and perplexity on held-out text.

`untrained_student_report` builds, from one teacher, the all-MLA students of both RoPE variants, the all-Mamba2
student and an N-MLA hybrid assembled from (untrained) students, and measures each on the same text:
- perplexity exp(mean NLL of the next token), for the teacher too;
- mean per-token forward KL(teacher || model) over the same positions.
This is how METHOD §2.2's "which RoPE variant initialises better" question is answered at step 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zebra.compose.smart import layer_sensitivities, select_layers
from zebra.compose.students import assemble_hybrid, build_student
from zebra.compose.teacher import Teacher, load_teacher
from zebra.eval.metrics import score_batches

# METHOD §2.2's dims for the embedded base (full rank would be r_q 576, r_kv 384)
DEFAULT_MLA_KWARGS = {
    "smollm2_135m": {"q_lora_rank": 384, "kv_lora_rank": 64, "qk_rope_head_dim": 32, "qk_nope_head_dim": 32,
                     "v_head_dim": 64},
}
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "shipped"

FALLBACK_TEXT = (
    "The river rose slowly through the night, and by morning the low fields along its banks had become a "
    "shallow, silver lake. Farmers stood at the edge of the water and talked about the last great flood, "
    "forty years earlier, when the old stone bridge had been swept away and the village had been cut off for "
    "nearly two weeks. This time the new bridge held. Engineers had built it higher, on thick concrete piers, "
    "after studying records of every flood since the town was founded. Still, the school was closed, the "
    "market was moved to the church square, and the baker rowed a small boat from house to house with bread "
    "wrapped in cloth. Children watched from upstairs windows as ducks swam where the road used to be. By the "
    "third day the water began to fall, leaving behind a layer of fine brown mud that would, the older farmers "
    "said, make the next harvest one of the best in years. Scientists who study rivers agree that floods are "
    "not only destructive: they carry nutrients from the hills and spread them across the plain, which is why "
    "people have farmed beside rivers for thousands of years despite the risk."
)


def held_out_text(text: str | Path | None = None) -> tuple[str, str]:
    """(text, where it came from): a str is the text itself, a Path a file to read (plain text or JSON lines);
    None: a held-out file shipped under zebra/data/shipped/ (a name containing 'held'), else a fixed paragraph
    written for this report."""
    if isinstance(text, Path):
        return _read_text_file(text), str(text)
    if text is not None:
        return text, "given text"
    if SHIPPED_DIR.is_dir():
        for path in sorted(SHIPPED_DIR.rglob("*")):
            if path.is_file() and "held" in path.name.lower():
                return _read_text_file(path), str(path)
    return FALLBACK_TEXT, "built-in paragraph (zebra.compose.report.FALLBACK_TEXT)"


def _read_text_file(path: Path) -> str:
    """Plain text, or JSON lines whose records have a 'text' field (or chat 'messages' contents)."""
    raw = path.read_text()
    if path.suffix not in (".jsonl", ".json"):
        return raw
    parts = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if "text" in rec:
            parts.append(rec["text"])
        elif "messages" in rec:
            parts.extend(m["content"] for m in rec["messages"])
    return "\n\n".join(parts)


def token_rows(tokenizer, text: str, seq_len: int, max_tokens: int | None) -> list[dict]:
    """The text's token ids cut into rows of at most seq_len tokens, each a batch of its own ({"input_ids":
    [1, n]}: every token but the last counts, zebra.eval.metrics)."""
    ids = tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [{"input_ids": r[None]} for r in ids.split(seq_len) if r.numel() > 1]


def untrained_student_report(teacher: Teacher | str = "smollm2_135m", text: str | Path | None = None,
                             zebra_config_kwargs: dict | None = None, n_mla: int = 6,
                             mla_indices: list[int] | str = "uniform", hybrid_rope: str | None = None,
                             seq_len: int = 512, max_tokens: int | None = 4096,
                             calibration_text: str | Path | None = None, out_path: str | Path | None = None,
                             seed: int = 0, log=print) -> dict:
    """Score teacher, all-MLA ("pairs" and "reference" RoPE), all-Mamba2 and an `n_mla`-MLA hybrid, untrained.

    teacher: a loaded Teacher or a source for `load_teacher` (default: the embedded SmolLM2-135M).
    zebra_config_kwargs: MLA/Mamba dims; default: METHOD's dims for the embedded teacher, else full rank.
    mla_indices: the hybrid's MLA layers: a list, "uniform" (SMART's rule on flat scores: evenly spaced from
      layer 0), or "smart" (SMART sensitivities of the untrained students on `calibration_text`, which must
      then be given and should differ from the evaluation text).
    hybrid_rope: the RoPE variant of the hybrid's MLA layers; default the variant with the lower KL.
    seed: seeds the parts of the Mamba2 init that stay random (z/dt rows, conv, dt_bias, A_log), so that
      repeated reports agree. With the embedded teacher, every number is for its 4-bit (Q4_1) weights.
    Returns (and writes as JSON to `out_path` if given) a dict of per-model metrics.
    """
    if isinstance(teacher, str):
        source = teacher
        teacher = load_teacher(source)
        how = "converted from GGUF" if teacher.converted else "cached"
        log(f"teacher {source}: loaded in {teacher.load_seconds:.1f}s ({how})")
    base, tok = teacher.model, teacher.tokenizer
    if zebra_config_kwargs is None:
        zebra_config_kwargs = DEFAULT_MLA_KWARGS.get(teacher.source, {})
    text, text_source = held_out_text(text)
    rows = token_rows(tok, text, seq_len, max_tokens)
    if not rows:
        raise ValueError("the held-out text is too short to score")
    log(f"held-out text: {text_source}, {sum(r['input_ids'].numel() for r in rows)} tokens in {len(rows)} rows")

    report = {"teacher": teacher.source, "text_source": text_source, "mla_kwargs": dict(zebra_config_kwargs),
              "seed": seed, "models": {}}
    report["models"]["teacher"] = score_batches(base, base, rows)
    log(f"teacher: {report['models']['teacher']}")

    students = {}
    for variant in ("pairs", "reference"):
        kwargs = {**zebra_config_kwargs, "mla_rope": variant}
        students[variant], init = build_student(base, kwargs, "mla")
        report["models"][f"mla_{variant}"] = {**score_batches(students[variant], base, rows), "init_mean": init["mean"]}
        log(f"all-MLA {variant}: {report['models'][f'mla_{variant}']}")
    torch.manual_seed(seed)
    mamba, _ = build_student(base, zebra_config_kwargs, "mamba")
    report["models"]["mamba"] = score_batches(mamba, base, rows)
    log(f"all-Mamba2: {report['models']['mamba']}")

    if hybrid_rope is None:
        hybrid_rope = min(("pairs", "reference"), key=lambda v: report["models"][f"mla_{v}"]["kl_to_teacher"])
    mla = students[hybrid_rope]
    num_layers = base.config.num_hidden_layers
    if mla_indices == "uniform":
        from zebra.plan.mixes import uniform_layers  # the same placement as `mix=uniform`

        indices = uniform_layers(num_layers, n_mla)
    elif mla_indices == "smart":
        if calibration_text is None:
            raise ValueError("mla_indices='smart' needs calibration_text (text other than the evaluation text)")
        cal = held_out_text(calibration_text)[0]
        scores = layer_sensitivities(base, mamba, mla, token_rows(tok, cal, seq_len, max_tokens))
        indices = select_layers(scores, n_mla)
        report["smart_scores"] = scores
    else:
        indices = sorted(int(i) for i in mla_indices)
    hybrid = assemble_hybrid(mla, mamba, indices)
    report["models"]["hybrid"] = {**score_batches(hybrid, base, rows), "mla_indices": indices, "mla_rope": hybrid_rope,
                                  "placement": mla_indices if isinstance(mla_indices, str) else "given"}
    log(f"hybrid ({len(indices)} MLA, {hybrid_rope}): {report['models']['hybrid']}")
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=1))
    return report
