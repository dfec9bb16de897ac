"""A 2-process DDP run (gloo, CPU) of `ilkd` and `kd` on the tiny preset follows the same loss curve as the
single-process run on the same global batch.

Processes are started one per rank by torchrun (DESIGN §5); Lightning must not start any itself, and Hydra makes
one run directory for both ranks. The loss of each step is the mean over ranks of the ranks' losses (StepTrace),
which is the global batch's loss: ILD's loss (and KD's token reduction) divides each rank's sum by its share of
the global batch's real tokens, KD's default by its sequences, so the mean over ranks is the mean of the whole
(tests/stages/test_token_mean.py checks that arithmetic with uneven padding). The data here keep the split's one
padded (final, partial) row out of the steps compared all the same.
"""

from __future__ import annotations

import pytest

from tests.helpers.runs import assert_same_loss_curves, finish, padded_tokens_per_batch, start, tiny_data

pytestmark = pytest.mark.slow

GLOBAL_BATCH, SEQ, STEPS = 4, 32, 3
HELDOUT = 0.1


def overrides(root, data, trace, batch_size: int, threads: int) -> list[str]:
    tokens = GLOBAL_BATCH * SEQ * STEPS
    return [
        "stage=pipeline", "stage.order=[ilkd,kd]", "model=tiny", "mix=uniform", "mix.n_mla=2", "logger=none",
        f"paths.root={root}", "trainer.enable_progress_bar=false", f"num_threads={threads}",
        f"data.sft.sources=[{{path: '{data}'}}]", f"data.sft.heldout_fraction={HELDOUT}",
        f"ilkd.seq_len={SEQ}", f"ilkd.batch_size={batch_size}", f"ilkd.tokens={tokens}",
        "ilkd.checkpoint_every_n_steps=0",
        f"kd.seq_len={SEQ}", f"kd.batch_size={batch_size}", f"kd.tokens={tokens}", "kd.checkpoint_every_n_steps=0",
        "kd.heldout_batches=0",
        "+callbacks.trace._target_=zebra.launch.trainer.StepTrace", f"+callbacks.trace.path={trace}",
    ]


def test_ddp_two_processes_match_one_process(tmp_path):
    data = tiny_data(tmp_path / "data", n=300)
    for split in ("ilkd", "kd"):
        pads = padded_tokens_per_batch(data, split, SEQ, GLOBAL_BATCH, GLOBAL_BATCH * SEQ * STEPS, HELDOUT)
        assert pads == [0] * STEPS, f"test data: the {split} steps compared must hold no padding, got {pads}"
    one, two = tmp_path / "one", tmp_path / "two"
    # the single-process run beside the two-process ones (most of each launch is single-threaded start-up)
    single = start(overrides(one, data, one / "trace.jsonl", batch_size=GLOBAL_BATCH, threads=1))
    # ilkd and kd as two launches: within one multi-process pipeline, the non-zero ranks start kd without waiting
    # for rank 0 to finish exporting the ILD students (no barrier between stages yet; reported)
    for stage in ("ilkd", "kd"):
        finish(start(overrides(two, data, two / "trace.jsonl", batch_size=GLOBAL_BATCH // 2, threads=1)
                     + ["trainer=ddp_cpu", "strategy=ddp", f"stage.order=[{stage}]"], nproc=2))
    finish(single)

    assert_same_loss_curves(one, two, ("ilkd", "kd"), STEPS)

    # both exports exist, written once (rank 0)
    for root in (one, two):
        assert (root / "tiny" / "ilkd" / "mla" / "model" / "config.json").is_file()
        assert (root / "tiny" / "2mla-uniform" / "kd" / "model" / "config.json").is_file()
    # Hydra made one run directory per launch, shared by the two ranks
    runs = [p for p in (two / "logs" / "hydra").rglob(".hydra")]
    assert len(runs) == 2, runs
