"""PreferenceDataModule: (prompt, chosen, rejected) -> chat-formatted DPO batches.

Accepted record shapes (field names configurable):
- prompt: a string (one user turn) or a list of messages;
- chosen / rejected: a string (the assistant reply) or a list of messages; when the list repeats the
  prompt's messages first (UltraFeedback-binarised style), those are dropped; a missing prompt field
  means the prompt is the common prefix of the two lists (Anthropic HH style);
- system (optional, `system_field`): a system prompt put before the prompt (Orca DPO pairs style).

Each side is tokenised as prompt (with the generation prompt) + reply; the reply runs through the
closing end-of-turn token. Tokenised pieces are cached untruncated, so changing the limits is free.
Truncation follows TRL's DPO rule: when prompt + longer reply exceeds `max_length`, the prompt keeps its
last `max_prompt_length` tokens (cut from the left, keeping a leading bos); if still too long, both
replies are cut from the right to fit `max_length`.

Batches: chosen_/rejected_ input_ids, attention_mask, loss_mask [B, T], right-padded to
one common T so a stage can stack chosen and rejected. loss_mask marks the reply tokens themselves
(labels): the log-prob of token t comes from the logits at t - 1.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import datasets
import lightning.pytorch as pl
import numpy as np
import torch
from datasets import Features, List, Value
from torch.utils.data import DataLoader

from zebra.compose.teacher import cache_root
from zebra.errors import ConfigError, DataError

from .cache import DocStore, build_cached, is_cached, stable_hash
from .formatting import format_completions
from .sampling import GlobalOrderSampler, ResumableDataLoader
from .sft import world_info
from .sources import Source, as_spec_list, normalise_messages
from .tokenizers import LazyTokenizer

PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
PAIR_FEATURES = Features(
    {c: List(Value("int8" if c.endswith("mask") else "int32")) for c in PAIR_COLUMNS}
)
DEFAULT_SOURCE = {"path": "shipped:preferences"}


def split_record(prompt, chosen, rejected, where: str = "preference data"):
    """(prompt messages, chosen reply messages, rejected reply messages) of one record."""
    def reply(v):
        return [{"role": "assistant", "content": v}] if isinstance(v, str) else normalise_messages(v, where)

    c, r = reply(chosen), reply(rejected)
    if prompt is None:  # the prompt is what the two conversations share
        k = 0
        while k < min(len(c), len(r)) - 1 and c[k] == r[k]:
            k += 1
        p, c, r = c[:k], c[k:], r[k:]
    else:
        p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else normalise_messages(prompt, where)
        if c[: len(p)] == p:
            c = c[len(p) :]
        if r[: len(p)] == p:
            r = r[len(p) :]
    if not p or not c or not r or c[0]["role"] != "assistant" or r[0]["role"] != "assistant":
        raise DataError(f"{where}: a record needs a prompt and assistant replies (got prompt {p!r:.120})")
    # whitespace around a reply is formatting noise, and the reference template strips it anyway
    strip = lambda msgs: [{**m, "content": m["content"].strip()} for m in msgs]  # noqa: E731
    return p, strip(c), strip(r)


def _tokenize_pairs(batch: dict, source: Source, tokenizer, chat_template: str) -> dict:
    f = source.fields
    n = len(batch[f["chosen"]])
    prompts = batch[f["prompt"]] if f["prompt"] in batch else [None] * n
    triples = zip(prompts, batch[f["chosen"]], batch[f["rejected"]])
    recs = [split_record(p, c, r, source.description) for p, c, r in triples]
    if "system" in f:  # a non-empty system column becomes the prompt's first message
        recs = [
            ([{"role": "system", "content": str(s)}] + p if s and p[0]["role"] != "system" else p, c, r)
            for s, (p, c, r) in zip(batch[f["system"]], recs)
        ]
    out = {c: [] for c in PAIR_COLUMNS}
    for side, idx in (("chosen", 1), ("rejected", 2)):
        pairs = format_completions(tokenizer, [rec[0] for rec in recs], [rec[idx] for rec in recs], chat_template)
        for head, tail in pairs:
            mask = tail.assistant_mask
            last = max((i for i, m in enumerate(mask) if m), default=len(mask) - 1)
            out[f"{side}_ids"].append(tail.input_ids[: last + 1])  # drop template text after the end-of-turn
            out[f"{side}_mask"].append(mask[: last + 1])
            if side == "chosen":
                out["prompt_ids"].append(head.input_ids)
    return out


def truncate_pair(prompt: list, chosen: list, rejected: list, max_length: int, max_prompt_length: int, bos_id=None):
    """TRL's rule: prompt from the left first (keeping a leading bos), then both replies from the right."""
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest > max_length and len(prompt) > max_prompt_length:
        keep_bos = bos_id is not None and len(prompt) > 0 and prompt[0] == bos_id
        prompt = (prompt[:1] if keep_bos else prompt[:0]) + prompt[len(prompt) - max_prompt_length + keep_bos :]
    room = max_length - len(prompt)
    if len(prompt) + longest > max_length:
        chosen, rejected = chosen[:room], rejected[:room]
    return prompt, chosen, rejected


class PreferenceRecords(torch.utils.data.Dataset):
    def __init__(self, store: DocStore, indices: np.ndarray, max_length: int, max_prompt_length: int, bos_id):
        self.store, self.indices = store, indices
        self.max_length, self.max_prompt_length, self.bos_id = max_length, max_prompt_length, bos_id

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        col = lambda name: self.store.column(name, j).tolist()  # noqa: E731
        p, c, r = truncate_pair(
            col("prompt_ids"), col("chosen_ids"), col("rejected_ids"),
            self.max_length, self.max_prompt_length, self.bos_id,
        )  # fmt: skip
        cm, rm = col("chosen_mask")[: len(c)], col("rejected_mask")[: len(r)]
        return {"prompt": p, "chosen": c, "chosen_mask": cm, "rejected": r, "rejected_mask": rm}


def collate_pairs(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected sequences to one common length."""
    T = max(len(it["prompt"]) + max(len(it["chosen"]), len(it["rejected"])) for it in items)
    out = {}
    for side in ("chosen", "rejected"):
        ids = torch.full((len(items), T), pad_id, dtype=torch.long)
        attn = torch.zeros((len(items), T), dtype=torch.long)
        loss = torch.zeros((len(items), T), dtype=torch.bool)
        for b, it in enumerate(items):
            seq = it["prompt"] + it[side]
            ids[b, : len(seq)] = torch.tensor(seq)
            attn[b, : len(seq)] = 1
            loss[b, len(it["prompt"]) : len(seq)] = torch.tensor(it[f"{side}_mask"], dtype=torch.bool)
        out[f"{side}_input_ids"], out[f"{side}_attention_mask"], out[f"{side}_loss_mask"] = ids, attn, loss
    return out


class PreferenceDataModule(pl.LightningDataModule):
    """DPO batches from (prompt, chosen, rejected) records.

    Args:
        source: one source dict (sources.py; `prompt_field`, `chosen_field`, `rejected_field` name the
            columns), default: the shipped preference set. A list of dicts is accepted and concatenated.
        tokenizer, chat_template: as TokenMixtureDataModule.
        max_length: prompt + reply tokens per sequence (1024 in the reference).
        max_prompt_length: prompt tokens kept when a pair is too long (512).
        batch_size: pairs per batch on each rank.
        heldout_fraction: records held out (heldout_dataloader), from the end of a seeded shuffle.
        seed, num_workers, cache_dir, num_proc: as TokenMixtureDataModule.
    """

    def __init__(
        self,
        source: dict | str | list | None = None,
        tokenizer=None,
        chat_template: str = "tokenizer",
        max_length: int = 1024,
        max_prompt_length: int = 512,
        batch_size: int = 4,
        heldout_fraction: float = 0.0,
        seed: int = 42,
        num_workers: int = 0,
        cache_dir: str | os.PathLike | None = None,
        num_proc: int | None = None,
    ):
        super().__init__()
        if chat_template not in ("tokenizer", "reference"):
            raise ConfigError(f"unknown chat_template {chat_template!r}; expected 'tokenizer' or 'reference'")
        if not 0 < max_prompt_length < max_length:
            raise ConfigError(f"need 0 < max_prompt_length < max_length (got {max_prompt_length}, {max_length})")
        specs = as_spec_list(source, default=[DEFAULT_SOURCE])
        self.sources = [Source.from_spec(s, kind="preference") for s in specs]
        if not self.sources:
            raise ConfigError("no preference data source given")
        self._tokenizer = LazyTokenizer(tokenizer, chat_template)
        self.chat_template, self.max_length, self.max_prompt_length = chat_template, max_length, max_prompt_length
        self.batch_size, self.heldout_fraction, self.seed = batch_size, heldout_fraction, seed
        self.num_workers, self.num_proc = num_workers, num_proc
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
        self._records: dict[str, PreferenceRecords] | None = None

    def _tokenizer_fp(self) -> str:
        return self._tokenizer.fingerprint()

    @property
    def tokenizer(self):
        return self._tokenizer.get()

    def _cache_paths(self) -> list[Path]:
        tok = self._tokenizer_fp()
        keys = [stable_hash([s.identity(), tok, self.chat_template]) for s in self.sources]
        return [self.cache_dir / "preference" / k for k in keys]

    def prepare_data(self) -> None:
        for source, path in zip(self.sources, self._cache_paths()):
            build_cached(path, functools.partial(self._tokenize_source, source))

    def _tokenize_source(self, source: Source, scratch: Path) -> datasets.Dataset:
        raw = source.load(cache_dir=self.cache_dir / "raw")
        return raw.map(
            _tokenize_pairs,
            fn_kwargs={"source": source, "tokenizer": self.tokenizer, "chat_template": self.chat_template},
            batched=True, batch_size=256, remove_columns=raw.column_names, features=PAIR_FEATURES,
            num_proc=self.num_proc, cache_file_name=str(scratch / "map.arrow"), new_fingerprint=scratch.name,
            desc=f"tokenising {source.description}",
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self._records is None:
            self._load()
        if stage == "fit":  # fail before training starts when there is not one batch of data
            self.num_batches(world_info(self.trainer)[1])

    def _load(self) -> None:
        paths = self._cache_paths()
        if not all(is_cached(p) for p in paths):
            self.prepare_data()
        if len(paths) > 1:  # several sources: one cached concatenation keyed by their keys
            joined = self.cache_dir / "preference" / stable_hash([p.name for p in paths])
            parts = [datasets.load_from_disk(str(p)) for p in paths]
            build_cached(joined, lambda _: datasets.concatenate_datasets(parts))
            paths = [joined]
        store = DocStore(paths[0], PAIR_COLUMNS)
        n = len(store)
        order = np.random.default_rng(self.seed).permutation(n)
        n_held = int(np.ceil(self.heldout_fraction * n)) if self.heldout_fraction > 0 else 0
        bos = self.tokenizer.bos_token_id
        make = lambda idx: PreferenceRecords(store, idx, self.max_length, self.max_prompt_length, bos)  # noqa: E731
        self._records = {"train": make(np.sort(order[: n - n_held])), "heldout": make(np.sort(order[n - n_held :]))}
        self._data_id = stable_hash(
            [paths[0].name, self.seed, self.heldout_fraction, self.max_length, self.max_prompt_length]
        )

    def records(self, split: str = "train") -> PreferenceRecords:
        self.setup()
        return self._records[split]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return next((int(i) for i in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) if i is not None), 0)

    def num_batches(self, world_size: int = 1) -> int:
        n, global_batch = len(self.records()), self.batch_size * world_size
        if n < global_batch:
            raise DataError(
                f"the preference data has {n} training records, fewer than one global batch of "
                f"batch_size x world_size = {self.batch_size} x {world_size}"
            )
        return n // global_batch

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> ResumableDataLoader:
        if rank is None or world_size is None:
            rank, world_size = world_info(self.trainer)
        recs = self.records()
        n = self.num_batches(world_size)
        sampler = GlobalOrderSampler(len(recs), self.batch_size, n, rank, world_size, seed=self.seed)
        return ResumableDataLoader(
            recs, sampler, data_id=self._data_id, num_workers=self.num_workers,
            collate_fn=functools.partial(collate_pairs, pad_id=self._pad_id()),
        )  # fmt: skip

    def heldout_dataloader(self, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            self.records("heldout"), batch_size=batch_size or self.batch_size, shuffle=False,
            collate_fn=functools.partial(collate_pairs, pad_id=self._pad_id()), num_workers=self.num_workers,
        )  # fmt: skip
