"""DeepSpeed ZeRO-3 and the stages: students created sharded, filled one unit at a time, gathered back for export.

Under ZeRO-3 each rank holds 1/N of every parameter. A student is created inside `deepspeed.zero.Init` (Lightning's
`configure_model` hook runs under it), so no rank ever holds the whole model on its GPU. Its values are then
written one *unit* at a time (one decoder layer, or the direct parameters of one other module): the unit is
gathered, rank 0 writes it, and DeepSpeed re-partitions it on leaving the context (`modifier_rank=0` broadcasts
rank 0's values). The end-of-stage export gathers the same units and copies them to CPU on rank 0, so the
Hugging Face `model/` directory is written from a consolidated state dict while no GPU ever holds more than one
gathered layer.

Everything here also works unsharded (DDP, ZeRO-1/2, one device): `gathered` is then a no-op and every rank
holds the whole model.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

import torch
from torch import nn

from zebra.model.mamba2 import is_partitioned


def zero_stage(trainer) -> int:
    """The DeepSpeed ZeRO stage of a Lightning trainer's strategy (0 when it is not DeepSpeed). Readable before
    `fit`."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return 0
    return int(((strategy.config or {}).get("zero_optimization") or {}).get("stage", 0))


def partitioned(model: nn.Module) -> bool:
    """True when some parameter of `model` is ZeRO-3-partitioned."""
    return any(is_partitioned(p) or hasattr(p, "ds_id") for p in model.parameters())


def gathered(params: list[torch.nn.Parameter], modifier_rank: int | None = None):
    """DeepSpeed's GatheredParameters over the ZeRO-3 parameters of `params`; a no-op for ordinary tensors."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank)


def units(model: nn.Module) -> Iterator[tuple[str, nn.Module, bool]]:
    """(prefix, module, recurse) covering every parameter of `model` once: each element of a ModuleList (a
    decoder layer, gathered whole), and every other module's direct parameters."""
    inside: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            for i, child in enumerate(module):
                for sub in child.modules():
                    inside.add(id(sub))
                yield (f"{name}.{i}." if name else f"{i}."), child, True
            continue
        if any(True for _ in module.parameters(recurse=False)):
            yield (f"{name}." if name else ""), module, False


def _unit_params(module: nn.Module, recurse: bool) -> list[tuple[str, nn.Parameter]]:
    return list(module.named_parameters(recurse=recurse, remove_duplicate=False))


def _seen_filter():
    seen: set[int] = set()

    def first(p) -> bool:  # tied weights (embeddings / LM head) are written and read once
        if id(p) in seen:
            return False
        seen.add(id(p))
        return True

    return first


@torch.no_grad()
def load_state(model: nn.Module, state: Mapping[str, torch.Tensor] | None, rank: int) -> None:
    """Copy `state` (name -> tensor, the model's own parameter names) into `model`, one unit at a time.

    Sharded: rank 0 alone needs `state` (the other ranks pass None) and its values reach every shard. Unsharded:
    every rank copies its own `state`. Names missing from `state` raise KeyError naming them."""
    sharded = partitioned(model)
    writer = rank == 0 or not sharded
    if writer and state is None:
        raise ValueError("load_state: this rank writes the weights but was given no state")
    first = _seen_filter()
    for prefix, module, recurse in units(model):
        params = [(n, p) for n, p in _unit_params(module, recurse) if first(p)]
        if not params:
            continue
        with gathered([p for _, p in params], modifier_rank=0):
            if writer:
                for name, p in params:
                    key = prefix + name
                    if key not in state:
                        raise KeyError(f"load_state: no tensor for parameter {key!r}")
                    p.data.copy_(state[key].to(dtype=p.dtype, device=p.device))


@torch.no_grad()
def init_weights(model: nn.Module, rank: int, init: Callable[[nn.Module], None] | None = None) -> None:
    """Re-run the model's own weight init (`model._init_weights`, HF's) on every module, gathered unit by unit:
    a model created under zero.Init was initialised by its modules' constructors only (HF's post-init sees
    empty partitions and skips them)."""
    init = init or model._init_weights
    sharded = partitioned(model)
    if not sharded:
        model.apply(init)
        return
    for _prefix, module, recurse in units(model):
        params = [p for _, p in _unit_params(module, recurse)]
        with gathered(params, modifier_rank=0):
            if rank == 0:
                for sub in (module.modules() if recurse else [module]):
                    init(sub)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


@torch.no_grad()
def state_dict_cpu(model: nn.Module, rank: int, dtype: torch.dtype | None = None) -> dict | None:
    """The whole model's parameters and persistent buffers as CPU tensors on rank 0 (None on other ranks).

    Collective under ZeRO-3: every rank must call it (each unit is all-gathered, then released). Tied weights
    appear under each of their names, as in `state_dict()`."""
    sharded = partitioned(model)
    out: dict[str, torch.Tensor] | None = {} if rank == 0 or not sharded else None
    by_id: dict[int, torch.Tensor] = {}
    for prefix, module, recurse in units(model):
        params = _unit_params(module, recurse)
        if not params:
            continue
        with gathered([p for _, p in params], modifier_rank=None):
            if out is None:
                continue
            for name, p in params:
                if id(p) not in by_id:
                    t = p.detach()
                    by_id[id(p)] = t.to("cpu", dtype=dtype or t.dtype, copy=True)
                out[prefix + name] = by_id[id(p)]
    if out is not None:
        params_names = set(out)
        for name, buf in model.state_dict().items():  # persistent buffers (never partitioned)
            if name not in params_names and torch.is_tensor(buf) and name not in out:
                out[name] = buf.detach().to("cpu", copy=True)
    return out


@torch.no_grad()
def master_state_cpu(named: list[tuple[str, torch.nn.Parameter]], rank: int) -> tuple[bool, dict | None]:
    """(available, state): the fp32 master copies that DeepSpeed's ZeRO optimiser holds for `named` (trainable)
    parameters, whole, as CPU tensors on rank 0 (state None elsewhere). Under bf16 the module's own parameters
    are rounded copies of these: an Adam step of 3e-4 on a weight near 1.0 (norms, A_log, D) is below bf16's
    resolution there, so the module copy may not move for many steps while the master does.

    Collective under ZeRO (each parameter is gathered from the ranks' partitions); available is False, the same
    on every rank, when some parameter has no master copy (no DeepSpeed optimiser: DDP, one device)."""
    try:
        from deepspeed.utils import safe_get_full_fp32_param
    except ImportError:
        return False, None
    if not named or not all(hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") for _, p in named):
        return False, None
    out: dict[str, torch.Tensor] | None = {} if rank == 0 else None
    for name, p in named:
        full = safe_get_full_fp32_param(p)
        if full is None:
            return False, None
        if out is not None:
            out[name] = full.detach().to("cpu", dtype=torch.float32, copy=True)
        del full
    return True, out


def consolidated_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A CPU model of `model`'s class and config holding `state` (from `state_dict_cpu`), for export.

    Built on the meta device and given `state`'s tensors as they are (no random init, no copy, dtypes kept);
    non-persistent buffers (MLA's RoPE inverse frequencies) are recomputed."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    missing, unexpected = copy.load_state_dict(dict(state), strict=False, assign=True)
    tied = set(getattr(copy, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"consolidated state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    for module in copy.modules():
        if hasattr(module, "compute_inv_freq"):
            module.inv_freq = module.compute_inv_freq().to("cpu")
    left = [n for n, t in list(copy.named_parameters()) + list(copy.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"consolidated model: tensors not restored from the gathered state: {left[:5]}")
    return copy.eval()


def exportable(model: nn.Module, rank: int) -> nn.Module | None:
    """The model to write, on rank 0 (None elsewhere): under ZeRO-3 a CPU copy gathered from the shards one unit
    at a time, else the model itself. Collective: every rank must call it."""
    if not partitioned(model):
        return model if rank == 0 else None
    state = state_dict_cpu(model, rank)
    return consolidated_model(model, state) if rank == 0 else None


def register_external(root: nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Tell ZeRO-3 that `root`'s forward uses `params` although they belong to other modules (the student's LM
    head weight, read by the chunked KD loss rather than through the head's own forward): DeepSpeed then gathers
    them for `root`'s forward and backward and reduces their gradients. Without this the loss would see an empty
    partition. No-op for unsharded parameters."""
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return
    import deepspeed

    for p in sharded:
        deepspeed.zero.register_external_parameter(root, p)


def inference_engine(model: nn.Module, device: torch.device, dtype: torch.dtype, persistence_threshold: int = 100_000):
    """Partition a frozen model (a teacher, the DPO reference) over the ranks in its own ZeRO-3 inference engine:
    each GPU holds 1/N of its weights, and each layer is gathered only for its forward. For teachers that do not
    fit one GPU beside the student. Every rank must call it, and every later forward, in the same order.
    Returns the engine (keep a reference: its hooks live as long as it does); the model is used as before."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by the config checks; no training happens
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": persistence_threshold},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    engine, *_ = deepspeed.initialize(model=model.to(device), config=config, dist_init_required=False)
    engine.module.eval()
    return engine
