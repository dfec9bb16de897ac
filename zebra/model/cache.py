"""HybridCache: per layer either the MLA latent cache or the Mamba2 conv + SSM state.

The cache reports its own size from the tensors it actually holds, so the KV fraction we publish is
measured from allocations, not from a formula.
"""

from __future__ import annotations

import torch

from .configuration_zebra import ZebraConfig


class MLALayerCache:
    """Per token: the compressed latent (r_kv) and the RoPE key(s) (d_rope, or g x d_rope with per-KV-head
    rope keys), already rotated: `config.mla_cache_dim` values.

    Dynamic by default (grows by concatenation); with `max_length` it is preallocated and written in
    place, which keeps tensor addresses fixed for CUDA-graph capture.
    """

    def __init__(self, batch_size: int, dim: int, dtype, device, max_length: int | None = None):
        self.max_length = max_length
        self.length = 0
        n = max_length if max_length is not None else 0
        self.latent = torch.zeros(batch_size, n, dim, dtype=dtype, device=device)

    def append(self, new: torch.Tensor) -> torch.Tensor:
        """Add `new` [B, T, mla_cache_dim] and return every cached entry so far [B, length, mla_cache_dim]."""
        t = new.shape[1]
        if self.max_length is None:
            self.latent = torch.cat([self.latent, new.to(self.latent.dtype)], dim=1)
        else:
            if self.length + t > self.max_length:
                raise ValueError(f"MLA cache full: {self.length} + {t} tokens > max_length {self.max_length}")
            self.latent[:, self.length:self.length + t] = new
        self.length += t
        return self.latent[:, : self.length]

    def write(self, new: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        """Static caches only: write `new` [B, T, mla_cache_dim] into the slots `cache_position` [T] (a device
        tensor) in place and return the whole buffer [B, max_length, mla_cache_dim].

        Nothing here reads a tensor on the host, so the write can sit inside a CUDA graph: every replay writes
        at whatever `cache_position` then holds. Which slots are valid is the caller's mask to keep; `length`
        only counts eager calls (a graph replay runs no Python).
        """
        if self.max_length is None:
            raise ValueError("MLALayerCache.write needs a static cache (make_cache(..., max_length=N))")
        self.latent.index_copy_(1, cache_position, new.to(self.latent.dtype))
        self.length += new.shape[1]
        return self.latent

    def tensors(self) -> list[torch.Tensor]:
        return [self.latent]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.latent = self.latent.index_select(0, beam_idx.to(self.latent.device))


class MambaLayerCache:
    """The last `d_conv` pre-conv [x, B, C] inputs (oldest first) and the SSM state (at least fp32)."""

    def __init__(self, batch_size: int, conv_dim: int, d_conv: int, nheads: int, headdim: int, d_state: int,
                 dtype, device):
        self.conv_state = torch.zeros(batch_size, conv_dim, d_conv, dtype=dtype, device=device)
        # The state accumulates over the whole sequence: never below fp32 (float64 models keep float64).
        state_dtype = torch.promote_types(dtype, torch.float32)
        self.ssm_state = torch.zeros(batch_size, nheads, headdim, d_state, dtype=state_dtype, device=device)
        self.length = 0  # tokens absorbed so far (pads included)

    def tensors(self) -> list[torch.Tensor]:
        return [self.conv_state, self.ssm_state]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.conv_state = self.conv_state.index_select(0, beam_idx.to(self.conv_state.device))
        self.ssm_state = self.ssm_state.index_select(0, beam_idx.to(self.ssm_state.device))


class HybridCache:
    """One cache entry per decoder layer, of the kind its mixer needs."""

    def __init__(self, config: ZebraConfig, batch_size: int, dtype=torch.float32, device=None,
                 max_length: int | None = None):
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length  # None: dynamic (MLA entries grow by concatenation); else static
        self.layers: list[MLALayerCache | MambaLayerCache] = []
        for t in config.hybrid_layer_types:
            if t == "mla":
                self.layers.append(MLALayerCache(batch_size, config.mla_cache_dim, dtype, device, max_length))
            else:
                self.layers.append(MambaLayerCache(batch_size, config.mamba_conv_dim, config.mamba_d_conv,
                                                   config.mamba_nheads, config.mamba_headdim,
                                                   config.mamba_d_state, dtype, device))
        self.seen_tokens = 0

    def __getitem__(self, idx: int):
        return self.layers[idx]

    def __len__(self) -> int:
        return len(self.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def is_static(self) -> bool:
        """Preallocated (fixed shapes and addresses): decodable with a device `cache_position`, CUDA-graph safe."""
        return self.max_length is not None

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        for layer in self.layers:
            layer.reorder(beam_idx)

    # ---- sizes, read from the tensors held ----
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def nbytes_by_kind(self) -> dict[str, int]:
        out = {"mla": 0, "mamba": 0}
        for kind, layer in zip(self.config.hybrid_layer_types, self.layers):
            out[kind] += sum(t.numel() * t.element_size() for t in layer.tensors())
        return out


def measure_cache_bytes(config: ZebraConfig, dtype=torch.bfloat16, batch_size: int = 1,
                        lengths: tuple[int, int] = (1024, 2048)) -> dict[str, float]:
    """Allocate static caches at two lengths on the meta device and read their sizes.

    Returns the sequence-length-dependent bytes per token (per sequence), the constant bytes (per
    sequence), and the same per-token figure for the base Transformer's KV cache allocated the same way
    (K and V of g heads per layer), plus their ratio `kv_fraction`.
    """
    l1, l2 = lengths
    sizes = [HybridCache(config, batch_size, dtype, "meta", max_length=n).nbytes() for n in (l1, l2)]
    per_token = (sizes[1] - sizes[0]) / (l2 - l1) / batch_size
    constant = (sizes[0] - per_token * l1 * batch_size) / batch_size
    base_sizes = []
    for n in (l1, l2):
        kv = [torch.empty(batch_size, config.num_key_value_heads, n, config.head_dim, dtype=dtype, device="meta")
              for _ in range(2 * config.num_hidden_layers)]
        base_sizes.append(sum(t.numel() * t.element_size() for t in kv))
    base_per_token = (base_sizes[1] - base_sizes[0]) / (l2 - l1) / batch_size
    return {
        "cache_bytes_per_token": per_token,
        "cache_constant_bytes": constant,
        "base_kv_bytes_per_token": base_per_token,
        "kv_fraction": per_token / base_per_token,
    }
