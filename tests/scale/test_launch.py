"""One process per device started by a launcher, never by Lightning (DESIGN §5); requeued jobs resume with
ckpt_path=last; Hydra's run directory is the same in every rank of a launch (zebra/launch)."""

from __future__ import annotations

import os

import pytest
from hydra.utils import instantiate

from tests.helpers.configs import compose_cfg
from tests.helpers.runs import subprocess_env, tiny_data, trace_runs, train
from zebra.launch import _process_start_time, launch_stamp, with_resume
from zebra.launch.submitit import resolve_resources
from zebra.launch.trainer import LaunchError, cluster_plugins

LAUNCH_VARS = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE",
               "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME", "SLURM_JOB_ID", "SLURM_STEP_ID",
               "SLURM_PROCID", "SLURM_LOCALID",
               "SLURM_NODEID", "SLURM_RESTART_COUNT", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


@pytest.fixture
def bare_env(monkeypatch):
    for key in LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_with_resume():
    assert with_resume(["stage=kd", "mix.n_mla=4"]) == ["stage=kd", "mix.n_mla=4", "ckpt_path=last"]
    assert with_resume(["ckpt_path=null", "stage=kd"]) == ["stage=kd", "ckpt_path=last"]
    assert with_resume(["stage=kd", "ckpt_path=last"]) == ["stage=kd", "ckpt_path=last"]  # idempotent
    assert with_resume(["ckpt_path=/x/step10.ckpt"]) == ["ckpt_path=/x/step10.ckpt"]   # the user's own path stays


def test_several_devices_without_a_launcher_are_refused(bare_env):
    assert cluster_plugins(1, 1, "cpu") == []
    with pytest.raises(LaunchError, match="torchrun --standalone --nproc-per-node=2"):
        cluster_plugins(2, 1, "cpu")
    with pytest.raises(LaunchError, match="hydra/launcher=submitit_slurm"):
        cluster_plugins(8, 2, "gpu")


def test_launcher_and_trainer_must_agree(bare_env):
    bare_env.setenv("TORCHELASTIC_RUN_ID", "abc")
    bare_env.setenv("LOCAL_RANK", "0")
    bare_env.setenv("RANK", "0")
    bare_env.setenv("GROUP_RANK", "0")
    bare_env.setenv("LOCAL_WORLD_SIZE", "2")
    bare_env.setenv("WORLD_SIZE", "2")
    assert cluster_plugins(2, 1, "cpu") == []
    with pytest.raises(LaunchError, match="started 2 processes"):  # each rank would train alone
        cluster_plugins(1, 1, "cpu")


def test_slurm_gets_lightning_auto_requeue_off(bare_env):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    for key, value in (("SLURM_NTASKS", "2"), ("SLURM_NTASKS_PER_NODE", "2"), ("SLURM_JOB_NAME", "train"),
                       ("SLURM_JOB_ID", "7"),
                       ("SLURM_PROCID", "0"), ("SLURM_LOCALID", "0"), ("SLURM_NODEID", "0")):
        bare_env.setenv(key, value)
    (env,) = cluster_plugins(2, 1, "cpu")
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False
    with pytest.raises(LaunchError, match="started 2 processes"):
        cluster_plugins(1, 1, "cpu")


def test_trainer_config_carries_the_plugin(bare_env):
    cfg = compose_cfg(["trainer=ddp_cpu"])
    assert cfg.trainer.plugins._target_ == "zebra.launch.trainer.cluster_plugins"
    with pytest.raises(Exception, match="not started by a launcher"):
        instantiate(cfg.trainer.plugins)


def test_launch_stamp_is_the_same_in_every_rank(bare_env):
    now = launch_stamp()
    assert len(now.split("/")) == 2
    bare_env.setenv("TORCHELASTIC_RUN_ID", "none")
    import time

    parent = time.strftime("%Y-%m-%d/%H-%M-%S", time.localtime(_process_start_time(os.getppid())))
    assert launch_stamp() == parent  # torchrun's agent is every local rank's parent
    bare_env.delenv("TORCHELASTIC_RUN_ID")
    for key, value in (("SLURM_JOB_ID", "42"), ("SLURM_NTASKS", "4"), ("SLURM_STEP_ID", "0")):
        bare_env.setenv(key, value)
    assert launch_stamp() == "slurm-42"


def test_launcher_resources_follow_the_trainer():
    assert resolve_resources({"tasks_per_node": 8, "nodes": 2, "gpus_per_node": None},
                             {"devices": 8, "num_nodes": 2, "accelerator": "gpu"}) == \
        {"tasks_per_node": 8, "nodes": 2, "gpus_per_node": 8}
    assert resolve_resources({"tasks_per_node": 2, "nodes": 1, "gpus_per_node": None},
                             {"devices": 2, "accelerator": "cpu"})["gpus_per_node"] is None
    with pytest.raises(ValueError, match="positive number of devices"):
        resolve_resources({"tasks_per_node": "auto", "nodes": 1}, {"devices": "auto"})


@pytest.mark.filterwarnings("ignore:(?s).*validated against ConfigStore schema")  # expected (zebra/launch)
@pytest.mark.parametrize("launcher, cls", [("submitit_slurm", "ZebraSlurmLauncher"),
                                           ("submitit_local", "ZebraLocalLauncher")])
def test_launcher_configs(launcher, cls):
    cfg = compose_cfg([f"hydra/launcher={launcher}", "trainer=ddp_cpu"], return_hydra_config=True)
    node = cfg.hydra.launcher
    assert node._target_ == f"hydra_plugins.zebra_launcher.{cls}"
    assert node.tasks_per_node == 2 and node.nodes == 1  # one task per device
    if launcher == "submitit_slurm":
        assert node.additional_parameters.requeue is True and node.signal_delay_s > 0 and node.max_num_timeout > 0


@pytest.mark.slow
def test_submitit_local_starts_one_process_per_device(tmp_path):
    """trainer.devices=2 through submitit's local executor: two tasks, one DDP run (not two runs, not four).
    Submitted from outside the repository with no PYTHONPATH: the jobs still unpickle zebra's launcher."""
    data = tiny_data(tmp_path / "data")
    root, trace = tmp_path / "artifacts", tmp_path / "trace.jsonl"
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    train(["-m", "hydra/launcher=submitit_local", "trainer=ddp_cpu", "strategy=ddp", "stage=ilkd", "model=tiny",
           "ilkd.students=mla", "logger=none", f"paths.root={root}", "trainer.enable_progress_bar=false",
           "num_threads=1", f"data.sft.sources=[{{path: '{data}'}}]", "data.sft.heldout_fraction=0.1",
           "ilkd.seq_len=32", "ilkd.batch_size=1", "ilkd.max_steps=2", "ilkd.checkpoint_every_n_steps=0",
           "+callbacks.trace._target_=zebra.launch.trainer.StepTrace", f"+callbacks.trace.path={trace}"],
          cwd=tmp_path, env=env, timeout=240)
    (run,) = trace_runs(trace)
    assert run[0]["world_size"] == 2
    assert [r["step"] for r in run if r["event"] == "step"] == [0, 1]
    assert (root / "tiny" / "ilkd" / "mla" / "model" / "config.json").is_file()
