"""Splitting, token-weighted mixing and packing of tokenised documents (numpy over document lengths).

- Split: each source's documents are shuffled with (seed, source identity); the last `heldout` of them
  are held out, the first `ild_fraction` of the rest go to "ilkd", the remainder to "kd". A conversation
  therefore lives in exactly one split, whatever the other sources, seq_len or weights are.
- Mix: source i contributes about `weight_i / sum(weights)` of the split's tokens (the split's natural
  size is kept): whole documents are taken in shuffled order until its share is reached, going through
  fresh shuffles of the source when it must be up-sampled. The chosen documents are then interleaved in
  a seeded random order.
- Pack: the documents are laid end to end and cut into rows of exactly `seq_len` tokens. A document
  that crosses a row boundary continues in the next row; each piece starts at position 0 (the model
  never sees the previous row, so a piece is a document of its own). The final partial row is KEPT and
  padded: its filler has attention_mask 0, loss_mask 0 and positions 0.. of its own, so even a consumer
  that ignores attention_mask keeps pads out of the real documents.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zebra.errors import DataError

from .cache import DocStore

SPLITS = ("ilkd", "kd", "heldout")


def split_documents(
    n_docs: int, seed: int, source_seed: int, ild_fraction: float, heldout_fraction: float, heldout_max_docs: int | None
) -> dict[str, np.ndarray]:
    """Disjoint document indices of one source per split."""
    order = np.random.default_rng([seed, source_seed]).permutation(n_docs)
    n_held = int(np.ceil(heldout_fraction * n_docs)) if heldout_fraction > 0 else 0
    if heldout_max_docs is not None:
        n_held = min(n_held, heldout_max_docs)
    n_held = min(n_held, max(n_docs - 1, 0))  # never leave training without data
    n_train = n_docs - n_held
    n_ild = int(round(ild_fraction * n_train))
    return {"ilkd": order[:n_ild], "kd": order[n_ild:n_train], "heldout": order[n_train:]}


def mix_documents(
    docs: list[np.ndarray], lengths: list[np.ndarray], weights: list[float], seed: int, shuffle: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(source index, document index) of every document of the mixture, in packing order."""
    totals = [int(lengths[i][d].sum()) for i, d in enumerate(docs)]
    grand = sum(totals)
    w = np.asarray(weights, dtype=np.float64)
    targets = np.rint(w / w.sum() * grand)  # whole tokens: float error must not add a stray document
    srcs, ids = [], []
    for i, (d, total) in enumerate(zip(docs, totals)):
        if total == 0:
            raise DataError(f"data source #{i} has no tokens in this split ({len(d)} documents: give it more "
                            "documents, or this split a larger share of them)")
        taken, passes, rest = [], 0, targets[i]
        while rest > 0:  # whole passes while the share exceeds them, then a prefix of a fresh shuffle
            order = d if passes == 0 else np.random.default_rng([seed, i, passes]).permutation(d)
            cum = np.cumsum(lengths[i][order])
            k = min(int(np.searchsorted(cum, rest, side="left")) + 1, len(order))
            taken.append(order[:k])
            rest -= cum[k - 1]
            passes += 1
        ids.append(np.concatenate(taken))
        srcs.append(np.full(len(ids[-1]), i, dtype=np.int32))
    src, doc = np.concatenate(srcs), np.concatenate(ids)
    if shuffle and len(docs) > 1:  # one source keeps its already shuffled order
        perm = np.random.default_rng([seed, len(docs)]).permutation(len(src))
        src, doc = src[perm], doc[perm]
    return src, doc


@dataclass
class Layout:
    """Where each mixed document lies in the packed token stream."""

    src: np.ndarray  # [n] source of each document, in stream order
    doc: np.ndarray  # [n] document index inside its source
    ends: np.ndarray  # [n] cumulative end offset of each document in the stream
    seq_len: int

    @property
    def num_tokens(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    @property
    def num_rows(self) -> int:
        return -(-self.num_tokens // self.seq_len)


def layout(src: np.ndarray, doc: np.ndarray, stores: list[DocStore], seq_len: int) -> Layout:
    lengths = np.zeros(len(src), dtype=np.int64)
    for i, store in enumerate(stores):
        sel = src == i
        lengths[sel] = store.lengths[doc[sel]]
    return Layout(src, doc, np.cumsum(lengths), seq_len)


class PackedRows(torch.utils.data.Dataset):
    """Row r of the packed stream as a token-mixture batch item (the keys zebra.data.sft documents)."""

    def __init__(self, lay: Layout, stores: list[DocStore], pad_id: int, assistant_only: bool = False):
        self.lay, self.stores, self.pad_id, self.assistant_only = lay, stores, int(pad_id), assistant_only

    def __len__(self) -> int:
        return self.lay.num_rows

    def pieces(self, r: int):
        """(source, doc, start, stop) of the document pieces in row r (start/stop inside the document)."""
        L, ends = self.lay.seq_len, self.lay.ends
        lo, hi = r * L, min((r + 1) * L, self.lay.num_tokens)
        k = int(np.searchsorted(ends, lo, side="right"))
        while lo < hi:
            begin = ends[k] - self.stores[self.lay.src[k]].lengths[self.lay.doc[k]]
            stop = min(ends[k], hi)
            if stop > lo:  # empty documents take no room
                yield int(self.lay.src[k]), int(self.lay.doc[k]), int(lo - begin), int(stop - begin)
            lo = stop
            k += 1

    def __getitem__(self, r: int) -> dict[str, torch.Tensor]:
        if not 0 <= r < len(self):
            raise IndexError(r)
        L = self.lay.seq_len
        ids = np.full(L, self.pad_id, dtype=np.int64)
        pos = np.zeros(L, dtype=np.int64)
        loss = np.zeros(L, dtype=bool)
        t = 0
        for s, d, a, b in self.pieces(r):
            n = b - a
            ids[t : t + n] = self.stores[s].column("input_ids", d)[a:b]
            pos[t : t + n] = np.arange(n)
            # position t predicts token t+1: it counts when that token is in the same piece (and, with
            # assistant_only, an assistant token); a piece's last token has no target in this row
            if self.assistant_only:
                loss[t : t + n - 1] = self.stores[s].column("train_mask", d)[a + 1 : b] > 0
            else:
                loss[t : t + n - 1] = True
            t += n
        attn = np.zeros(L, dtype=np.int64)
        attn[:t] = 1
        pos[t:] = np.arange(L - t)  # filler: its own pseudo-document
        return {
            "input_ids": torch.from_numpy(ids),
            "position_ids": torch.from_numpy(pos),
            "loss_mask": torch.from_numpy(loss),
            "attention_mask": torch.from_numpy(attn),
        }
