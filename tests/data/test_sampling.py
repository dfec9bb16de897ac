import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zebra.data import TokenMixtureDataModule


@pytest.fixture
def make_dm(tok, cache_dir):
    def make(**kw):
        kw.setdefault("seq_len", 64)
        kw.setdefault("batch_size", 2)
        return TokenMixtureDataModule(tokenizer=tok, cache_dir=cache_dir, **kw)

    return make


def _rows(batch):
    return [tuple(r.tolist()) for r in batch["input_ids"]]


def test_rank_sharding_matches_single_process_order(make_dm):
    one = list(make_dm(batch_size=4).train_dataloader(rank=0, world_size=1))
    r0 = list(make_dm(batch_size=2).train_dataloader(rank=0, world_size=2))
    r1 = list(make_dm(batch_size=2).train_dataloader(rank=1, world_size=2))
    assert len(r0) == len(r1) == len(one) > 3  # every rank steps the same number of times
    for g, (a, b, whole) in enumerate(zip(r0, r1, one)):
        assert not set(_rows(a)) & set(_rows(b))  # disjoint on every step
        assert _rows(a) + _rows(b) == _rows(whole)  # together: the world-size-1 global batch
    seen = [r for batch in r0 + r1 for r in _rows(batch)]
    assert len(seen) == len(set(seen))  # no row twice in an epoch


def test_order_is_deterministic_and_reshuffles_per_epoch(make_dm):
    a, b = make_dm().train_dataloader(0, 1), make_dm().train_dataloader(0, 1)
    assert [_rows(x) for x in a] == [_rows(x) for x in b]
    first = [_rows(x) for x in a]
    a.sampler.set_epoch(1)
    second = [_rows(x) for x in a]
    assert first != second and len(second) == len(first)


def test_resume_continues_with_next_batch(make_dm):
    k = 3
    loader = make_dm().train_dataloader(0, 1)
    it = iter(loader)
    for _ in range(k):
        next(it)
    state = loader.state_dict()
    expected = [_rows(b) for b in it]  # batches k+1 ... end
    assert state["rows_consumed"] == k * 2
    fresh = make_dm().train_dataloader(0, 1)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["rows_consumed"] == k * 2
    assert [_rows(b) for b in fresh] == expected
    assert len(list(fresh)) == len(fresh) == len(loader)  # the restored position applies once


def test_resume_counts_consumed_batches_not_worker_prefetch(make_dm):
    loader = make_dm(num_workers=2).train_dataloader(0, 1)
    it = iter(loader)
    got = [next(it) for _ in range(2)]  # the workers have prefetched several more by now
    assert loader.state_dict()["rows_consumed"] == 4
    fresh = make_dm().train_dataloader(0, 1)
    fresh.load_state_dict(loader.state_dict())
    assert _rows(next(iter(fresh))) == _rows(next(it))
    del got, it


def test_resume_across_world_sizes_with_the_same_global_batch(make_dm):
    single = make_dm(batch_size=4).train_dataloader(0, 1)
    it = iter(single)
    next(it), next(it)
    state = single.state_dict()
    following = _rows(next(it))
    halves = []
    for rank in (0, 1):
        loader = make_dm(batch_size=2).train_dataloader(rank, 2)
        loader.load_state_dict(state)
        halves += _rows(next(iter(loader)))
    assert halves == following


def test_resume_refuses_other_data(make_dm):
    state = make_dm().train_dataloader(0, 1).state_dict()
    with pytest.raises(ValueError, match="different data"):
        make_dm(seed=1).train_dataloader(0, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        make_dm(batch_size=4).train_dataloader(0, 1).load_state_dict(state)


def test_max_tokens_budget_runs_past_one_pass(make_dm):
    dm = make_dm(split="ilkd")
    rows = len(dm.rows())
    budget = 3 * rows * 64  # three passes over the split
    loader = make_dm(split="ilkd", max_tokens=budget).train_dataloader(0, 1)
    assert len(loader) == budget // (2 * 64)
    slots = [r for b in loader for r in _rows(b)]
    assert len(slots) == len(loader) * 2
    first_pass, second_pass = slots[:rows], slots[rows : 2 * rows]
    assert len(set(first_pass)) == rows  # pass one: every row once
    assert set(second_pass) == set(first_pass) and second_pass != first_pass  # pass two: reshuffled
    with pytest.raises(ValueError, match="max_tokens"):
        make_dm(max_tokens=64).train_dataloader(0, 1)


class _Recorder(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(_rows(batch))
        return (self.w**2).sum() + 0 * batch["input_ids"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, steps, callbacks=()):
    return pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=list(callbacks), default_root_dir=tmp_path,
        enable_checkpointing=bool(callbacks),
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings(r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated")
def test_lightning_fit_resumes_at_the_next_unseen_batch(make_dm, tmp_path):
    """Lightning saves the loader's state_dict in the checkpoint and restores it on fit(ckpt_path=...)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    full = _Recorder()
    _trainer(tmp_path, 6, [ckpt]).fit(full, datamodule=make_dm())
    resumed = _Recorder()
    _trainer(tmp_path / "b", 6).fit(resumed, datamodule=make_dm(), ckpt_path=tmp_path / "step=3.ckpt")
    assert len(full.seen) == 6
    assert resumed.seen == full.seen[3:]
