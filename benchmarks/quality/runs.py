"""What the quality benchmark runs: the recipe and its ablations, each a list of Hydra overrides on top of the
recipe's, and how each run's configs are composed (as train.py composes them, from zebra's config directory).

Edit the ablations here. An override may name `{mla_layers}` (the recipe's SMART layers, e.g. [0,6,12,17,22,28])
or `{n_mla}` (the recipe's number of MLA layers): they are filled from the recipe's result, so such a run needs the
recipe to have run first (in this process or in the JSON it merges with).
"""

from __future__ import annotations

import dataclasses

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from zebra.launch.resolvers import register_resolvers
from zebra.utils.paths import config_dir

RECIPE = ("+experiment=smollm2_gpu",)

# model=tiny (a random 4-layer Llama teacher, the embedded tokenizer), CPU, budgets of a few steps: the same code
# path in seconds, for the test in tests/bench
SMOKE = ("model=tiny", "trainer=cpu", "logger=none", "mix.n_mla=2", "smart.n_mla=[2]",
         "ilkd.seq_len=64", "ilkd.batch_size=2", "ilkd.tokens=256",
         "smart.seq_len=64", "smart.batch_size=2", "smart.tokens=128",
         "kd.seq_len=64", "kd.batch_size=2", "kd.tokens=256",
         "dpo.max_length=128", "dpo.max_prompt_length=64", "dpo.batch_size=2", "dpo.pairs=4")
# after a run's own overrides in the smoke mode: the tiny preset's MLA dims (the init variants set SmolLM2's)
SMOKE_LAST = ("model.mla.kv_lora_rank=16", "model.mla.qk_rope_head_dim=8", "model.mla.qk_nope_head_dim=8")

# The initialisation options (conf/init, model.mla.rope_key) as they were before they were measured, and the measured
# ones. The rope key layouts spend the same 96 cached values per MLA layer and token on SmolLM2 (5% KV): one shared
# key at r_kv 64 + 32, or one per KV head at r_kv 48 + 3 x 16 (conf/model/smollm2_135m.yaml).
SHARED_ROPE_KEY = ("model.mla.rope_key=shared", "model.mla.kv_lora_rank=64", "model.mla.qk_rope_head_dim=32",
                   "model.mla.qk_nope_head_dim=32")
PER_KV_HEAD_ROPE_KEY = ("model.mla.rope_key=per_kv_head", "model.mla.kv_lora_rank=48", "model.mla.qk_rope_head_dim=16",
                        "model.mla.qk_nope_head_dim=48")
OLD_SVD_MAMBA = ("init.mla_svd=plain", "init.mamba_conv=default", "init.mamba_scale=none")
NEW_SVD_MAMBA = ("init.mla_svd=activation_aware", "init.mamba_conv=identity", "init.mamba_scale=matched")
# a variant whose values are all the recipe's own is not run again (it is the recipe)
INIT_VARIANTS = {
    "old": (*OLD_SVD_MAMBA, *SHARED_ROPE_KEY),
    "new": (*NEW_SVD_MAMBA, *PER_KV_HEAD_ROPE_KEY),
    # each new option alone on top of the old ones (run only when named: --only init_mla_svd, ...)
    "mla_svd": (NEW_SVD_MAMBA[0], *OLD_SVD_MAMBA[1:], *SHARED_ROPE_KEY),
    "rope_key": (*OLD_SVD_MAMBA, *PER_KV_HEAD_ROPE_KEY),
    "mamba": (OLD_SVD_MAMBA[0], *NEW_SVD_MAMBA[1:], *SHARED_ROPE_KEY),
}
CACHE_TOP_K = 64  # the kd_cache run's k: 388 bytes per token, within 3% of online KD is its goal
CACHE_TAIL_SAMPLES = 16  # the kd_cache_tail run's draws from the teacher's tail beside its top-64: 484 bytes per token
INIT_KEYS = ("init", "model.mla")  # what decides whether a variant is the recipe's own


@dataclasses.dataclass(frozen=True)
class Run:
    name: str  # the key of its results in the JSON
    what: str  # one line for the table
    overrides: tuple[str, ...] = ()  # on top of the recipe's (and --set's)
    stages: tuple[str, ...] = ("ilkd", "kd")  # stage.order of its pipeline
    root: str = ""  # sub-directory of the artifacts root (default: its name); runs sharing one share stages
    students: bool = False  # also evaluate the ILD'd students
    ild_trained: bool = True  # false: the ILD stage only exported the initialised students (no ILD tokens)
    default: bool = True  # part of a run without --only

    @property
    def directory(self) -> str:
        return self.root or self.name


RUNS: tuple[Run, ...] = (
    Run("recipe", "the recipe: ILD -> SMART -> KD -> DPO", stages=("ilkd", "smart", "kd", "dpo"), students=True),
    Run("no_ild", "no ILD: KD straight from the initialised students, the recipe's layers",
        ("ilkd.max_steps=1", "ilkd.scheduler._target_=benchmarks.quality.runs.frozen_lr", "mix=explicit",
         "mix.mla_layers={mla_layers}"), ild_trained=False),
    Run("uniform", "uniform placement floor(i*L/n) instead of SMART, the recipe's ILD", 
        ("mix=uniform", "mix.n_mla={n_mla}"), root="recipe"),
    *(Run(f"init_{name}", f"inits {name}: " + " ".join(o.split(".")[-1] for o in ov[:4]) + ", the recipe's layers",
          (*ov, "mix=explicit", "mix.mla_layers={mla_layers}"), default=name in ("old", "new"))
      for name, ov in INIT_VARIANTS.items()),
    # KD from the stored top-k teacher log-probs (stage=teacher_cache) instead of the teacher, at the recipe's layers
    # (an explicit mix: its own KD directory beside the recipe's, the recipe's ILD'd students). kd_cache is k =
    # CACHE_TOP_K; kd_cache_k256 / _k1024 (run only when named) tell how much of its gap to online KD the tail makes,
    # kd_cache_tail (only when named) whether CACHE_TAIL_SAMPLES draws from the teacher's tail per token close it.
    *(Run(name, f"KD from the teacher cache (top-{k} log-probs{f' + {s} tail draws' if s else ''}), the recipe's ILD "
                "and layers",
          ("kd.teacher_source=cache", f"teacher_cache.top_k={k}", f"teacher_cache.tail_samples={s}", "mix=explicit",
           "mix.mla_layers={mla_layers}"),
          stages=("ilkd", "teacher_cache", "kd"), root="recipe", default=name == "kd_cache")
      for name, k, s in (("kd_cache", CACHE_TOP_K, 0), ("kd_cache_k256", 256, 0), ("kd_cache_k1024", 1024, 0),
                         ("kd_cache_tail", CACHE_TOP_K, CACHE_TAIL_SAMPLES))),
)
BY_NAME = {r.name: r for r in RUNS}


def frozen_lr(optimizer, total_steps: int, **_):
    """A scheduler that holds every learning rate at 0 (the no_ild run's ILD: one step that changes no weight, so the
    stage exports the initialised students through its own init code)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.0)


class NeedsRecipe(LookupError):
    """A run's overrides name the recipe's layers, and the recipe has no result yet."""


def fill(overrides: tuple[str, ...], recipe: dict | None) -> list[str]:
    """The overrides with `{mla_layers}` / `{n_mla}` taken from the recipe's result."""
    out = []
    for o in overrides:
        if "{" in o:
            layers = (recipe or {}).get("mla_layers")
            if not layers:
                raise NeedsRecipe("it needs the recipe's SMART layers: run the recipe first (--only recipe)")
            o = o.format(mla_layers="[" + ",".join(str(i) for i in layers) + "]", n_mla=len(layers))
        out.append(o)
    return out


def compose_cfg(overrides: list[str]) -> DictConfig:
    """zebra's config with `overrides`, as train.py composes it (Hydra's compose API, zebra's resolvers)."""
    register_resolvers()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        return compose(config_name="config", overrides=list(overrides))


def base_overrides(smoke: bool, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    return [*RECIPE, *(SMOKE if smoke else ()), *extra]


def run_overrides(run: Run, recipe: dict | None, smoke: bool) -> list[str]:
    return [*fill(run.overrides, recipe), *(SMOKE_LAST if smoke else ())]


def pipeline_cfg(run: Run, common: list[str], root: str, recipe: dict | None, smoke: bool) -> DictConfig:
    order = "[" + ",".join(run.stages) + "]"
    return compose_cfg([*common, *run_overrides(run, recipe, smoke), "stage=pipeline", f"stage.order={order}",
                        f"paths.root={root}/{run.directory}"])


def eval_cfg(run: Run, common: list[str], root: str, recipe: dict | None, smoke: bool) -> DictConfig:
    """stage=eval of the run's artifacts: held-out text and SFT sets, no lm-eval tasks, no plots, float32 weights
    (as the CPU pipeline's figures, teacher 31.73 on heldout.txt, were measured)."""
    shape = ("eval.seq_len=64", "eval.max_tokens=256", "eval.sft_batches=2") if smoke else \
        ("eval.seq_len=512", "eval.max_tokens=4096", "eval.sft_batches=8")
    return compose_cfg([*common, *run_overrides(run, recipe, smoke), "stage=eval", "eval.tasks=[]", "eval.plots=false",
                        "eval.heldout=[text,sft]", f"++eval.students={str(run.students).lower()}",
                        "++eval.dtype=float32", *shape,
                        f"paths.root={root}/{run.directory}"])


def init_values(cfg: DictConfig) -> dict:
    """The config values that decide the initialisation (INIT_KEYS), resolved."""
    out = {}
    for key in INIT_KEYS:
        v = OmegaConf.select(cfg, key, default=None)
        out[key] = OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
    return out
