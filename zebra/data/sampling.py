"""Deterministic global batch order, rank sharding and exact resume.

The global order is a stream of row slots: slot p reads row `perm_k[p mod N]` of pass k = p // N, where
perm_k is a seeded permutation of the N rows. Global batch g is slots [g*G, (g+1)*G) with
G = batch_size * world_size, and rank r takes the contiguous slice [g*G + r*B, g*G + (r+1)*B). So the
global batches do not depend on how they are spread over ranks (world 2 x batch 4 == world 1 x batch 8),
and the stream continues across passes when a token budget asks for more than one pass. Lightning epoch e
is the window of `num_batches` global batches starting at batch e * num_batches.

Resume (Lightning >= 2.3 saves `state_dict()` of every train dataloader that has one in
`loops.fit_loop.state_dict.combined_loader` and calls `load_state_dict()` before its first `iter()` on
`fit(ckpt_path=...)`): the loader counts the batches it has handed out (not those its workers prefetched)
and the sampler starts the restored epoch at that batch. Lightning does not prefetch from loaders with a
length, so the count at checkpoint time is exactly the number of trained batches.

The sampler subclasses DistributedSampler so Lightning keeps it instead of injecting its own.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import DataLoader, DistributedSampler

from zebra.errors import ConfigError


class GlobalOrderSampler(DistributedSampler):
    def __init__(
        self, num_rows: int, batch_size: int, num_batches: int, rank: int = 0, world_size: int = 1,
        seed: int = 0, shuffle: bool = True,
    ):  # fmt: skip
        super().__init__(
            range(num_rows), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True
        )
        self.num_rows, self.batch_size, self.num_batches = num_rows, batch_size, num_batches
        self.global_batch = batch_size * world_size
        self._resume: tuple[int, int] | None = None  # (epoch, first batch) set by a restored state
        self.start_batch = 0  # first batch of the running epoch's iteration
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def resume_at(self, epoch: int, batch: int) -> None:
        self.epoch = epoch
        self._resume = (epoch, batch)
        self.start_batch = batch

    def _rows(self, slots: np.ndarray) -> np.ndarray:
        passes, within = np.divmod(slots, self.num_rows)
        out = np.empty_like(slots)
        for k in np.unique(passes):
            if not self.shuffle:
                perm = np.arange(self.num_rows)
            else:
                if int(k) not in self._perms:
                    self._perms = {int(k): np.random.default_rng([self.seed, int(k)]).permutation(self.num_rows)}
                perm = self._perms[int(k)]
            sel = passes == k
            out[sel] = perm[within[sel]]
        return out

    def global_rows(self, epoch: int, batch: int) -> np.ndarray:
        """All rows of global batch `batch` of `epoch`, in rank order (for tests and inspection)."""
        g = epoch * self.num_batches + batch
        return self._rows(np.arange(g * self.global_batch, (g + 1) * self.global_batch))

    def __iter__(self):
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        self.start_batch = start
        g = self.epoch * self.num_batches + np.arange(start, self.num_batches)
        slots = g[:, None] * self.global_batch + self.rank * self.batch_size + np.arange(self.batch_size)[None]
        return iter(self._rows(slots.reshape(-1)).tolist())


class ResumableDataLoader(DataLoader):
    """A DataLoader over a GlobalOrderSampler with `state_dict()` / `load_state_dict()` for exact resume."""

    def __init__(self, dataset, sampler: GlobalOrderSampler, data_id: str = "", **kwargs):
        super().__init__(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True, **kwargs)
        self.data_id = data_id  # what the rows are; a checkpoint from other data must not resume here
        self._consumed = 0

    def __iter__(self):
        iterator = super().__iter__()  # pulls indices from the sampler, which fixes start_batch
        self._consumed = self.sampler.start_batch
        for batch in iterator:
            self._consumed += 1
            yield batch

    def state_dict(self) -> dict:
        s = self.sampler
        return {
            "epoch": int(s.epoch),
            "rows_consumed": self._consumed * s.global_batch,
            "global_batch_rows": s.global_batch,
            "num_rows": s.num_rows,
            "num_batches": s.num_batches,
            "seed": s.seed,
            "data_id": self.data_id,
        }

    def load_state_dict(self, state: dict) -> None:
        s = self.sampler
        if state.get("data_id") != self.data_id or state.get("num_rows") != s.num_rows or state.get("seed") != s.seed:
            raise ConfigError(
                "the checkpoint's data position belongs to different data (data id, row count or seed differ: "
                f"checkpoint {state.get('data_id')}/{state.get('num_rows')}/{state.get('seed')}, "
                f"now {self.data_id}/{s.num_rows}/{s.seed}); start a new run or restore the data config"
            )
        if state.get("global_batch_rows") != s.global_batch:
            raise ConfigError(
                f"cannot resume the data position: the checkpoint used a global batch of "
                f"{state.get('global_batch_rows')} rows, this run {s.global_batch} (batch_size x world_size); "
                "keep batch_size x world_size fixed when resuming"
            )
        batch = int(state["rows_consumed"]) // s.global_batch
        s.resume_at(int(state["epoch"]), batch)
        self._consumed = batch
