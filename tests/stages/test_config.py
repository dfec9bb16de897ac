"""Hydra composition: groups, recipes, resolvers, deterministic artifact paths, and the CLI's --help / --cfg."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stage_helpers import CONF, compose_cfg
from zebra.stages.artifacts import STAGES, stage_dir

ROOT = CONF.parent
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_default_config_composes_every_group():
    cfg = compose_cfg(["paths.root=/tmp/zebra-root"])
    for key in ("model", "mix", "stage", "data", "trainer", "strategy", "logger", "paths", "ilkd", "smart", "kd", "dpo"):
        assert key in cfg, key
    assert cfg.model.name == "smollm2_135m" and cfg.mix.selection == "smart" and cfg.stage.name == "pipeline"
    assert cfg.trainer.gradient_clip_val == 1.0
    assert set(cfg.logger) == {"wandb", "csv"}
    # deterministic artifact directories, independent of Hydra's run dir
    assert {s: str(stage_dir(cfg, s)) for s in STAGES} == {
        "ilkd": "/tmp/zebra-root/smollm2_135m/ilkd", "smart": "/tmp/zebra-root/smollm2_135m/smart",
        "kd": "/tmp/zebra-root/smollm2_135m/6mla-smart/kd", "dpo": "/tmp/zebra-root/smollm2_135m/6mla-smart/dpo",
        "teacher_cache": "/tmp/zebra-root/smollm2_135m/teacher_cache",
        "teacher_data": "/tmp/zebra-root/smollm2_135m/teacher_data"}


def test_paths_root_from_environment(monkeypatch):
    monkeypatch.setenv("ZEBRA_ROOT", "/data/zebra")
    assert str(stage_dir(compose_cfg([]), "kd")) == "/data/zebra/smollm2_135m/6mla-smart/kd"
    monkeypatch.delenv("ZEBRA_ROOT")
    assert compose_cfg([]).paths.root == str(Path.cwd() / "artifacts")


def test_explicit_mix_uses_join_resolver():
    cfg = compose_cfg(["mix=explicit", "mix.mla_layers=[0,7,15]", "paths.root=/r"])
    assert cfg.mix.name == "explicit-0-7-15"
    assert str(stage_dir(cfg, "kd")) == "/r/smollm2_135m/explicit-0-7-15/kd"


def test_optimizer_and_scheduler_partials():
    import torch

    cfg = compose_cfg([])
    for stage in ("ilkd", "kd", "dpo"):
        opt_factory = instantiate(cfg[stage].optimizer)
        p = torch.nn.Parameter(torch.zeros(2))
        opt = opt_factory([p])
        assert isinstance(opt, torch.optim.AdamW)
        g = opt.param_groups[0]
        assert tuple(g["betas"]) == (0.9, 0.999) and g["eps"] == 1e-8 and g["weight_decay"] == 0.0
        sched = instantiate(cfg[stage].scheduler)(opt, total_steps=10)
        assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    assert cfg.dpo.optimizer.lr == 5e-7 and cfg.dpo.module.beta == 0.01 and cfg.dpo.scheduler.warmup_ratio == 0.1


def test_unknown_group_value_names_the_options():
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["model=llama_9000"])
    assert "llama_9000" in str(err.value) and "tiny" in str(err.value)
    with pytest.raises((ConfigCompositionException, MissingConfigException)):
        compose_cfg(["stage=distill"])


def test_unknown_stage_name_in_runner():
    from zebra.stages.run import runner

    with pytest.raises(ValueError, match="unknown stage 'nope'"):
        runner("nope")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_recipes_compose(name):
    cfg = compose_cfg([f"+experiment={name}", "paths.root=/r"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    assert cfg.stage.name in ("pipeline", "ilkd", "smart", "kd", "dpo")


def test_paper_recipes_follow_the_method():
    c = compose_cfg(["+experiment=zebra_1b_4mla"])
    assert c.model.name == "zebra_1b" and c.mix.mla_layers == [0, 5, 10, 14] or c.mix.n_mla == 4
    assert c.ilkd.optimizer.lr == 2e-4 and c.kd.optimizer.lr == 8e-5 and c.dpo.optimizer.lr == 5e-7
    assert c.ilkd.seq_len == 2048 and c.kd.seq_len == 2048 and c.dpo.max_length == 1024
    assert c.data.name == "paper" and c.model.kd_teacher == "meta-llama/Llama-3.1-8B-Instruct"
    c8 = compose_cfg(["+experiment=zebra_8b_8mla"])
    assert c8.ilkd.optimizer.lr == 1e-4 and c8.kd.optimizer.lr == 4e-5 and c8.ilkd.students in ("mla", "mamba", "both")
    c3 = compose_cfg(["+experiment=zebra_3b_14mla"])
    assert c3.mix.n_mla == 14 or len(c3.mix.mla_layers or []) == 14


def test_cli_help_and_cfg_job():
    env_py = sys.executable
    out = subprocess.run([env_py, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stage: " in out.stdout and "pipeline" in out.stdout and "+experiment=" in out.stdout
    out = subprocess.run([env_py, "train.py", "--cfg", "job", "model=tiny", "stage=kd", "kd.optimizer.lr=1e-3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.model.name == "tiny" and cfg.stage.name == "kd" and cfg.kd.optimizer.lr == 1e-3


def test_wandb_is_offline_without_api_key(monkeypatch, tmp_path):
    from zebra.stages.trainer import build_loggers

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_cfg(["model=tiny", f"paths.root={tmp_path}"])
    loggers = {type(lg).__name__: lg for lg in build_loggers(cfg, "kd", tmp_path / "kd")}
    assert set(loggers) == {"WandbLogger", "CSVLogger"}
    assert loggers["WandbLogger"]._offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert compose_cfg(["model=tiny"]).logger.wandb.offline is False
