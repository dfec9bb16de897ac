import time

import numpy as np
import pytest
import torch

import zebra.data.sft as sft_mod
from zebra.data import TokenMixtureDataModule, format_conversation
from zebra.data.sources import shipped_path


def _dm(tok, cache_dir, **kw):
    kw.setdefault("seq_len", 128)
    kw.setdefault("batch_size", 2)
    return TokenMixtureDataModule(tokenizer=tok, cache_dir=cache_dir, **kw)


def _piece_starts(pos):
    return [i for i in range(len(pos)) if pos[i] == 0]


def test_packing_keeps_documents_whole_and_in_order(tok, cache_dir, tmp_path, chat, write_jsonl):
    rows = [chat(i, words=3 + (i * 7) % 40) for i in range(60)]  # some longer than seq_len 64
    src = write_jsonl(tmp_path / "docs.jsonl", rows)
    dm = _dm(tok, cache_dir, sources=[{"path": str(src)}], seq_len=64, heldout_fraction=0.0, ild_fraction=0.0)
    packed = dm.rows("kd")
    lay = packed.lay
    stream, pieces = [], []
    for r in range(len(packed)):
        item = packed[r]
        ids, pos, attn, loss = (item[k].numpy() for k in ("input_ids", "position_ids", "attention_mask", "loss_mask"))
        real = int(attn.sum())
        assert attn[:real].all() and not attn[real:].any()  # padding only at the end of a row
        assert r == len(packed) - 1 or real == 64  # ...and only in the final row
        assert not loss[real:].any()
        starts = _piece_starts(pos[:real]) + [real]
        assert starts[0] == 0  # every row starts a piece
        for a, b in zip(starts, starts[1:]):
            assert (pos[a:b] == np.arange(b - a)).all()  # positions restart at 0 per piece
            assert loss[a : b - 1].all() and not loss[b - 1]  # the last token of a piece predicts nothing
            pieces.append(ids[a:b].tolist())
        stream += ids[:real].tolist()
    # the documents, formatted on their own, in the packing order: the stream is exactly their concatenation
    docs = [format_conversation(tok, rows[d]["messages"]).input_ids for d in lay.doc]
    assert stream == [t for d in docs for t in d]
    assert sorted(lay.doc.tolist()) == list(range(60))  # one source, weight 1: every document exactly once
    # each piece lies inside one document (a document continues in the next row, restarting at position 0)
    bounds = np.cumsum([0] + [len(d) for d in docs])
    offset = 0
    for p in pieces:
        k = int(np.searchsorted(bounds, offset, side="right")) - 1
        assert offset + len(p) <= bounds[k + 1]
        offset += len(p)


def test_assistant_only_loss_mask(tok, cache_dir, tmp_path, chat, write_jsonl):
    rows = [chat(i) for i in range(20)]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    dm = _dm(tok, cache_dir, sources=[{"path": str(src)}], assistant_only=True, heldout_fraction=0.0, ild_fraction=0.0)
    packed = dm.rows()
    n_loss = n_real = 0
    for r in range(len(packed)):
        item, t0 = packed[r], 0
        for _, d, a, b in packed.pieces(r):
            # position t counts when token t+1 is an assistant token of the same piece
            mask = format_conversation(tok, rows[d]["messages"]).assistant_mask
            assert item["loss_mask"][t0 : t0 + b - a].tolist() == [bool(m) for m in mask[a + 1 : b]] + [False]
            t0 += b - a
        n_loss += int(item["loss_mask"].sum())
        n_real += int(item["attention_mask"].sum())
    assert 0 < n_loss < n_real  # prompts and template tokens are excluded


def test_splits_are_disjoint_and_deterministic(tok, cache_dir, tmp_path, chat, write_jsonl):
    src = write_jsonl(tmp_path / "s.jsonl", [chat(i) for i in range(200)])
    a = _dm(tok, cache_dir, sources=[{"path": str(src)}], heldout_fraction=0.05)
    b = _dm(tok, tmp_path / "other", sources=[{"path": str(src)}], seq_len=256, batch_size=1, heldout_fraction=0.05)
    a.setup(), b.setup()
    sa, sb = a._splits[0], b._splits[0]
    sets = {k: set(v.tolist()) for k, v in sa.items()}
    assert not sets["ilkd"] & sets["kd"] and not sets["ilkd"] & sets["heldout"] and not sets["kd"] & sets["heldout"]
    assert sets["ilkd"] | sets["kd"] | sets["heldout"] == set(range(200))
    assert len(sets["heldout"]) == 10 and len(sets["ilkd"]) == 38  # ceil(5%), then 20% of the rest
    for k in sa:  # same split whatever the seq_len, batch size or cache location
        assert (sa[k] == sb[k]).all()
    # the packed rows of each split hold only that split's conversations
    for split in ("ilkd", "kd", "heldout"):
        assert set(a.rows(split).lay.doc.tolist()) == sets[split]
    c = _dm(tok, cache_dir, sources=[{"path": str(src)}], heldout_fraction=0.05, seed=7)
    c.setup()
    assert set(c._splits[0]["ilkd"].tolist()) != sets["ilkd"]  # another seed, another split


def test_token_weighted_mixing(tok, cache_dir, tmp_path, chat, write_jsonl):
    big = write_jsonl(tmp_path / "big.jsonl", [chat(i, words=20) for i in range(120)])
    small = write_jsonl(tmp_path / "small.jsonl", [chat(1000 + i, words=20) for i in range(30)])
    dm = _dm(tok, cache_dir, sources=[{"path": str(big), "weight": 1.0}, {"path": str(small), "weight": 3.0}],
             heldout_fraction=0.1, ild_fraction=0.0)  # fmt: skip
    lay = dm.rows("kd").lay
    lengths = [s.lengths for s in dm._stores]
    tokens = [int(lengths[i][lay.doc[lay.src == i]].sum()) for i in (0, 1)]
    share = tokens[1] / sum(tokens)
    doc_len = lengths[1].max() / sum(tokens)
    assert abs(share - 0.75) <= doc_len  # whole documents: off by at most one document
    # the small source is up-sampled (documents repeat), the big one sub-sampled
    assert len(lay.doc[lay.src == 1]) > 30 and len(set(lay.doc[lay.src == 0].tolist())) < 120
    natural = sum(int(lengths[i][dm._splits[i]["kd"]].sum()) for i in (0, 1))  # the split keeps its size
    assert sum(tokens) == pytest.approx(natural, abs=2 * int(lengths[0].max()))
    # sources interleave rather than following each other
    assert len(np.flatnonzero(np.diff(lay.src))) > 10
    # held-out data is not re-weighted: each held-out document exactly once
    held = dm.rows("heldout").lay
    for i in (0, 1):
        assert sorted(held.doc[held.src == i].tolist()) == sorted(dm._splits[i]["heldout"].tolist())


def test_second_construction_hits_the_cache(tok, tmp_path, monkeypatch):
    calls = []
    real = sft_mod._tokenize_batch
    monkeypatch.setattr(sft_mod, "_tokenize_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(sources=[{"path": "shipped:sft"}], seq_len=256)
    first = _dm(tok, tmp_path, **kw)
    first.setup()
    assert calls  # tokenised once
    calls.clear()
    t = time.perf_counter()
    second = _dm(tok, tmp_path, **kw)
    second.setup()
    batch = next(iter(second.train_dataloader()))
    elapsed = time.perf_counter() - t
    assert not calls  # no re-tokenisation
    assert elapsed < 2.0, elapsed
    assert torch.equal(batch["input_ids"], next(iter(first.train_dataloader()))["input_ids"])
    # a different template or tokenizer is a different cache entry; seq_len is not (packing is recomputed)
    keys = {p.name for p in second._cache_paths()}
    assert keys == {p.name for p in _dm(tok, tmp_path, sources=kw["sources"], seq_len=64)._cache_paths()}


def test_shipped_data(tok):
    import json

    sft = [json.loads(l) for l in open(shipped_path("sft"), encoding="utf-8")]
    prefs = [json.loads(l) for l in open(shipped_path("preferences"), encoding="utf-8")]
    text = shipped_path("heldout").read_text(encoding="utf-8")
    total = sum(shipped_path(n).stat().st_size for n in ("sft", "preferences", "heldout"))
    assert total < 1_000_000
    assert 250 <= len(sft) <= 400 and len(prefs) == 48
    assert all(m["role"] in ("system", "user", "assistant") and m["content"] for r in sft for m in r["messages"])
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in prefs)
    n_tokens = sum(len(format_conversation(tok, r["messages"]).input_ids) for r in sft)
    assert 55_000 <= n_tokens <= 70_000
    assert 1_500 <= len(tok(text)["input_ids"]) <= 2_500
