"""How good are the students before any training? Next-token KL to the teacher and perplexity on held-out text.

`untrained_student_report` builds, from one teacher, the all-MLA students of both RoPE variants, the all-Mamba2
student and an N-MLA hybrid assembled from (untrained) students, and measures each on the same text:
- perplexity exp(mean NLL of the next token), for the teacher too;
- mean per-token forward KL(teacher || model) over the same positions.
This is how METHOD §2.2's "which RoPE variant initialises better" question is answered at step 0.

`init_options_report` scores every initialisation option of conf/init/ and the MLA rope key (`rope_key`) the
same way, alone and combined: all-MLA at the preset's ranks and at full rank, all-Mamba2, and the hybrid
assembled from the untrained students, each with its KV-cache fraction.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from zebra.compose.calibration import check_init_options, needs_calibration
from zebra.compose.smart import layer_sensitivities
from zebra.plan.selection import select_layers
from zebra.compose.students import assemble_hybrid, build_student
from zebra.compose.teacher import Teacher, load_teacher
from zebra.eval.metrics import score_batches
from zebra.model.cache import measure_cache_bytes
from zebra.utils.files import write_json_atomic
from zebra.utils.paths import config_dir

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


def default_init_options() -> dict:
    """The init options of the shipped config (conf/init/default.yaml), checked."""
    return check_init_options(OmegaConf.to_container(OmegaConf.load(config_dir() / "init" / "default.yaml")))


def calibration_token_rows(tokenizer, calibration_text: str | Path | None, init: dict, seq_len: int) -> list[dict]:
    """`init.calibration_rows` rows of `seq_len` tokens of the calibration text (default: the shipped SFT data,
    zebra/data/shipped/sft.jsonl, which the ILD split is drawn from), or [] when the options need none."""
    if not needs_calibration(init):
        return []
    if calibration_text is None:
        calibration_text = SHIPPED_DIR / "sft.jsonl"
    n_rows = int(init["calibration_rows"]) or 16
    rows = token_rows(tokenizer, held_out_text(calibration_text)[0], seq_len, n_rows * seq_len)
    if not rows:
        raise ValueError("the calibration text is too short to calibrate on")
    return rows


def _teacher_and_rows(teacher: Teacher | str, zebra_config_kwargs: dict | None, text, seq_len: int,
                      max_tokens: int | None, log) -> tuple[Teacher, dict, list[dict], str]:
    """The reports' common start: the teacher (loaded when given by name), the MLA dims (the preset of that teacher
    unless given) and the held-out rows they are scored on."""
    if isinstance(teacher, str):
        source = teacher
        teacher = load_teacher(source)
        how = "converted from GGUF" if teacher.converted else "cached"
        log(f"teacher {source}: loaded in {teacher.load_seconds:.1f}s ({how})")
    if zebra_config_kwargs is None:
        zebra_config_kwargs = DEFAULT_MLA_KWARGS.get(teacher.source, {})
    text, text_source = held_out_text(text)
    rows = token_rows(teacher.tokenizer, text, seq_len, max_tokens)
    if not rows:
        raise ValueError("the held-out text is too short to score")
    return teacher, zebra_config_kwargs, rows, text_source


def untrained_student_report(teacher: Teacher | str = "smollm2_135m", text: str | Path | None = None,
                             zebra_config_kwargs: dict | None = None, n_mla: int = 6,
                             mla_indices: list[int] | str = "uniform", hybrid_rope: str | None = None,
                             seq_len: int = 512, max_tokens: int | None = 4096,
                             calibration_text: str | Path | None = None, out_path: str | Path | None = None,
                             seed: int = 0, init: dict | None = None, log=print) -> dict:
    """Score teacher, all-MLA ("pairs" and "reference" RoPE), all-Mamba2 and an `n_mla`-MLA hybrid, untrained.

    teacher: a loaded Teacher or a source for `load_teacher` (default: the embedded SmolLM2-135M).
    zebra_config_kwargs: MLA/Mamba dims; default: METHOD's dims for the embedded teacher, else full rank.
    mla_indices: the hybrid's MLA layers: a list, "uniform" (SMART's rule on flat scores: evenly spaced from
      layer 0), or "smart" (SMART sensitivities of the untrained students on `calibration_text`, which must
      then be given and should differ from the evaluation text).
    hybrid_rope: the RoPE variant of the hybrid's MLA layers; default the variant with the lower KL.
    seed: seeds the parts of the Mamba2 init that stay random (z/dt rows, conv, dt_bias, A_log), so that
      repeated reports agree. With the embedded teacher, every number is for its 4-bit (Q4_1) weights.
    init: the init options (conf/init/; default: the shipped conf/init/default.yaml); those that calibrate use
      `init.calibration_rows` rows of `calibration_text` (default: the shipped SFT data).
    Returns (and writes as JSON to `out_path` if given) a dict of per-model metrics.
    """
    teacher, zebra_config_kwargs, rows, text_source = _teacher_and_rows(teacher, zebra_config_kwargs, text, seq_len,
                                                                         max_tokens, log)
    base, tok = teacher.model, teacher.tokenizer
    log(f"held-out text: {text_source}, {sum(r['input_ids'].numel() for r in rows)} tokens in {len(rows)} rows")

    init = check_init_options(init) if init is not None else default_init_options()
    calibration = calibration_token_rows(tok, calibration_text, init, seq_len)
    report = {"teacher": teacher.source, "text_source": text_source, "mla_kwargs": dict(zebra_config_kwargs),
              "init": init, "seed": seed, "models": {}}
    report["models"]["teacher"] = score_batches(base, base, rows)
    log(f"teacher: {report['models']['teacher']}")

    students = {}
    for variant in ("pairs", "reference"):
        kwargs = {**zebra_config_kwargs, "mla_rope": variant}
        students[variant], built = build_student(base, kwargs, "mla", init=init, calibration=calibration)
        report["models"][f"mla_{variant}"] = {**score_batches(students[variant], base, rows),
                                              "init_mean": built["mean"]}
        log(f"all-MLA {variant}: {report['models'][f'mla_{variant}']}")
    torch.manual_seed(seed)
    mamba, _ = build_student(base, zebra_config_kwargs, "mamba", init=init, calibration=calibration)
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
        write_json_atomic(out_path, report)
    return report


# ------------------------------------------------------------------------------------------------ init options
MLA_SVDS = ("plain", "activation_aware")
MAMBA_INITS = (("default", "none"), ("identity", "none"), ("default", "matched"), ("identity", "matched"))


def per_kv_head_budget_kwargs(mla_kwargs: dict, num_kv_heads: int, head_dim: int, d_rope: int) -> dict:
    """The MLA dims with one rope key per KV head at the shared key's cache size (r_kv + d_rope values per
    token): d_rope shrinks to `d_rope` per slot and r_kv gives up the rest (kv_lora_rank + old d_rope - g d_rope)."""
    old_rope = int(mla_kwargs.get("qk_rope_head_dim") or head_dim // 2)
    r_kv = int(mla_kwargs["kv_lora_rank"]) + old_rope - num_kv_heads * d_rope
    if r_kv < 1:
        raise ValueError(f"no kv_lora_rank is left for {num_kv_heads} rope keys of {d_rope} dims")
    return {**mla_kwargs, "rope_key": "per_kv_head", "kv_lora_rank": r_kv, "qk_rope_head_dim": d_rope,
            "qk_nope_head_dim": head_dim - d_rope}


def init_options_report(teacher: Teacher | str = "smollm2_135m", text: str | Path | None = None,
                        zebra_config_kwargs: dict | None = None, budget_rope_dims: tuple[int, ...] = (16, 8),
                        n_mla: int = 6, mla_indices: list[int] | str = "uniform", seq_len: int = 512,
                        max_tokens: int | None = 4096, calibration_text: str | Path | None = None,
                        calibration_rows: int = 16, hybrid_pairs: list[tuple[str, str]] | None = None,
                        rope_keys: tuple[str, ...] | None = None, mla_svds: tuple[str, ...] = MLA_SVDS,
                        mamba_inits: tuple[tuple[str, str], ...] = MAMBA_INITS, full_rank: bool = True,
                        out_path: str | Path | None = None, seed: int = 0, log=print) -> dict:
    """Untrained next-token KL(teacher || model) and perplexity of every init option and combination.

    Models (names in the returned `models`):
    - `mla/<rope key>/<svd>`: all-MLA at the given ranks (default: the embedded teacher's preset), rope key
      `shared`, `per_kv_head` (at the same r_kv and d_rope: a larger cache) and `per_kv_head_d<d>` (the shared
      key's cache size, each slot d dims: `per_kv_head_budget_kwargs`), each with the plain and the
      activation-aware SVD;
    - `mla_full_rank/<rope key>`: all-MLA at full rank (both SVDs are exact there), d_rope of the given kwargs;
    - `mamba/<conv>/<scale>`: all-Mamba2 with the conv init default|identity and the output scale none|matched
      (the random parts seeded alike);
    - `hybrid/<mla model>+<mamba model>`: the `n_mla`-MLA hybrid assembled from those two untrained students at
      `mla_indices` ("uniform": `mix=uniform`'s placement, or a list), for each pair of `hybrid_pairs`
      (default: every MLA model at the given ranks with every Mamba2 model).
    Every model entry has its KV-cache fraction (measured from the allocated cache). Calibration: the first
    `calibration_rows` rows of `seq_len` tokens of `calibration_text` (default: the shipped SFT data).
    A part of the grid: `rope_keys` (names as above; default all), `mla_svds`, `mamba_inits` ((conv, scale)
    pairs) and `full_rank` (the full-rank rows) say which students are built and scored.
    """
    teacher, zebra_config_kwargs, rows, text_source = _teacher_and_rows(teacher, zebra_config_kwargs, text, seq_len,
                                                                         max_tokens, log)
    base, tok = teacher.model, teacher.tokenizer
    calibration = calibration_token_rows(tok, calibration_text, {"mla_svd": "activation_aware", "calibration_rows":
                                                                  calibration_rows, "mamba_conv": "default",
                                                                  "mamba_scale": "matched"}, seq_len)
    log(f"held-out text: {text_source}, {sum(r['input_ids'].numel() for r in rows)} tokens; calibration: "
        f"{sum(r['input_ids'].numel() for r in calibration)} tokens")
    cfg = base.config
    g, hd = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    report = {"teacher": teacher.source, "text_source": text_source, "mla_kwargs": dict(zebra_config_kwargs),
              "calibration_tokens": sum(r["input_ids"].numel() for r in calibration), "seed": seed, "models": {}}
    models = report["models"]
    models["teacher"] = score_batches(base, base, rows)
    log(f"teacher: {models['teacher']}")

    def score(name: str, model, **extra) -> None:
        models[name] = {**score_batches(model, base, rows), "kv_fraction": measure_cache_bytes(model.config)[
            "kv_fraction"], **extra}
        log(f"{name}: KL {models[name]['kl_to_teacher']:.3f}, ppl {models[name]['perplexity']:.1f}, "
            f"KV {models[name]['kv_fraction']:.4f}")

    variants = {"shared": {**zebra_config_kwargs, "rope_key": "shared"},
                "per_kv_head": {**zebra_config_kwargs, "rope_key": "per_kv_head"}}
    for d in budget_rope_dims:
        variants[f"per_kv_head_d{d}"] = per_kv_head_budget_kwargs(zebra_config_kwargs, g, hd, d)
    unknown = sorted(set(rope_keys or ()) - set(variants))
    if unknown:
        raise ValueError(f"unknown rope key variant(s) {unknown}; known: {sorted(variants)}")
    mla_students, mamba_students = {}, {}
    for key, kwargs in variants.items():
        if rope_keys is not None and key not in rope_keys:
            continue
        for svd in mla_svds:
            name = f"mla/{key}/{svd}"
            student, _ = build_student(base, kwargs, "mla", init={"mla_svd": svd}, calibration=calibration)
            score(name, student, mla_kwargs=kwargs, mla_svd=svd)
            mla_students[name] = student
    full = {k: v for k, v in zebra_config_kwargs.items() if k not in ("q_lora_rank", "kv_lora_rank")}
    for key in ("shared", "per_kv_head") if full_rank else ():
        student, _ = build_student(base, {**full, "rope_key": key}, "mla")
        score(f"mla_full_rank/{key}", student, rope_key=key)
        del student
    for conv, scale in mamba_inits:
        torch.manual_seed(seed)
        name = f"mamba/{conv}/{scale}"
        student, _ = build_student(base, zebra_config_kwargs, "mamba",
                                   init={"mamba_conv": conv, "mamba_scale": scale}, calibration=calibration)
        score(name, student, mamba_conv=conv, mamba_scale=scale)
        mamba_students[name] = student

    num_layers = cfg.num_hidden_layers
    if mla_indices == "uniform":
        from zebra.plan.mixes import uniform_layers  # the same placement as `mix=uniform`

        indices = uniform_layers(num_layers, n_mla)
    else:
        indices = sorted(int(i) for i in mla_indices)
    report["hybrid_mla_indices"] = indices
    pairs = hybrid_pairs or [(m, n) for m in mla_students for n in mamba_students]
    for mla_name, mamba_name in pairs:
        hybrid = assemble_hybrid(mla_students[mla_name], mamba_students[mamba_name], indices)
        score(f"hybrid/{mla_name}+{mamba_name}", hybrid, mla=mla_name, mamba=mamba_name)
        del hybrid
    if out_path is not None:
        write_json_atomic(out_path, report)
    return report
