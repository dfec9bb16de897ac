"""Attention-shaped Mamba2 mixer (METHOD.md §2.3, as in MambaInLlama).

Shaped so that an attention layer maps onto it (C <- W_q, B <- W_k, x <- W_v, out_proj <- W_o): x and B are
projected at the KV width d_xb = g * head_dim, pass the depthwise conv at that width, and are then repeated
to the h heads exactly as GQA repeats K/V; C has one group per head. The scan and conv live in `ops/ssd.py`,
the kernel choice (`config.mamba_kernels`, `config.fused_kernels`) in `ops/dispatch.py`; this file is the layer
around them, and decides the kernels once per call for all of its parts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MambaLayerCache
from .configuration_zebra import ZebraConfig
from .ops.dispatch import fused_inference, mamba_backend
from .ops.fused_state_update import fused_state_update
from .ops.ssd import chunk_scan, conv1d, conv_update, gated_rmsnorm, state_update

# Kept in (at least) fp32 whatever the module is cast to, and excluded from weight decay.
FP32_PARAMS = ("A_log", "D", "dt_bias")


class GatedRMSNorm(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: RMSNorm_group(y * SiLU(z)) * weight, the RMS
    taken over groups of `group_size` channels (one head each)."""

    def __init__(self, hidden_size: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        return gated_rmsnorm(y, z, self.weight, self.eps, self.group_size, backend=backend)


class DepthwiseCausalConv(nn.Conv1d):
    """The mixer's depthwise causal conv over [x, B, C] (weights named `conv1d.weight`, `conv1d.bias`).

    The mixer calls this module rather than reading `conv1d.weight` itself: parameter-sharding wrappers (DeepSpeed
    ZeRO-3) gather a module's parameters when its forward runs and reduce their gradients after its backward, so
    a weight read from outside its own module's forward would stay unfetched (or, if small enough to stay whole
    on every rank, silently never updated)."""

    def forward(self, xBC: torch.Tensor, *, seq_idx: torch.Tensor | None = None,
                conv_state: torch.Tensor | None = None, decode: bool = False, activation: bool = True,
                backend: str = "torch", fused: bool = False) -> torch.Tensor:
        weight = self.weight.squeeze(1)  # [conv_dim, d_conv]
        if decode:
            return conv_update(xBC[:, 0], conv_state, weight, self.bias, activation=activation,
                               backend=backend, fused=fused)[:, None]
        return conv1d(xBC, weight, self.bias, seq_idx=seq_idx, conv_state=conv_state, activation=activation,
                      backend=backend)


def is_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter that a sharding wrapper (ZeRO-3) has partitioned away: its local tensor is empty and
    its real shape is kept aside; initialisers skip it (its values were set before partitioning)."""
    return param.numel() == 0 and hasattr(param, "ds_shape")


class Mamba2Mixer(nn.Module):
    def __init__(self, config: ZebraConfig, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner = config.mamba_d_inner
        self.d_xb = config.mamba_d_xb
        self.nheads = config.mamba_nheads
        self.headdim = config.mamba_headdim
        self.d_state = config.mamba_d_state
        self.d_conv = config.mamba_d_conv
        self.chunk_size = config.mamba_chunk_size
        self.n_xb_groups = self.d_xb // self.headdim  # g: the KV heads x and B come in
        self.conv_dim = config.mamba_conv_dim  # [x, B, C] = 2 * d_xb + nheads * d_state

        # Test-only switches (METHOD §3's mapping identity): the post-conv SiLU, and the gate + norm.
        self.use_conv_activation = True
        self.use_gated_norm = True

        self.in_proj = nn.Linear(self.hidden_size, 2 * self.d_inner + 2 * self.d_xb + self.nheads, bias=False)
        self.conv1d = DepthwiseCausalConv(self.conv_dim, self.conv_dim, kernel_size=self.d_conv,
                                          groups=self.conv_dim, bias=True, padding=self.d_conv - 1)
        # Explicit fp32: from_pretrained(dtype=bf16) builds under a bf16 default dtype.
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(self.nheads, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.nheads, dtype=torch.float32))
        for name in FP32_PARAMS:
            getattr(self, name)._no_weight_decay = True
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.headdim, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, self.hidden_size, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba2's init of dt_bias, A_log, D and the norm weight (parameters a checkpoint load has already
        set, flagged `_is_hf_initialized` by transformers, are left alone)."""
        c, n = self.config, self.nheads

        def fill(param, value):
            if not getattr(param, "_is_hf_initialized", False) and not is_partitioned(param):
                param.copy_(value)

        # dt log-uniform in [dt_min, dt_max], floored; dt_bias = softplus^-1(dt) = dt + log(1 - exp(-dt)).
        dt = torch.exp(torch.rand(n) * (math.log(c.mamba_dt_max) - math.log(c.mamba_dt_min))
                       + math.log(c.mamba_dt_min)).clamp(min=c.mamba_dt_init_floor)
        fill(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        fill(self.A_log, torch.log(torch.empty(n).uniform_(c.mamba_A_init_min, c.mamba_A_init_max)))
        fill(self.D, torch.ones(n))
        fill(self.norm.weight, torch.ones(self.d_inner))

    def _apply(self, fn, recurse=True):
        """Keep A_log, D and dt_bias in at least fp32 when the module is cast (`.to(bf16)`, `.half()`):
        exp(A_log) and softplus(dt + dt_bias) lose too much in 8 mantissa bits. Device moves still apply."""
        held = {name: self._parameters[name] for name in FP32_PARAMS}
        for name in held:
            self._parameters[name] = None  # hidden from the default pass
        try:
            super()._apply(fn, recurse)
        finally:
            for name, param in held.items():
                self._parameters[name] = param
        for param in held.values():
            for t in (param, param.grad):
                if t is None:
                    continue
                moved = fn(t.data)
                if moved.is_floating_point() and moved.dtype.itemsize < 4:
                    moved = t.data.to(device=moved.device, dtype=torch.float32)
                t.data = moved  # in place: optimizer references and attributes survive
        return self

    # ------------------------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: MambaLayerCache | None = None, cache_position: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """hidden_states [B, T, H] -> [B, T, H] (the mixer call of ZebraDecoderLayer, as MLA; position_ids unused).

        attention_mask [B, past + T] (0 = pad): pads get their pre-conv xBC, x and dt zeroed, so they never
        reach a conv window or the state. doc_ids [B, T]: state and conv taps reset at document
        boundaries. cache: updated in place; a one-token call with history takes the decode step.
        cache_position [T] (device tensor; static HybridCache): the slots of the new tokens, so that
        attention_mask is [B, max_length] over all slots; a one-token call then always takes the decode step
        (from zero states it equals the full forward), which reads no host-side length: CUDA-graph safe.
        """
        b, t, _ = hidden_states.shape
        backend = mamba_backend(self.config, hidden_states.device, hidden_states.dtype)
        fused = backend == "mamba_ssm" and fused_inference(self.config)  # the GPU kernels' backend implies CUDA
        has_past = cache is not None and cache.length > 0
        if doc_ids is not None and has_past:
            raise ValueError("doc_ids (packed rows) are only supported without a cache history")

        z, xBC, dt = self.in_proj(hidden_states).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        keep = None
        if attention_mask is not None:
            new = attention_mask[:, -t:] if cache_position is None else attention_mask.index_select(1, cache_position)
            keep = new.to(xBC.dtype)[..., None]  # [B, T, 1]
            xBC = xBC * keep

        decode = cache is not None and t == 1 and (has_past or cache_position is not None)
        if decode:
            xBC = self.conv1d(xBC, conv_state=cache.conv_state, decode=True, activation=self.use_conv_activation,
                              backend=backend, fused=fused)
        else:
            pre_conv = xBC
            xBC = self.conv1d(xBC, seq_idx=doc_ids, conv_state=cache.conv_state if has_past else None,
                              activation=self.use_conv_activation, backend=backend)
            if cache is not None:  # after the conv, which reads the old window
                self._store_conv_state(cache, pre_conv, doc_ids)
        x, B, C = xBC.split([self.d_xb, self.d_xb, self.nheads * self.d_state], dim=-1)

        if decode and keep is None and fused:
            # inference on a GPU: decay, softplus, the per-head copies of x and B and the update in one kernel
            # (with a padding mask `_ssm` zeroes the pads' steps)
            y = fused_state_update(cache.ssm_state, x[:, 0].reshape(b, self.n_xb_groups, self.headdim), dt[:, 0],
                                   self.A_log, B[:, 0].reshape(b, self.n_xb_groups, self.d_state),
                                   C[:, 0].reshape(b, self.nheads, self.d_state), self.D,
                                   dt_bias=self.dt_bias)[:, None]
        else:
            y = self._ssm(x, B, C, dt, keep, cache, decode, has_past, doc_ids, backend)
        if cache is not None:
            cache.length += t

        y = y.reshape(b, t, self.d_inner)
        if self.use_gated_norm:
            y = self.norm(y, z, backend=backend)
        return self.out_proj(y.to(self.out_proj.weight.dtype))

    def _ssm(self, x, B, C, dt, keep, cache, decode, has_past, doc_ids, backend) -> torch.Tensor:
        """The eager SSM: decay and step sizes, per-head x and B, then the state update (decode) or the chunked
        scan -> y [B, T, H, P]."""
        b, t = x.shape[:2]
        # Step sizes and decay in (at least) fp32, from the fp32 parameters.
        # At least fp32 even when a wrapper (DeepSpeed bf16) has cast the parameters themselves to bf16.
        cd = torch.promote_types(torch.promote_types(dt.dtype, self.dt_bias.dtype), torch.float32)
        A = -torch.exp(self.A_log.to(cd))
        dt_bias = None
        if decode and keep is None:
            dt_bias = self.dt_bias  # the step applies softplus(dt + dt_bias) itself (inside the kernel on CUDA)
        else:
            dt = F.softplus(dt.to(cd) + self.dt_bias.to(cd))
        if keep is not None:
            dt = dt * keep.to(cd)
            x = x * keep

        # GQA-style: x and B come in g groups; head j reads group j // (nheads / g).
        rep = self.nheads // self.n_xb_groups
        x = x.reshape(b, t, self.n_xb_groups, self.headdim).repeat_interleave(rep, dim=2)
        B = B.reshape(b, t, self.n_xb_groups, self.d_state).repeat_interleave(rep, dim=2)
        C = C.reshape(b, t, self.nheads, self.d_state)

        if decode:
            y = state_update(cache.ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D, backend=backend,
                             dt_bias=dt_bias)[:, None]
        else:
            initial = cache.ssm_state if has_past else None
            y, final_state = chunk_scan(x, dt, A, B, C, self.D, self.chunk_size, initial_state=initial,
                                        seq_idx=doc_ids, backend=backend)
            if cache is not None:
                cache.ssm_state.copy_(final_state)
        return y

    def _store_conv_state(self, cache: MambaLayerCache, xBC: torch.Tensor, doc_ids: torch.Tensor | None) -> None:
        """The last d_conv pre-conv inputs (older cached ones first when the chunk is short), for decode.
        Inputs from an earlier document than the last token's are zeroed, so decode cannot reach them."""
        W = self.d_conv
        window = xBC.transpose(1, 2)  # [B, conv_dim, T]
        if cache.length > 0:
            window = torch.cat([cache.conv_state.to(window.dtype), window], dim=-1)
        window = F.pad(window, (max(W - window.shape[-1], 0), 0))[..., -W:]
        if doc_ids is not None:
            tail = F.pad(doc_ids, (max(W - doc_ids.shape[-1], 0), 0), value=-1)[:, -W:]
            window = window * (tail == doc_ids[:, -1:])[:, None, :]
        cache.conv_state.copy_(window)
