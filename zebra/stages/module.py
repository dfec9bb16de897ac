"""The Lightning base of the training stages and the students they train: `StageModule` (optimiser and scheduler
from `_partial_` configs, frozen models kept out of checkpoints and DDP/ZeRO, finite-loss guard, token counting,
weights-moved check) and `StudentSpec` (a student that comes to exist in `configure_model`, sharded under ZeRO-3).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from torch import nn

from zebra.plan.describe import count_parameters
from zebra.stages import zero
from zebra.stages.errors import NonFiniteLossError, StageError
from zebra.stages.optim import param_groups, prepare_trained
from zebra.stages.teacher import freeze

log = logging.getLogger("zebra.stages")


@dataclasses.dataclass
class StudentSpec:
    """A student that comes to exist in the module's `configure_model` (DESIGN §5).

    `full` is the whole student with its starting weights, built by the runner before `fit` on every rank when
    the strategy does not shard parameters, and on rank 0 alone under ZeRO-3 (None on the others: they never
    hold it). Under ZeRO-3 `configure_model` runs inside `deepspeed.zero.Init`: an empty student of `config` is
    created already partitioned, then filled from rank 0's `full` one decoder layer at a time. `full=None`
    everywhere means random init (benchmarks): the model's own init, applied gathered unit by unit when sharded.
    """
    config: Any
    full: nn.Module | None = None
    random: bool = False  # no starting weights anywhere: the model's own random init
    created: str | None = None  # how materialise made it: "whole" or "sharded" (created partitioned)

    def materialise(self, trainer: pl.Trainer) -> nn.Module:
        from zebra.model.modeling_zebra import ZebraForCausalLM
        if zero.zero_stage(trainer) != 3:
            student = ZebraForCausalLM(self.config) if self.random else self.full
            if student is None:
                raise StageError("the student's starting weights were not built on this rank")
            self.full, self.created = None, "whole"
            return student
        rank = trainer.global_rank
        student = ZebraForCausalLM(self.config)  # partitioned as it is created (zero.Init is active)
        if not zero.partitioned(student):
            raise StageError("ZeRO-3: the student was not created partitioned (configure_model must run under "
                             "deepspeed.zero.Init)")
        if self.random:
            zero.init_weights(student, rank)
        else:
            if rank == 0 and self.full is None:
                raise StageError("ZeRO-3: rank 0 has no starting weights for the student")
            zero.load_state(student, self.full.state_dict() if self.full is not None else None, rank)
        self.full, self.created = None, "sharded"  # rank 0's CPU copy is no longer needed
        # zero.Init places parameters on the GPU and DeepSpeed then leaves the module where it is, so the buffers
        # (MLA's RoPE inverse frequencies) must be moved by hand
        device = trainer.strategy.root_device
        for module in student.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        return student


class StageModule(pl.LightningModule):
    """Base of the training stages: optimiser/scheduler from `_partial_` configs, a finite-loss guard, token
    counting and the FLOPs/token estimate the throughput callback reads.

    Frozen models (teachers, DPO reference) are kept out of the module's registered children (see `frozen`), so
    they are never saved in checkpoints nor handed to DDP/ZeRO as parameters.
    """

    def __init__(self, optimizer: Callable | None = None, scheduler: Callable | None = None,
                 check_weights_moved: bool = False, frozen_placement: str = "replicated"):
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.check_weights_moved = bool(check_weights_moved)
        self._start_state: dict | None = None
        self.weights_moved: dict | None = None
        self._frozen: dict[str, nn.Module] = {}
        # "replicated": each rank holds whole frozen models (bf16 on GPUs); "zero3": partitioned over the ranks in
        # their own ZeRO-3 inference engines (zebra.stages.zero.inference_engine); the runners pass
        # `teacher_placement`
        self.frozen_placement = frozen_placement
        self._frozen_engines: dict[str, Any] = {}
        self.tokens_seen = 0  # real (non-pad) tokens, summed over ranks' batches on this rank
        self.last_step_tokens = 0
        self.loss_history: list[float] = []

    # frozen models live in a plain dict: not registered, not in state_dict, moved to the device by hand
    def add_frozen(self, name: str, module: nn.Module) -> None:
        self._frozen[name] = freeze(module)

    def frozen(self, name: str) -> nn.Module:
        return self._frozen[name]

    def on_fit_start(self) -> None:
        self._place_frozen(partition=self.frozen_placement == "zero3" and self.trainer.world_size > 1)

    def _place_frozen(self, partition: bool) -> None:
        """Frozen models onto this rank's device, or (`partition`) each into its own ZeRO-3 inference engine;
        models already in an engine stay there."""
        for name, m in self._frozen.items():
            if name in self._frozen_engines:
                continue
            if partition:
                self._frozen_engines[name] = zero.inference_engine(m, self.device, next(m.parameters()).dtype)
            else:
                m.to(self.device)

    # -------------------------------------------------------------------------------------- the trained model
    def adopt_trained(self, model: nn.Module | StudentSpec, gradient_checkpointing: bool = False) -> nn.Module | None:
        """The model a stage trains in full (KD's hybrid, DPO's policy). Given whole, it is made ready and returned;
        a `StudentSpec` is kept for `materialise_trained` (from configure_model) and None is returned."""
        self.spec = model if isinstance(model, StudentSpec) else None
        self.gradient_checkpointing = gradient_checkpointing
        return None if self.spec is not None else prepare_trained(model, gradient_checkpointing)

    def materialise_trained(self, model: nn.Module | None) -> nn.Module:
        """From configure_model: `model` when it was given whole, else the spec's (created sharded under ZeRO-3)."""
        if model is not None:
            return model
        return prepare_trained(self.spec.materialise(self.trainer), self.gradient_checkpointing)

    def trained_config(self, model: nn.Module | None):
        """The trained model's config, also before configure_model has created it."""
        return model.config if model is not None else self.spec.config

    def register_with_engine(self, params: list[torch.nn.Parameter]) -> None:
        """Parameters a training step reads outside their own module's forward (an LM head weight in a chunked
        loss): under ZeRO-3 the engine's root module gathers them for the step and reduces their gradients
        (zebra.stages.zero.register_external; a no-op otherwise). Call from on_train_start."""
        engine = self.trainer.strategy.model
        zero.register_external(getattr(engine, "module", engine), params)

    # -------------------------------------------------------------------------------------- weights moved
    def on_train_start(self) -> None:
        if self.check_weights_moved:  # collective under ZeRO-3: every rank gathers, rank 0 keeps a CPU copy
            self._start_state = self._trainable_state()

    def on_train_end(self) -> None:
        if not self.check_weights_moved:
            return
        after = self._trainable_state()
        if after is not None and self._start_state is not None:
            self.weights_moved = dict(weights_moved(self._start_state, after), compared=self._moved_source)
            if self.weights_moved["unchanged"]:
                msg = (f"{type(self).__name__}: {len(self.weights_moved['unchanged'])} trained tensors never changed "
                       f"(e.g. {self.weights_moved['unchanged'][:3]}): their gradients never reached the optimizer")
                warnings.warn(msg)
                log.warning(msg)
        self._start_state = None

    def _trainable_state(self) -> dict | None:
        """CPU copies of the trained tensors on rank 0 (None elsewhere): DeepSpeed's fp32 master weights where
        its optimiser holds them (the bf16 module copies of weights near 1.0 may not move for many steps), else
        the module's parameters, gathered from ZeRO-3 shards. Collective."""
        rank = self.trainer.global_rank
        trained = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        available, master = zero.master_state_cpu(trained, rank)
        self._moved_source = "fp32 master weights" if available else "module parameters"
        if available:
            return master
        names = {n for n, _ in trained}
        state = zero.state_dict_cpu(self, rank, dtype=torch.float32)
        return None if state is None else {n: t for n, t in state.items() if n in names}

    def on_validation_start(self) -> None:
        self._place_frozen(partition=False)

    def train(self, mode: bool = True):
        super().train(mode)
        for m in getattr(self, "_frozen", {}).values():
            m.eval()
        return self

    def check_finite(self, loss: torch.Tensor, what: str = "loss") -> None:
        if not torch.isfinite(loss.detach()).all():
            raise NonFiniteLossError(
                f"non-finite training {what} ({loss.detach().float().item()}) at step {self.global_step} of stage "
                f"{type(self).__name__}; stopping without export (lower the learning rate, check the data, or use "
                "fp32/bf16 instead of fp16)")

    def token_denominator(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's share of the global batch's tokens: the all-reduced count / world size (the count itself
        on one process or outside training). Dividing a rank's summed per-token loss by it makes the data-
        parallel mean of the ranks' gradients the gradient of the global batch's per-token mean, however the
        real tokens (padding) are spread over the ranks."""
        local = local.detach().float()
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1 or not self.training:
            return local.clamp_min(1.0)
        total = trainer.strategy.reduce(local.clone(), reduce_op="sum")
        return (total / trainer.world_size).clamp_min(1.0)

    def count_tokens(self, batch: dict, key: str = "attention_mask", ids_key: str = "input_ids") -> int:
        m = batch.get(key)
        n = int(m.sum()) if m is not None else batch[ids_key].numel()
        self.last_step_tokens = n
        self.tokens_seen += n
        return n

    def trainable_named_parameters(self):
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return None
        wd = float(getattr(self.optimizer_factory, "keywords", {}).get("weight_decay", 0.0) or 0.0)
        groups = param_groups(self.trainable_named_parameters(), wd)
        if not any(g["params"] for g in groups):
            raise StageError(f"{type(self).__name__}: nothing to train (every parameter is frozen)")
        opt = self.optimizer_factory(groups)
        self._check_clipping(opt)
        if self.scheduler_factory is None:
            return opt
        total = self.trainer.estimated_stepping_batches if self.trainer.max_steps in (-1, None) else \
            self.trainer.max_steps
        sched = self.scheduler_factory(opt, total_steps=int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _check_clipping(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16 (`16-mixed`) scales the loss; an optimizer that unscales inside its own step (fused AdamW) leaves the
        gradients scaled when they are clipped, so clipping them cannot be right: refuse before the first step."""
        trainer = self._trainer
        if trainer is None or not trainer.gradient_clip_val:
            return
        if getattr(trainer.precision_plugin, "scaler", None) is not None \
                and getattr(optimizer, "_step_supports_amp_scaling", False):
            raise StageError(
                f"{type(self).__name__}: precision {trainer.precision} scales the gradients and "
                f"{type(optimizer).__name__}(fused=True) unscales them only inside its step, after gradient clipping "
                "(trainer.gradient_clip_val): set <stage>.optimizer.fused=false, or train in bf16-mixed")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning's base precision plugin does (torch.nn.utils.clip_grad_norm_ over the optimizer's
        parameters) when no GradScaler is in use. Lightning's mixed-precision plugin refuses to clip for any
        optimizer that unscales in its step (fused AdamW), a rule for fp16's scaled gradients; under bf16 autocast
        nothing is scaled, so the refusal would only stop METHOD §4b's clipping at norm 1.0."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.utilities import GradClipAlgorithmType

        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            clip_val = self.trainer.gradient_clip_val if gradient_clip_val is None else gradient_clip_val
            algorithm = gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm"
            algorithm = GradClipAlgorithmType(str(getattr(algorithm, "value", algorithm)).lower())
            Precision.clip_gradients(plugin, optimizer, clip_val or 0.0, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def flops_per_token(self) -> float:
        """Training FLOPs per token (fwd + bwd), for MFU: 6 x trained parameters here; the stages count their
        step from the layer definitions (zebra.plan.flops)."""
        return 6.0 * count_parameters(self, trainable_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["zebra"] = {"tokens_seen": self.tokens_seen, "loss_history": list(self.loss_history)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("zebra", {})
        self.tokens_seen = int(extra.get("tokens_seen", 0))
        self.loss_history = list(extra.get("loss_history", []))


def weights_moved(before: dict, after: dict) -> dict:
    """How many elements of each tensor changed between two state dicts (the ZeRO-3 trap leaves whole tensors
    untouched)."""
    moved = {n: float((after[n] != before[n]).float().mean()) for n in before if n in after}
    return {"tensors": len(moved), "unchanged": sorted(n for n, f in moved.items() if f == 0.0),
            "min_moved_fraction": min(moved.values()) if moved else None,
            "mean_moved_fraction": sum(moved.values()) / len(moved) if moved else None}


def stage_summary(trainer: pl.Trainer | None, module: StageModule | None, wall: float) -> dict:
    hist = list(getattr(module, "loss_history", []) or [])
    return {
        "steps": int(trainer.global_step) if trainer is not None else 0,
        # real tokens of this rank's batches x ranks (ranks see equally long packed rows)
        "tokens_seen": int(getattr(module, "tokens_seen", 0)) * (trainer.world_size if trainer is not None else 1),
        "wall_seconds": round(wall, 2),
        "loss_first": hist[0] if hist else None,
        "loss_last": hist[-1] if hist else None,
        "loss_history": hist,
        **({"weights_moved": module.weights_moved} if getattr(module, "weights_moved", None) else {}),
    }
