"""Multi-head Latent Attention (DeepSeek-V2 style) with a GQA-shaped up-projection (METHOD.md §2.2).

Per token the layer caches only the latent c_kv (r_kv) and the rotated RoPE key: one shared by all heads
(d_rope, `rope_key: shared`) or one per KV head (g x d_rope, `rope_key: per_kv_head`, so that each base KV
head keeps its own rope key). Query head j uses KV head j // (h/g) for its nope key, rope key slot and value,
as GQA's repeat_kv.

Two ways to compute the same attention:
- materialised (training, prefill): up-project the latents to g heads of [k_nope; v], append the shared
  rope key to every group's key, and call SDPA with GQA (flash on GPU when there is no mask);
- absorbed (decode): fold kv_b's key rows into the query and its value rows into the output, so the
  query lives in latent space and attention runs against the cache entries themselves. With per-KV-head
  rope keys the query of a head in group j carries its rope part in slot j and zeros in the other groups'
  slots, so one key (the whole cache entry) still serves every head and the decode kernels are unchanged.

With a static cache and a device `cache_position` (the write slots, a tensor) the layer takes the
CUDA-graph-safe path: entries are written in place at `cache_position` and the queries attend over the whole
preallocated buffer, slots past their own position masked, so nothing depends on a host-side length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import MLALayerCache
from .ops.decode_attention import decode_attention
from .ops.dispatch import decode_kernel
from .packing import block_causal_mask
from .rope import MLARotaryEmbedding


def attention_mask_for(t: int, s: int, doc_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                       device) -> tuple[torch.Tensor | None, bool]:
    """(bool mask [B|1, 1, t, s] or None, is_causal) for t new queries at the end of s keys.

    None + is_causal=True is the plain causal case (SDPA can then use flash). A query always sees its own
    key, so a pad query's row is never empty (an all-masked row gives NaN).
    """
    past = s - t
    if doc_ids is not None:
        if past:
            raise ValueError("doc_ids (packed rows) are only supported without a cache history")
        return block_causal_mask(doc_ids, attention_mask), False
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # no padding: keep the mask-free (flash) path
    if attention_mask is None:
        if t == 1:
            return None, False  # one query at the end sees every key
        if past == 0:
            return None, True
    q_pos = torch.arange(past, s, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return mask, False


def static_attention_mask(cache_position: torch.Tensor, s: int,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [B|1, 1, T, s] for queries written at slots `cache_position` [T] of a static cache of s slots:
    a query sees the slots up to its own (later ones are not written yet, or stale) and, with a padding
    `attention_mask` [B, s] over the slots (0 = pad), no pads but always itself. Built from device tensors
    only, so it can be recorded in a CUDA graph."""
    k_pos = torch.arange(s, device=cache_position.device)
    visible = k_pos[None, :] <= cache_position[:, None]  # [T, s]
    if attention_mask is None:
        return visible[None, None]
    if attention_mask.shape[-1] != s:
        raise ValueError(f"with a static cache the attention_mask covers all {s} slots, got {attention_mask.shape[-1]}")
    own = (k_pos[None, :] == cache_position[:, None])[None, None]
    return (visible[None, None] & attention_mask.bool()[:, None, None, :]) | own


def memoized(memo: dict | None, key, compute):
    """compute(), kept in `memo` under `key` for the next layer of the same forward (no memo: computed each time)."""
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, config, layer_idx: int | None = None):
        super().__init__()
        self.config = config  # read at each call: mla_absorb_max_tokens, mla_decode_attention (ops/dispatch.py)
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads  # h
        self.num_kv_heads = config.num_key_value_heads  # g
        self.q_lora_rank = config.q_lora_rank  # r_q
        self.kv_lora_rank = config.kv_lora_rank  # r_kv
        self.d_nope = config.qk_nope_head_dim
        self.d_rope = config.qk_rope_head_dim
        self.d_v = config.v_head_dim
        self.n_rope_keys = config.mla_rope_key_heads  # 1 (shared) or g (per KV head)
        self.softmax_scale = (self.d_nope + self.d_rope) ** -0.5
        h, g, H = self.num_heads, self.num_kv_heads, config.hidden_size

        self.q_a_proj = nn.Linear(H, self.q_lora_rank, bias=False)
        self.q_b_proj = nn.Linear(self.q_lora_rank, h * (self.d_nope + self.d_rope), bias=False)
        self.kv_a_proj = nn.Linear(H, self.kv_lora_rank + self.n_rope_keys * self.d_rope, bias=False)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, g * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(h * self.d_v, H, bias=False)
        self.rotary_emb = MLARotaryEmbedding(config)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache: MLALayerCache | None = None,
                absorb: bool | None = None, cache_position: torch.Tensor | None = None, memo: dict | None = None,
                **kwargs) -> torch.Tensor:
        """hidden_states [B, T, H] -> [B, T, H] (the mixer call of ZebraDecoderLayer, as Mamba2Mixer).

        `absorb`: None picks the absorbed form when the cache already holds tokens and at most
        `config.mla_absorb_max_tokens` are new (decode); True / False force one form (tests, benchmarks).
        `cache_position` [T] (device tensor, static cache only): the slots the new tokens are written to; the
        CUDA-graph-safe path (module docstring). `attention_mask` is then [B, max_length] over the slots.
        `memo`: a dict shared by the layers of one forward (static path), which keeps the RoPE cos/sin and the slot
        mask the first MLA layer computes for the others (the same for every layer: 8 small kernels a layer).
        """
        b, t, _ = hidden_states.shape
        r, dr = self.kv_lora_rank, self.d_rope

        q = self.q_b_proj(self.q_a_proj(hidden_states)).view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rope = q.split([self.d_nope, dr], dim=-1)  # [B, h, T, .]
        nr = self.n_rope_keys
        latent, k_rope = self.kv_a_proj(hidden_states).split([r, nr * dr], dim=-1)  # [B, T, r], [B, T, nr*dr]

        cos, sin = memoized(memo, ("rope", q.dtype), lambda: self.rotary_emb(position_ids, q.dtype))
        q_rope = self.rotary_emb.rotate(q_rope, cos[:, None], sin[:, None])
        if nr == 1:
            k_rope = self.rotary_emb.rotate(k_rope, cos, sin)
        else:  # each slot rotated alone, then flat again: the cache holds [latent, slot 0, ..., slot g-1]
            k_rope = self.rotary_emb.rotate(k_rope.view(b, t, nr, dr), cos[:, :, None], sin[:, :, None]).flatten(2)

        if cache_position is not None:
            out = self._static(q_nope, q_rope, latent, k_rope, cache, cache_position, doc_ids, attention_mask, absorb,
                               memo)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.d_v))

        past, entries = 0, None
        if cache is not None:
            past = cache.length
            entries = cache.append(torch.cat([latent, k_rope], dim=-1))
            if past:  # attend over every cached token, not just the new ones
                entries = entries.to(q.dtype)
                latent, k_rope = entries.split([r, nr * dr], dim=-1)
            else:
                entries = None
        s = latent.shape[1]
        mask, is_causal = attention_mask_for(t, s, doc_ids, attention_mask, hidden_states.device)

        if absorb is None:
            absorb = past > 0 and t <= self.config.mla_absorb_max_tokens
        if absorb:
            if entries is None:
                entries = torch.cat([latent, k_rope], dim=-1)
            out = self._absorbed(q_nope, q_rope, entries, mask, is_causal)
        else:
            out = self._materialised(q_nope, q_rope, latent, k_rope, mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.d_v))

    def _static(self, q_nope, q_rope, latent, k_rope, cache, cache_position, doc_ids, attention_mask,
                absorb, memo=None) -> torch.Tensor:
        """The static-cache path: write at `cache_position`, attend over every slot under a position mask."""
        if cache is None or getattr(cache, "max_length", None) is None:
            raise ValueError("cache_position needs a static cache (make_cache(batch, max_length=N))")
        if doc_ids is not None:
            raise ValueError("doc_ids (packed rows) are not supported with cache_position")
        entries = cache.write(torch.cat([latent, k_rope], dim=-1), cache_position).to(q_nope.dtype)
        mask = memoized(memo, ("mask", entries.shape[1]),
                        lambda: static_attention_mask(cache_position, entries.shape[1], attention_mask))
        if absorb is None:
            absorb = q_nope.shape[2] <= self.config.mla_absorb_max_tokens
        if absorb:
            return self._absorbed(q_nope, q_rope, entries, mask, False)
        latent, k_rope = entries.split([self.kv_lora_rank, self.n_rope_keys * self.d_rope], dim=-1)
        return self._materialised(q_nope, q_rope, latent, k_rope, mask, False)

    def _materialised(self, q_nope, q_rope, latent, k_rope, mask, is_causal) -> torch.Tensor:
        """Attention on up-projected K/V at the g KV heads -> [B, h, T, d_v]. k_rope [B, S, n_rope_keys * d_rope]."""
        b, s, _ = latent.shape
        g = self.num_kv_heads
        kv = self.kv_b_proj(latent).view(b, s, g, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)  # [B, g, S, .]
        if self.n_rope_keys == 1:
            k_rope = k_rope[:, None].expand(b, g, s, self.d_rope)
        else:
            k_rope = k_rope.view(b, s, g, self.d_rope).transpose(1, 2)
        k = torch.cat([k_nope, k_rope], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        gqa = g != self.num_heads
        if gqa and mask is not None and q.is_cuda:
            # SDPA runs GQA only in its flash kernel (which takes no mask) and the math one (which holds
            # all B*h*T*S scores): with a mask, repeating K/V to h heads is cheaper than that fallback.
            n = self.num_heads // g
            k, v, gqa = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1), False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                              scale=self.softmax_scale, enable_gqa=gqa)

    def _absorbed(self, q_nope, q_rope, entries, mask, is_causal) -> torch.Tensor:
        """Attention against the cache entries [B, S, r_kv + n_rope_keys * d_rope] directly -> [B, h, T, d_v]."""
        b, h, t, _ = q_nope.shape
        g, n, r = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.kv_lora_rank
        w = self.kv_b_proj.weight.view(g, self.d_nope + self.d_v, r)
        w_uk, w_uv = w[:, : self.d_nope], w[:, self.d_nope:]  # [g, d_nope, r], [g, d_v, r]

        # q_nope . (W_uk c) = (W_uk^T q_nope) . c: a query in latent space, per head with its group's W_uk.
        q_latent = torch.einsum("bgntd,gdr->bgntr", q_nope.view(b, g, n, t, self.d_nope), w_uk)
        if self.n_rope_keys > 1:
            # group j's rope query in slot j, zeros elsewhere: its scores see only its own group's rope key
            slots = torch.eye(g, dtype=q_rope.dtype, device=q_rope.device)
            q_rope = torch.einsum("bgntd,gk->bgntkd", q_rope.view(b, g, n, t, self.d_rope), slots)
            q_rope = q_rope.reshape(b, h, t, g * self.d_rope)
        q = torch.cat([q_latent.reshape(b, h, t, r), q_rope], dim=-1)
        d = q.shape[-1]  # r + n_rope_keys * d_rope
        k = entries[:, None]  # [B, 1, S, d]: the cache entries
        v = entries[:, None, :, :r]  # [B, 1, S, r]: their latents (a view, no copy)

        # All heads share this one key/value, so fold the heads into the query length: a one-head
        # attention that every SDPA backend takes (no GQA needed). The mask is repeated per head to match
        # (a broadcast view when T = 1).
        q = q.reshape(b, 1, h * t, d)
        s = entries.shape[1]
        if is_causal:
            mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()[None, None]
        if mask is not None:
            mask = mask.expand(mask.shape[0], h, t, s).reshape(mask.shape[0], 1, h * t, s)
        out = decode_attention(q, k, v, mask, self.softmax_scale, decode_kernel(self.config))

        # Up-project the attended latents with each head's group's value rows.
        out = torch.einsum("bgntr,gvr->bgntv", out.view(b, g, n, t, r), w_uv)
        return out.reshape(b, h, t, self.d_v)
