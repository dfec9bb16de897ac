"""Stage `teacher_cache`: the KD teacher run once over the KD split, its top-k log-probs stored for later KD runs.

KD with `kd.teacher_source=cache` then streams them instead of running the teacher (no teacher weights loaded):
the loss is the sparse forward KL over the stored top-k ids plus one bucket for the rest of the vocabulary
(zebra.stages.losses.sparse_kd_loss). Per token the cache holds

    ids            [k] int32        the teacher's top-k token ids at that position (most likely first)
    logprobs       [k] bf16|fp16|fp32  their log-probs at temperature T (kd.module.temperature)
    tail           []  fp32         log of the probability mass outside the k ids (-inf when k = vocab)
    tail_ids       [s] int32        with teacher_cache.tail_samples = s > 0: s ids drawn with replacement from the
                                    teacher's distribution at T restricted to the ids outside the top-k
    tail_logprobs  [s] (as logprobs) the teacher's log-probs at T of those ids

so `k * (4 + 2) + 4 + s * (4 + 2)` bytes per token in bf16. With tail samples the loss replaces the bucket by the
draws, an unbiased estimate of the dense KL whose gradient also shapes the student's tail. The draws of a shard
come from its own generator (on the build device), seeded by teacher_cache.seed and the shard's first row, one
draw of [T, s] uniforms per row in row order: a resumed or multi-rank build writes the same bytes, and the batch
and chunk sizes do not change them. Rows are the KD split's packed rows (the DataModule's, in its own row
numbering), so any order, batch size or number of ranks KD uses reads the same values; every row of the split is
stored, as the KD sampler may reach any of them. Layout, under the stage's directory:

    <model_dir>/teacher_cache/<hash>/{shard-00000.safetensors, ..., manifest.json}
    <model_dir>/teacher_cache/{manifest.json, report.json}      the latest finished build

`<hash>` is the stage hash (teacher, tokenizer, data, split, seq_len, temperature, top_k, dtype, tail samples,
seed, shard size), so caches for several k live side by side. Shard i holds rows [i * R, (i + 1) * R); rank r of W
builds the shards i = r (mod W). Each shard is written to a temporary name and renamed, so a killed build keeps
its finished shards and the next run builds only the others; manifest.json, written last by rank 0, marks the
cache complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from zebra.data.sampling import ResumableDataLoader
from zebra.data.sft import collate_rows, world_info
from zebra.data.tokenizers import tokenizer_fingerprint
from zebra.stages import artifacts
from zebra.stages.budget import token_data, world_size
from zebra.stages.errors import MissingArtifactError, StageError
from zebra.stages.losses import auto_chunk_size, lm_head_weight
from zebra.stages.teacher import load_model_tokenizer, teacher_dtype, teacher_forward
from zebra.utils import files

log = logging.getLogger("zebra.stages.teacher_cache")

LOGPROB_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# the batch keys a cached row adds beside the token-mixture ones; KD's loss reads them instead of a teacher
IDS, LOGPROBS, TAIL = "teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob"
TAIL_IDS, TAIL_LOGPROBS = "teacher_tail_ids", "teacher_tail_logprobs"  # only in a cache with tail samples
_TENSORS = {IDS: "ids", LOGPROBS: "logprobs", TAIL: "tail"}
_SAMPLE_TENSORS = {TAIL_IDS: "tail_ids", TAIL_LOGPROBS: "tail_logprobs"}
# the fields a KD run must share with the cache it reads (named in the mismatch error)
IDENTITY = ("teacher", "teacher_base", "tokenizer", "data_id", "split", "seq_len", "num_rows", "vocab_size",
            "temperature", "top_k", "logprob_dtype", "tail_samples", "seed")


class TeacherCacheMismatchError(StageError):
    """The teacher cache was built for other data, tokenizer, shapes, k or temperature than this run."""


def bytes_per_token(top_k: int, logprob_dtype: str, tail_samples: int = 0) -> int:
    return (int(top_k) + int(tail_samples)) * (4 + LOGPROB_DTYPES[logprob_dtype].itemsize) + 4


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def shard_ranges(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    return [(s, min(num_rows, s + rows_per_shard)) for s in range(0, num_rows, rows_per_shard)]


# ------------------------------------------------------------------------------------------------ identity
def cache_dir(cfg: DictConfig) -> Path:
    return artifacts.stage_dir(cfg, "teacher_cache") / artifacts.stage_hash(cfg, "teacher_cache")


def kd_rows(cfg: DictConfig, tokenizer):
    """The KD split's data module (set up) and its packed rows: what KD with these settings would train on."""
    sc = cfg.kd
    dm = token_data(cfg, tokenizer, sc.split, sc.seq_len, 1, assistant_only=sc.assistant_only)
    dm.setup()
    return dm, dm.rows()


def identity(cfg: DictConfig, dm, tokenizer, vocab_size: int) -> dict:
    """What decides a cache's values, as this config and data see it (compared field by field with a cache's)."""
    cc = cfg.teacher_cache
    base = cfg.model.get("kd_teacher_base")
    return {"teacher": str(cfg.model.kd_teacher), "teacher_base": None if base is None else str(base),
            "tokenizer": tokenizer_fingerprint(tokenizer), "data_id": dm.data_id(), "split": str(cfg.kd.split),
            "seq_len": int(cfg.kd.seq_len), "num_rows": len(dm.rows()), "vocab_size": int(vocab_size),
            "temperature": float(cfg.kd.module.temperature), "top_k": int(cc.top_k),
            "logprob_dtype": str(cc.logprob_dtype), "tail_samples": int(cc.tail_samples), "seed": int(cc.seed)}


def check_settings(cfg: DictConfig, vocab_size: int) -> None:
    cc = cfg.teacher_cache
    if str(cc.logprob_dtype) not in LOGPROB_DTYPES:
        raise StageError(f"teacher_cache.logprob_dtype must be one of {sorted(LOGPROB_DTYPES)}, "
                         f"got {cc.logprob_dtype!r}")
    if not 1 <= int(cc.top_k) <= vocab_size:
        raise StageError(f"teacher_cache.top_k must be between 1 and the vocabulary size {vocab_size}, "
                         f"got {cc.top_k}")
    if int(cc.tail_samples) < 0:
        raise StageError(f"teacher_cache.tail_samples must be >= 0 (0: no tail samples), got {cc.tail_samples}")
    if int(cc.tail_samples) > 0 and int(cc.top_k) == vocab_size:
        raise StageError(f"teacher_cache.tail_samples={cc.tail_samples} draws ids outside the top-k, but "
                         f"teacher_cache.top_k={cc.top_k} is the whole vocabulary (no tail): set tail_samples=0 "
                         "or a smaller top_k")
    if int(cc.rows_per_shard) < 1 or int(cc.batch_size) < 1:
        raise StageError(f"teacher_cache.rows_per_shard and batch_size must be >= 1 "
                         f"(got {cc.rows_per_shard}, {cc.batch_size})")


def differences(cache: dict, run: dict) -> list[str]:
    return [f"{k}: cache {cache.get(k)!r} vs this run {run[k]!r}" for k in IDENTITY if cache.get(k) != run[k]]


# ------------------------------------------------------------------------------------------------ teacher top-k
@torch.no_grad()
def teacher_topk(hidden: torch.Tensor, head_weight: torch.Tensor, top_k: int, temperature: float = 1.0,
                 chunk_size: int | None = None, tail_uniforms: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids int32 [N, k], log-probs [N, k], log of the mass outside them [N], tail ids int32 [N, s], their
    log-probs [N, s]; fp32, fp64 for fp64 input) of the teacher's next-token distribution at temperature T, from its
    final hidden states [N, H] and LM head [V, H]. `tail_uniforms` [N, s] (in [0, 1); none: s = 0) draw the tail
    ids by inverse CDF from the distribution restricted to the ids outside the top-k, renormalised. Logits are
    formed as chunked_kd_loss forms the teacher's (the hidden states' dtype, then fp32), one token chunk at a time."""
    w = head_weight if head_weight.dtype == hidden.dtype else head_weight.to(hidden.dtype)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    chunk = chunk_size or auto_chunk_size(w.shape[0])
    n, s = hidden.shape[0], 0 if tail_uniforms is None else tail_uniforms.shape[-1]
    if tail_uniforms is not None and tail_uniforms.shape != (n, s):
        raise ValueError(f"tail_uniforms must be [{n}, s] for {n} tokens, got {list(tail_uniforms.shape)}")
    ids, logps, tails = [], [], []
    tail_ids = torch.empty(n, s, dtype=torch.int32, device=hidden.device)
    tail_logps = torch.empty(n, s, dtype=acc, device=hidden.device)
    for start in range(0, n, chunk):
        z = (hidden[start:start + chunk] @ w.t()).to(acc)
        logp = torch.log_softmax(z.mul_(1.0 / temperature), dim=-1)
        del z
        top, idx = logp.topk(top_k, dim=-1, sorted=True)
        tail = logp.scatter_(-1, idx, float("-inf")).logsumexp(-1)
        if s:
            drawn = draw_outside_top(logp, tail, tail_uniforms[start:start + chunk].to(acc))
            tail_ids[start:start + chunk] = drawn
            tail_logps[start:start + chunk] = logp.gather(-1, drawn)
        tails.append(tail)
        ids.append(idx.to(torch.int32))
        logps.append(top)
    return torch.cat(ids), torch.cat(logps), torch.cat(tails), tail_ids, tail_logps


def draw_outside_top(logp: torch.Tensor, tail: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ids [c, s] drawn by inverse CDF, one per uniform in [0, 1), from softmax(logp) restricted to the ids where
    logp > -inf (logp [c, V]: log-probs with -inf on the top-k ids; tail [c]: logsumexp of the rest). An id of
    zero mass is never drawn: the first id whose cumulative mass exceeds a value below the total adds mass."""
    cdf = (logp - tail[:, None]).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    below_total = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, below_total, right=True)


def tail_generator(seed: int, first_row: int, device) -> torch.Generator:
    """The tail draws' generator of the shard that starts at `first_row` (its own stream, whichever rank builds it
    and whenever)."""
    return torch.Generator(device=device).manual_seed(int(seed) * 1_000_003 + int(first_row))


def build_shard(teacher, rows, start: int, stop: int, cc: DictConfig, temperature: float, device) -> dict:
    """The cached tensors of rows [start, stop): ids [R, T, k], logprobs [R, T, k], tail [R, T], and with
    s = tail_samples > 0 tail_ids [R, T, s], tail_logprobs [R, T, s]."""
    k, s, dtype = int(cc.top_k), int(cc.tail_samples), LOGPROB_DTYPES[str(cc.logprob_dtype)]
    head = lm_head_weight(teacher)
    gen = tail_generator(int(cc.seed), start, device) if s else None
    out = {name: [] for name in ("ids", "logprobs", "tail", *(_SAMPLE_TENSORS.values() if s else ()))}
    for first in range(start, stop, int(cc.batch_size)):
        batch_rows = range(first, min(stop, first + int(cc.batch_size)))
        batch = collate_rows([rows[r] for r in batch_rows])
        batch = {key: v.to(device) for key, v in batch.items()}
        h = teacher_forward(teacher, batch["input_ids"], batch["position_ids"], batch["attention_mask"])
        b, t = h.last_hidden_state.shape[:2]
        # one [T, s] draw per row, in row order: the same uniforms whatever the batch size
        u = torch.cat([torch.rand(t, s, generator=gen, device=device) for _ in batch_rows]) if s else None
        ids, logp, tail, tail_ids, tail_logp = teacher_topk(h.last_hidden_state.reshape(b * t, -1), head, k,
                                                            temperature, cc.chunk_size, u)
        out["ids"].append(ids.reshape(b, t, k).cpu())
        out["logprobs"].append(logp.reshape(b, t, k).to(dtype).cpu())
        out["tail"].append(tail.reshape(b, t).float().cpu())
        if s:
            out["tail_ids"].append(tail_ids.reshape(b, t, s).cpu())
            out["tail_logprobs"].append(tail_logp.reshape(b, t, s).to(dtype).cpu())
    return {name: torch.cat(parts).contiguous() for name, parts in out.items()}


def shard_label(key: str, start: int, stop: int) -> str:
    return f"cache {key} rows {start}-{stop}"


def write_shard(path: Path, tensors: dict, key: str, start: int, stop: int) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # one metadata entry: safetensors writes several in no fixed order, and a rebuilt shard must match byte for byte
    save_file(tensors, str(tmp), metadata={"zebra_teacher_cache": shard_label(key, start, stop)})
    os.replace(tmp, path)


def shard_is_complete(path: Path, key: str, start: int, stop: int) -> bool:
    """A finished shard of this cache (renamed into place whole, so a readable header means a whole file)."""
    from safetensors import safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is rebuilt
        return False
    return meta.get("zebra_teacher_cache") == shard_label(key, start, stop)


# ------------------------------------------------------------------------------------------------ ranks
def process_rank(world: int) -> int:
    """This process's rank among the `world` that build the cache (one per GPU, started by torchrun or srun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for var in ("RANK", "SLURM_PROCID"):
        if var in os.environ:
            rank = int(os.environ[var])
            break
    else:
        rank = 0
    if world > 1 and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != world:
        raise StageError(f"trainer.devices x trainer.num_nodes = {world} but the launcher started "
                         f"{os.environ['WORLD_SIZE']} processes")
    return rank


def join_process_group(world: int) -> None:
    if world > 1 and "MASTER_ADDR" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def build_device(cfg: DictConfig) -> torch.device:
    acc = str(cfg.trainer.accelerator)
    if torch.cuda.is_available() and acc in ("gpu", "cuda", "auto"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def check_disk(directory: Path, need: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if need > free:
        raise StageError(f"the teacher cache needs {need / 2**30:.2f} GiB more ({what}) but {directory} has "
                         f"{free / 2**30:.2f} GiB free: free disk space, lower teacher_cache.top_k or tail_samples, "
                         "store teacher_cache.logprob_dtype=bf16, or move paths.root")


# ------------------------------------------------------------------------------------------------ build
def build(cfg: DictConfig, rank: int | None = None, world: int | None = None) -> dict:
    """This rank's shards of the cache (the finished ones kept); rank 0 then writes the manifest once every shard
    exists. Returns the manifest plus this rank's build numbers."""
    from tqdm import tqdm

    from zebra.stages.kd import load_kd_teacher

    start_time = time.perf_counter()
    cc = cfg.teacher_cache
    world = world_size(cfg) if world is None else world
    rank = process_rank(world) if rank is None else rank
    vocab = int(cfg.model.base.vocab_size)
    check_settings(cfg, vocab)
    tokenizer = load_model_tokenizer(cfg.model.tokenizer)
    dm, rows = kd_rows(cfg, tokenizer)
    ident = identity(cfg, dm, tokenizer, vocab)
    key = artifacts.stage_hash(cfg, "teacher_cache")
    out = cache_dir(cfg)
    ranges = shard_ranges(len(rows), int(cc.rows_per_shard))
    mine = [i for i in range(len(ranges)) if i % world == rank]
    todo = [i for i in mine if not shard_is_complete(out / shard_name(i), key, *ranges[i])]
    seq_len, bpt = int(cfg.kd.seq_len), bytes_per_token(cc.top_k, cc.logprob_dtype, cc.tail_samples)
    total_bytes = len(rows) * seq_len * bpt
    # every rank writes to the same directory (one file system): what all ranks still have to write must fit
    left = [i for i in range(len(ranges)) if not shard_is_complete(out / shard_name(i), key, *ranges[i])]
    left_rows = sum(ranges[i][1] - ranges[i][0] for i in left)
    log.info("teacher cache %s: %d rows x %d tokens x %d bytes/token (k=%d, %d tail samples, %s) = %.3f GiB; %d of "
             "%d shards to build (%d on this rank)", out, len(rows), seq_len, bpt, int(cc.top_k),
             int(cc.tail_samples), cc.logprob_dtype, total_bytes / 2**30, len(left), len(ranges), len(todo))
    check_disk(out, left_rows * seq_len * bpt, f"{left_rows} rows x {seq_len} tokens x {bpt} bytes/token")
    built_tokens, build_seconds = 0, 0.0
    if todo:
        device = build_device(cfg)
        teacher = load_kd_teacher(cfg, tokenizer, vocab, teacher_dtype(cfg), device)
        quantisation = teacher.quantisation
        bar = tqdm(total=sum(ranges[i][1] - ranges[i][0] for i in todo) * seq_len, unit="tok", unit_scale=True,
                   desc=f"teacher cache (rank {rank})", disable=not cfg.trainer.enable_progress_bar)
        t0 = time.perf_counter()
        for i in todo:
            a, b = ranges[i]
            write_shard(out / shard_name(i), build_shard(teacher.model, rows, a, b, cc, ident["temperature"],
                                                         device), key, a, b)
            built_tokens += (b - a) * seq_len
            bar.update((b - a) * seq_len)
        bar.close()
        build_seconds = time.perf_counter() - t0
        del teacher
    else:
        from zebra.compose.teacher import quantisation_of

        quantisation = quantisation_of(str(cfg.model.kd_teacher))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    manifest = {**ident, "cache": key, "rows_per_shard": int(cc.rows_per_shard), "num_shards": len(ranges),
                "bytes_per_token": bpt, "bytes": total_bytes, "teacher_quantisation": quantisation}
    if rank == 0:
        missing = [shard_name(i) for i in range(len(ranges))
                   if not shard_is_complete(out / shard_name(i), key, *ranges[i])]
        if missing:
            raise StageError(f"teacher cache {out}: {len(missing)} shards missing after this run (e.g. {missing[:3]})"
                             f": the other ranks' builds did not finish; run the stage again to build them")
        files.write_json_atomic(out / "manifest.json", manifest)
    return {**manifest, "shards_built_here": len(todo), "tokens_built_here": built_tokens,
            "build_seconds": round(build_seconds, 3),
            "tokens_per_second": round(built_tokens / build_seconds, 1) if build_seconds else None,
            "wall_seconds": round(time.perf_counter() - start_time, 3)}


def run(cfg: DictConfig) -> dict:
    world = world_size(cfg)
    join_process_group(world)
    rank = process_rank(world)
    report = build(cfg, rank, world)
    if rank != 0:
        return report
    report = {"stage": "teacher_cache", "config_hash": report["cache"], "cache_dir": str(cache_dir(cfg)), **report}
    manifest = cache_dir(cfg) / "manifest.json"
    report = artifacts.finish(cfg, "teacher_cache", None, report,
                              outputs=lambda tmp: shutil.copyfile(manifest, tmp / "manifest.json"))
    log.info("teacher cache done: %s (%.1f bytes/token, %.3f GiB)", report["cache_dir"], report["bytes_per_token"],
             report["bytes"] / 2**30)
    return report


# ------------------------------------------------------------------------------------------------ reading
class TeacherCache:
    """A finished cache, read row by row (memory-mapped safetensors shards, opened lazily in each process)."""

    def __init__(self, directory: Path | str):
        self.dir = Path(directory)
        with open(self.dir / "manifest.json") as f:
            self.manifest = json.load(f)
        self.rows_per_shard = int(self.manifest["rows_per_shard"])
        # a manifest without the key (written before tail samples existed) has none
        self.tensors = {**_TENSORS, **(_SAMPLE_TENSORS if int(self.manifest.get("tail_samples", 0)) else {})}
        self._open: dict[int, object] = {}

    def __getstate__(self):  # DataLoader workers reopen the shards themselves
        return {**self.__dict__, "_open": {}}

    def _shard(self, i: int):
        from safetensors import safe_open

        if i not in self._open:
            self._open[i] = safe_open(str(self.dir / shard_name(i)), framework="pt")
        return self._open[i]

    def row(self, r: int) -> dict[str, torch.Tensor]:
        if not 0 <= r < int(self.manifest["num_rows"]):
            raise IndexError(f"row {r} is outside the teacher cache's {self.manifest['num_rows']} rows")
        f, j = self._shard(r // self.rows_per_shard), r % self.rows_per_shard
        return {key: f.get_slice(name)[j:j + 1][0] for key, name in self.tensors.items()}


def open_for_kd(cfg: DictConfig, dm, tokenizer, vocab_size: int) -> TeacherCache:
    """The cache this KD run reads, checked against its data, tokenizer, shapes, temperature, k and tail samples."""
    run_ident = identity(cfg, dm, tokenizer, vocab_size)
    d = cache_dir(cfg)
    if (d / "manifest.json").is_file():
        cache = TeacherCache(d)
        diffs = differences(cache.manifest, run_ident)
        if diffs:
            raise TeacherCacheMismatchError(f"the teacher cache {d} does not match this KD run: {'; '.join(diffs)}")
        return cache
    others = sorted(artifacts.stage_dir(cfg, "teacher_cache").glob("*/manifest.json"))
    near = []
    for m in others:
        with open(m) as f:
            near.append(f"{m.parent.name} ({'; '.join(differences(json.load(f), run_ident)) or 'settings differ'})")
    hint = f"; caches there were built for other settings: {', '.join(near)}" if near else ""
    raise MissingArtifactError(
        f"kd.teacher_source=cache but no finished teacher cache exists for this config at {d} (run `python train.py "
        f"stage=teacher_cache` first with the same model/data/kd/teacher_cache settings){hint}")


class CachedTeacherRows(torch.utils.data.Dataset):
    """A split's packed rows, each with the teacher's cached top-k beside its tokens."""

    def __init__(self, rows, cache: TeacherCache):
        self.rows, self.cache = rows, cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, torch.Tensor]:
        return {**self.rows[r], **self.cache.row(r)}


class CachedTeacherData(pl.LightningDataModule):
    """KD's token-mixture DataModule with the cached teacher values in each batch: the same sampler (order, rank
    sharding, exact resume), so each rank streams the cache rows of its own batches."""

    def __init__(self, dm, cache: TeacherCache):
        super().__init__()
        self.dm, self.cache = dm, cache

    def setup(self, stage: str | None = None) -> None:
        self.dm.trainer = self.trainer
        self.dm.setup(stage)

    def train_dataloader(self) -> ResumableDataLoader:
        loader = self.dm.train_dataloader(*world_info(self.trainer))
        return ResumableDataLoader(CachedTeacherRows(loader.dataset, self.cache), loader.sampler,
                                   data_id=loader.data_id, collate_fn=collate_rows, num_workers=self.dm.num_workers,
                                   pin_memory=self.dm.pin_memory, persistent_workers=self.dm.num_workers > 0)
