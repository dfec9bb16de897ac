"""TokenMixtureDataModule: SFT chat data (or plain text) -> packed token-mixture batches.

    dm = TokenMixtureDataModule(sources=[{"path": "shipped:sft"}], seq_len=512, batch_size=4, split="kd")
    dm.setup()
    batch = next(iter(dm.train_dataloader()))   # input_ids, position_ids, loss_mask, attention_mask [B, T]

Data flow (each step documented in its module): sources.py loads raw examples and maps their fields to
conversations -> formatting.py renders and tokenises them (cache.py keeps the result on disk) ->
packing.py splits documents into ilkd / kd / heldout, mixes sources by token weight and packs rows ->
sampling.py orders, shards and resumes the rows.

`batch_size` is per rank (Lightning's convention); the global batch is batch_size x world_size (x
gradient accumulation), and its rows do not depend on how it is spread over ranks.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import datasets
import lightning.pytorch as pl
import torch
from datasets import Features, List, Value
from torch.utils.data import DataLoader

from zebra.compose.teacher import cache_root
from zebra.errors import DataError

from .cache import DocStore, build_cached, is_cached, stable_hash
from .formatting import format_conversations, format_texts
from .packing import SPLITS, PackedRows, layout, mix_documents, split_documents
from .sampling import GlobalOrderSampler, ResumableDataLoader
from .sources import Source, as_spec_list
from .tokenizers import LazyTokenizer

log = logging.getLogger(__name__)

DOC_FEATURES = Features({"input_ids": List(Value("int32")), "train_mask": List(Value("int8"))})
DEFAULT_SOURCES = ({"path": "shipped:sft"},)


def _tokenize_batch(batch: dict, source: Source, tokenizer, chat_template: str) -> dict:
    """datasets.map function: raw examples -> input_ids + train_mask (assistant tokens; all for text)."""
    items = source.examples_to_conversations(batch)
    if source.kind == "text":
        out = format_texts(tokenizer, items)
    else:
        out = format_conversations(tokenizer, items, chat_template)
    return {"input_ids": [f.input_ids for f in out], "train_mask": [f.assistant_mask for f in out]}


def world_info(trainer=None) -> tuple[int, int]:
    """(global rank, world size) from the attached Trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def collate_rows(items: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class TokenMixtureDataModule(pl.LightningDataModule):
    """Packed token-mixture batches for the ilkd / smart / kd stages.

    Args:
        sources: list of source dicts (see sources.py); default: the shipped SFT set.
        tokenizer: tokenizer object or spec (zebra.compose.teacher.load_tokenizer: embedded name, GGUF file,
            directory, hub id); None = the embedded SmolLM2 tokenizer.
        chat_template: "tokenizer" (its own template) or "reference" (simplified Llama-3, METHOD §6).
        seq_len: tokens per packed row.
        batch_size: rows per batch on each rank.
        split: which split the train dataloader serves: "ilkd", "kd" or "heldout".
        ild_fraction: share of each source's (non-held-out) conversations that goes to "ilkd".
        heldout_fraction, heldout_max_docs: conversations per source held out from both training splits
            (ceil(fraction * n), at most heldout_max_docs, at least one when fraction > 0).
        seed: seeds the split, the mixture and the row order.
        max_tokens: training budget in row tokens (seq_len per row, padding included) per epoch; the row
            stream runs into fresh shuffled passes when it exceeds the data. None = one pass.
        assistant_only: loss_mask only on predictions of assistant tokens (default: all tokens).
        num_workers, pin_memory: DataLoader options.
        cache_dir: tokenised-data cache (default `$ZEBRA_CACHE/data`, i.e. ~/.cache/zebra/data).
        num_proc: processes for tokenising (default: up to 8 for sources of more than 20k examples).
    """

    def __init__(
        self,
        sources: list[dict | str] | None = None,
        tokenizer=None,
        chat_template: str = "tokenizer",
        seq_len: int = 2048,
        batch_size: int = 8,
        split: str = "kd",
        ild_fraction: float = 0.2,
        heldout_fraction: float = 0.05,
        heldout_max_docs: int | None = 1000,
        seed: int = 42,
        max_tokens: int | None = None,
        assistant_only: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | os.PathLike | None = None,
        num_proc: int | None = None,
    ):
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if chat_template not in ("tokenizer", "reference"):
            raise ValueError(f"unknown chat_template {chat_template!r}; expected 'tokenizer' or 'reference'")
        if seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be >= 2 and batch_size >= 1 (got {seq_len}, {batch_size})")
        if not 0 <= ild_fraction <= 1 or not 0 <= heldout_fraction < 1:
            raise ValueError(
                f"need 0 <= ild_fraction <= 1 and 0 <= heldout_fraction < 1 (got {ild_fraction}, {heldout_fraction})"
            )
        self.sources = [Source.from_spec(s) for s in as_spec_list(sources, DEFAULT_SOURCES)]  # checks paths early
        if not self.sources:
            raise ValueError("no data sources given")
        self.chat_template = chat_template
        # only chat sources are formatted with a chat template, so only they need the tokenizer to have one
        self._tokenizer = LazyTokenizer(tokenizer, chat_template if any(s.kind == "chat" for s in self.sources)
                                        else None)
        self.seq_len, self.batch_size, self.split = int(seq_len), int(batch_size), split
        self.ild_fraction, self.heldout_fraction = ild_fraction, heldout_fraction
        self.heldout_max_docs = heldout_max_docs
        self.seed, self.max_tokens, self.assistant_only = int(seed), max_tokens, assistant_only
        self.num_workers, self.pin_memory, self.num_proc = num_workers, pin_memory, num_proc
        self.cache_dir = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
        self._stores: list[DocStore] | None = None
        self._rows: dict[str, PackedRows] = {}

    # ---------------------------------------------------------------- tokenising (cached)
    def _tokenizer_fp(self) -> str:
        return self._tokenizer.fingerprint()

    @property
    def tokenizer(self):
        return self._tokenizer.get()

    def _cache_paths(self) -> list[Path]:
        tok = self._tokenizer_fp()
        keys = [stable_hash([s.identity(), tok, self.chat_template if s.kind == "chat" else None])
                for s in self.sources]  # fmt: skip
        return [self.cache_dir / "tokenized" / k for k in keys]

    def prepare_data(self) -> None:
        """Tokenise every source not yet cached (Lightning runs this on one process per node)."""
        for source, path in zip(self.sources, self._cache_paths()):
            build_cached(path, functools.partial(self._tokenize_source, source))

    def _tokenize_source(self, source: Source, scratch: Path) -> datasets.Dataset:
        raw = source.load(cache_dir=self.cache_dir / "raw")
        num_proc = self.num_proc
        if num_proc is None and len(raw) > 20_000:  # worker start-up costs more than small sources take
            num_proc = min(8, os.cpu_count() or 1)
        log.info("tokenising %s (%d examples)", source.description, len(raw))
        return raw.map(
            _tokenize_batch,
            fn_kwargs={"source": source, "tokenizer": self.tokenizer, "chat_template": self.chat_template},
            batched=True,
            batch_size=256,
            remove_columns=raw.column_names,
            features=DOC_FEATURES,
            num_proc=num_proc,
            cache_file_name=str(scratch / "map.arrow"),
            new_fingerprint=scratch.name,  # skips hashing the tokenizer; the cache key already names it
            desc=f"tokenising {source.description}",
        )

    # ---------------------------------------------------------------- splits and rows
    def setup(self, stage: str | None = None) -> None:
        if self._stores is None:
            self._load()
        if stage == "fit":  # fail before training starts when the served split cannot fill a batch
            self.num_batches(world_info(self.trainer)[1])

    def _load(self) -> None:
        paths = self._cache_paths()
        if not all(is_cached(p) for p in paths):
            self.prepare_data()  # used without a Trainer, or a rank whose node-local cache is missing
        self._stores = [DocStore(p, ("input_ids", "train_mask")) for p in paths]
        for source, store in zip(self.sources, self._stores):
            if len(store) == 0 or int(store.lengths.sum()) == 0:
                raise DataError(f"data source {source.description} has no tokens after formatting (its records are "
                                "empty: check the file and its text_field / messages_field)")
        # each source is split on its own, seeded by its identity: adding a source never moves another's split
        self._splits = [
            split_documents(
                len(store), self.seed, int(source.identity()[:8], 16),
                self.ild_fraction, self.heldout_fraction, self.heldout_max_docs,
            )  # fmt: skip
            for source, store in zip(self.sources, self._stores)
        ]

    def rows(self, split: str | None = None) -> PackedRows:
        """The packed rows of a split (the served one by default)."""
        split = split or self.split
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if self._stores is None:
            self._load()
        if split not in self._rows:
            docs = [s[split] for s in self._splits]
            lengths = [st.lengths for st in self._stores]
            for source, d, l in zip(self.sources, docs, lengths):
                if len(d) == 0 or int(l[d].sum()) == 0:
                    raise ValueError(
                        f"data source {source.description} has no tokens in split {split!r} ({len(d)} of its "
                        f"{len(l)} documents); add data or change ild_fraction / heldout_fraction"
                    )
            if split == "heldout":  # evaluation data: every held-out document once, no re-weighting
                weights = [float(l[d].sum()) for l, d in zip(lengths, docs)]
            else:
                weights = [s.weight for s in self.sources]
            src, doc = mix_documents(docs, lengths, weights, self.seed)
            self._rows[split] = PackedRows(
                layout(src, doc, self._stores, self.seq_len), self._stores, self._pad_id(), self.assistant_only
            )
        return self._rows[split]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for i in (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id):
            if i is not None:
                return int(i)
        return 0

    def num_tokens(self, split: str | None = None) -> int:
        """Real (non-pad) tokens of a split after mixing."""
        return self.rows(split).lay.num_tokens

    def data_id(self, split: str | None = None) -> str:
        """Names the row stream of a split; a resumed run must see the same."""
        split = split or self.split
        return stable_hash(
            [[s.identity(), s.weight] for s in self.sources]
            + [self._tokenizer_fp(), self.chat_template, self.seq_len, self.seed]
            + [self.ild_fraction, self.heldout_fraction, self.heldout_max_docs, split, self.assistant_only]
        )

    # ---------------------------------------------------------------- loaders
    def num_batches(self, world_size: int = 1) -> int:
        """Batches per rank in one epoch (the same for every rank)."""
        rows = self.rows()
        global_batch = self.batch_size * world_size
        need = global_batch * self.seq_len
        if rows.lay.num_tokens < need:
            raise ValueError(
                f"split {self.split!r} has {rows.lay.num_tokens} tokens, fewer than one global batch of "
                f"seq_len x batch_size x world_size = {self.seq_len} x {self.batch_size} x {world_size} = {need}"
            )
        if self.max_tokens is None:
            return len(rows) // global_batch
        n = int(self.max_tokens) // need
        if n == 0:
            raise ValueError(f"max_tokens={self.max_tokens} is less than one global batch ({need} tokens)")
        return n

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> ResumableDataLoader:
        """This rank's share of the served split; resumable (state_dict / load_state_dict)."""
        if rank is None or world_size is None:
            rank, world_size = world_info(self.trainer)
        rows = self.rows()
        sampler = GlobalOrderSampler(
            len(rows), self.batch_size, self.num_batches(world_size), rank, world_size, seed=self.seed
        )
        return ResumableDataLoader(
            rows, sampler, data_id=self.data_id(), collate_fn=collate_rows,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
        )  # fmt: skip

    def heldout_dataloader(self, batch_size: int | None = None) -> DataLoader:
        """All held-out rows in a fixed order (not sharded; the last batch may be smaller)."""
        return DataLoader(
            self.rows("heldout"), batch_size=batch_size or self.batch_size, shuffle=False, collate_fn=collate_rows,
            num_workers=self.num_workers,
        )  # fmt: skip

    def calibration_batches(self, n_tokens: int, batch_size: int | None = None, split: str = "heldout") -> list[dict]:
        """The first ceil(n_tokens / seq_len) rows of a split (default: held-out), batched, for SMART."""
        rows = self.rows(split)
        n_rows = -(-int(n_tokens) // self.seq_len)
        if n_rows > len(rows):
            raise ValueError(
                f"calibration wants {n_tokens} tokens ({n_rows} rows of {self.seq_len}) but split {split!r} "
                f"has {len(rows)} rows ({rows.lay.num_tokens} tokens); raise heldout_fraction / heldout_max_docs "
                "or ask for fewer tokens"
            )
        bs = batch_size or self.batch_size
        items = [rows[i] for i in range(n_rows)]
        return [collate_rows(items[i : i + bs]) for i in range(0, n_rows, bs)]
