"""Stage `teacher_data`: a corpus sampled from the teacher (`data=teacher_generated`), for ILD and KD to train on
(sequence-level KD). No training.

Reads `data.generate` (conf/data/teacher_generated.yaml): the teacher's replies to the prompts of a chat source and
free-running samples from BOS, with the sampling settings. Writes `<model_dir>/teacher_data/dataset/`, a `datasets`
DatasetDict with splits `responses` (messages) and `free` (text), whole or not at all, then report.json (new tokens,
tokens/s). The stage hash covers the teacher, the tokenizer and `data.generate`, so a finished corpus is reused by
every later run with the same settings and regenerated when one of them changes.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from omegaconf import DictConfig, OmegaConf

from zebra.compose.teacher import cache_root
from zebra.data.teacher_samples import SamplingSettings, Throughput, prompt_conversations, sample_free, \
    sample_responses
from zebra.stages import artifacts
from zebra.stages.errors import StageError
from zebra.stages.teacher import check_tokenizers_match, load_model_tokenizer, load_teacher_model, torch_dtype
from zebra.utils import files

log = logging.getLogger("zebra.stages.teacher_data")

SPLITS = ("responses", "free")


def generation_config(cfg: DictConfig) -> DictConfig:
    gen = cfg.data.get("generate")
    if gen is None:
        raise StageError(f"stage teacher_data samples the corpus that `data.generate` describes, and data config "
                         f"{cfg.data.get('name')!r} has none: use data=teacher_generated")
    return gen


def _settings(gen: DictConfig) -> tuple[SamplingSettings, int, int, int]:
    try:
        s = SamplingSettings(temperature=float(gen.temperature), top_p=float(gen.top_p), top_k=int(gen.top_k),
                             max_new_tokens=int(gen.max_new_tokens), seed=int(gen.seed))
    except ValueError as e:
        raise StageError(f"data.generate: {e}") from None
    per_prompt, free, batch = int(gen.responses_per_prompt), int(gen.free_samples), int(gen.batch_size)
    if per_prompt < 0 or free < 0 or per_prompt + free == 0 or batch < 1:
        raise StageError(f"data.generate needs responses_per_prompt >= 0 and free_samples >= 0, not both 0, and "
                         f"batch_size >= 1 (got {per_prompt}, {free}, {batch})")
    return s, per_prompt, free, batch


def _device_and_dtype(cfg: DictConfig, gen: DictConfig) -> tuple[torch.device, torch.dtype]:
    name = str(gen.device)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"data.generate.device={name!r} but no CUDA device is visible")
    dtype = cfg.teacher_dtype
    dtype = (torch.bfloat16 if device.type == "cuda" else torch.float32) if dtype in (None, "auto") \
        else torch_dtype(dtype)
    return device, dtype


def _wait_for_rank_zero(cfg: DictConfig) -> dict:
    """Ranks other than 0 (torchrun / srun start every rank on the pipeline) wait for rank 0's corpus."""
    while not artifacts.is_done(cfg, "teacher_data"):
        time.sleep(5)
    return artifacts.load(cfg, "teacher_data", "report")


def run(cfg: DictConfig) -> dict:
    import datasets

    gen = generation_config(cfg)
    settings, per_prompt, n_free, batch = _settings(gen)
    if int(os.environ.get("RANK", "0")) != 0:
        return _wait_for_rank_zero(cfg)
    start = time.perf_counter()
    tokenizer = load_model_tokenizer(cfg.model.tokenizer)
    prompt_spec = OmegaConf.to_container(gen.prompts, resolve=True) if OmegaConf.is_config(gen.prompts) \
        else gen.prompts
    prompts = prompt_conversations(prompt_spec, gen.max_prompts, cache_root() / "data" / "raw") if per_prompt \
        else []
    device, dtype = _device_and_dtype(cfg, gen)
    teacher = load_teacher_model(cfg.model.teacher, cfg.model.base, dtype=dtype, device=device)
    if teacher.tokenizer is not None:
        check_tokenizers_match(tokenizer, teacher.tokenizer, str(cfg.model.tokenizer), str(cfg.model.teacher))
    model, quantisation = teacher.model, teacher.quantisation
    log.info("teacher_data: %d prompts x %d replies and %d free samples of up to %d new tokens on %s (%s)",
             len(prompts), per_prompt, n_free, settings.max_new_tokens, device, dtype)

    bar = Throughput(len(prompts) * per_prompt + n_free, "teacher samples")
    responses = sample_responses(model, tokenizer, prompts, settings, batch, per_prompt, bar) if prompts else []
    free = sample_free(model, tokenizer, n_free, settings, batch, bool(gen.free_stop_at_eos), bar) if n_free else []
    sampling_seconds = bar.close()
    new_tokens = bar.tokens
    del model, teacher

    # another config's finished corpus is kept under previous/; this part is not done while its corpus changes
    out = artifacts.begin(cfg, "teacher_data")
    corpus = datasets.DatasetDict({
        "responses": datasets.Dataset.from_list(responses) if responses else _empty("messages"),
        "free": datasets.Dataset.from_list(free) if free else _empty("text"),
    })
    with files.atomic_dir(artifacts.output_path(cfg, "teacher_data")) as tmp:
        corpus.save_to_disk(str(tmp))
    rows = responses + free
    report = {
        "stage": "teacher_data", "config_hash": artifacts.stage_hash(cfg, "teacher_data"), "model": cfg.model.name,
        "teacher": str(cfg.model.teacher), "teacher_quantisation": quantisation,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "responses": len(responses), "free_samples": len(free), "new_tokens": new_tokens,
        "tokens_seen": new_tokens,
        "finished_fraction": round(sum(r["finished"] for r in rows) / max(len(rows), 1), 4),
        "sampling_seconds": round(sampling_seconds, 2),
        "tokens_per_second": round(new_tokens / max(sampling_seconds, 1e-9), 1),
        "wall_seconds": round(time.perf_counter() - start, 2),
        "settings": OmegaConf.to_container(gen, resolve=True),
    }
    report = artifacts.finish(cfg, "teacher_data", None, report)
    log.info("teacher_data done: %s (%d new tokens, %.0f tokens/s)", out, new_tokens, report["tokens_per_second"])
    return report


def _empty(column: str):
    import datasets

    features = {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
                "text": datasets.Value("string")}
    return datasets.Dataset.from_dict({column: []}, features=datasets.Features({column: features[column]}))

