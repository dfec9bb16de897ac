"""ZebraConfig: the base Transformer's dims plus the hybrid's per-layer mixer choice and mixer dims.

Only relative imports inside `zebra/model` (the files are copied into exports for `trust_remote_code`).
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .ops.dispatch import DECODE_KERNELS, MAMBA_KERNELS, check_choice

LAYER_TYPES = ("mla", "mamba")
MLA_ROPE_VARIANTS = ("pairs", "reference")
MLA_ROPE_KEYS = ("shared", "per_kv_head")


@strict
class ZebraConfig(PreTrainedConfig):
    """Hybrid MLA + Mamba2 decoder built from a Llama-family base (METHOD.md §2).

    Every decoder layer is a Llama block whose mixer is either Multi-head Latent Attention ("mla")
    or an attention-shaped Mamba2 ("mamba"); `hybrid_layer_types` says which, one entry per layer (not
    `layer_types`: transformers reserves that name for its own attention kinds and validates it wherever a
    config.json is read, also by AutoTokenizer in a process that never imported zebra; exports written before the
    rename, which have `layer_types`, still load).
    Unset MLA/Mamba dims default to the base's shapes (full-rank MLA, d_rope = head_dim / 2).
    """

    model_type = "zebra"
    keys_to_ignore_at_inference = ["past_key_values"]

    # --- the base Transformer (Llama block) ---
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    # Llama (transformers v5) convention: {"rope_type": "default" | "llama3", "rope_theta": ..., llama3 keys}
    rope_parameters: dict | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    # --- the layer mix ---
    hybrid_layer_types: list[str] | None = None

    # --- MLA (METHOD §2.2) ---
    q_lora_rank: int | None = None  # r_q
    kv_lora_rank: int | None = None  # r_kv
    qk_rope_head_dim: int | None = None  # d_rope
    qk_nope_head_dim: int | None = None  # d_nope
    v_head_dim: int | None = None  # d_v
    mla_rope: str = "pairs"  # "pairs" (pair-preserving) | "reference" (YaRN on d_rope dims, as released)
    # the decoupled RoPE key: "shared" (one for all heads, as DeepSeek-V2) | "per_kv_head" (one per base KV head,
    # which keeps each base head's own rope key; g x d_rope cached values per token instead of d_rope)
    rope_key: str = "shared"

    # --- attention-shaped Mamba2 (METHOD §2.3) ---
    mamba_d_inner: int | None = None  # h * head_dim
    mamba_d_xb: int | None = None  # g * head_dim
    mamba_nheads: int | None = None  # h (= ngroups)
    mamba_headdim: int | None = None  # head_dim
    mamba_d_state: int | None = None  # head_dim
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 256
    mamba_dt_min: float = 1e-3
    mamba_dt_max: float = 1e-1
    mamba_dt_init_floor: float = 1e-4
    mamba_A_init_min: float = 1.0
    mamba_A_init_max: float = 16.0

    # --- kernels (ops/dispatch.py: what each runs, and the environment variables that override them) ---
    mamba_kernels: str = "auto"  # "auto" (mamba_ssm's on CUDA where it imports) | "torch" | "mamba_ssm"
    fused_kernels: bool = True  # the Triton inference kernels (CUDA, gradients off)
    mla_decode_attention: str = "matmul"  # the absorbed attention's kernel: "matmul" | "sdpa" | "triton"
    mla_absorb_max_tokens: int = 16  # MLA calls of at most this many new tokens after a history: absorbed form

    def __post_init__(self, **kwargs):
        legacy_layer_types = kwargs.pop("layer_types", None)  # the field's name in earlier exports
        if self.hybrid_layer_types is None:
            self.hybrid_layer_types = legacy_layer_types
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        if self.hybrid_layer_types is None:
            self.hybrid_layer_types = ["mla"] * self.num_hidden_layers
        self.hybrid_layer_types = list(self.hybrid_layer_types)
        hd, h, g = self.head_dim, self.num_attention_heads, self.num_key_value_heads
        if self.qk_rope_head_dim is None:
            self.qk_rope_head_dim = hd // 2
        if self.qk_nope_head_dim is None:
            self.qk_nope_head_dim = hd - self.qk_rope_head_dim
        if self.v_head_dim is None:
            self.v_head_dim = hd
        if self.q_lora_rank is None:
            self.q_lora_rank = self.full_q_rank
        if self.kv_lora_rank is None:
            self.kv_lora_rank = self.full_kv_rank
        if self.mamba_nheads is None:
            self.mamba_nheads = h
        if self.mamba_headdim is None:
            self.mamba_headdim = hd
        if self.mamba_d_state is None:
            self.mamba_d_state = hd
        if self.mamba_d_inner is None:
            self.mamba_d_inner = self.mamba_nheads * self.mamba_headdim
        if self.mamba_d_xb is None:
            self.mamba_d_xb = g * hd
        super().__post_init__(**kwargs)
        self.check()

    # ---- derived sizes ----
    @property
    def full_q_rank(self) -> int:
        return min(self.num_attention_heads * self.head_dim, self.hidden_size)

    @property
    def full_kv_rank(self) -> int:
        return min(2 * self.num_key_value_heads * self.head_dim, self.hidden_size)

    @property
    def mla_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.hybrid_layer_types) if t == "mla"]

    @property
    def mamba_conv_dim(self) -> int:
        """Channels of the depthwise conv over [x, B, C] (x and B at d_xb, C at ngroups * d_state)."""
        return 2 * self.mamba_d_xb + self.mamba_nheads * self.mamba_d_state

    @property
    def mla_rope_key_heads(self) -> int:
        """How many RoPE keys an MLA layer computes and caches per token: 1 (shared) or g (per KV head)."""
        return self.num_key_value_heads if self.rope_key == "per_kv_head" else 1

    @property
    def mla_rope_key_dim(self) -> int:
        """Values of RoPE key per token per MLA layer (every rope key slot, d_rope each)."""
        return self.mla_rope_key_heads * self.qk_rope_head_dim

    @property
    def mla_cache_dim(self) -> int:
        """Values cached per token per MLA layer: the latent plus the RoPE key(s)."""
        return self.kv_lora_rank + self.mla_rope_key_dim

    @property
    def base_kv_cache_dim(self) -> int:
        """Values cached per token per layer by the base Transformer (K and V of g heads)."""
        return 2 * self.num_key_value_heads * self.head_dim

    # ---- validation (ValueError names the field) ----
    def check(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"ZebraConfig.{field}: {msg}")

        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                      "head_dim", "intermediate_size", "vocab_size"):
            need(int(getattr(self, field)) > 0, field, f"must be a positive integer, got {getattr(self, field)}")
        h, g, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        need(h % g == 0, "num_key_value_heads",
             f"num_attention_heads ({h}) must be divisible by num_key_value_heads ({g})")
        need(len(self.hybrid_layer_types) == self.num_hidden_layers, "hybrid_layer_types",
             f"has {len(self.hybrid_layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}")
        bad = sorted({t for t in self.hybrid_layer_types if t not in LAYER_TYPES})
        need(not bad, "hybrid_layer_types", f"unknown layer type(s) {bad}; allowed: {list(LAYER_TYPES)}")
        need(self.mla_rope in MLA_ROPE_VARIANTS, "mla_rope",
             f"must be one of {list(MLA_ROPE_VARIANTS)}, got {self.mla_rope!r}")
        need(self.rope_key in MLA_ROPE_KEYS, "rope_key", f"must be one of {list(MLA_ROPE_KEYS)}, got {self.rope_key!r}")
        d_rope, d_nope, d_v = self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim
        need(d_rope > 0 and d_rope % 2 == 0, "qk_rope_head_dim", f"must be a positive even number, got {d_rope}")
        need(d_nope >= 0, "qk_nope_head_dim", f"must be >= 0, got {d_nope}")
        need(d_v > 0, "v_head_dim", f"must be positive, got {d_v}")
        need(d_nope + d_rope == hd, "qk_nope_head_dim",
             f"qk_nope_head_dim + qk_rope_head_dim ({d_nope} + {d_rope}) must equal head_dim ({hd}): "
             "each base query/key dim becomes exactly one nope or rope dim")
        need(0 < self.q_lora_rank <= self.full_q_rank, "q_lora_rank",
             f"must be in [1, min(heads*head_dim, hidden) = {self.full_q_rank}], got {self.q_lora_rank}")
        need(0 < self.kv_lora_rank <= self.full_kv_rank, "kv_lora_rank",
             f"must be in [1, min(2*kv_heads*head_dim, hidden) = {self.full_kv_rank}], got {self.kv_lora_rank}")
        rt = self.rope_parameters.get("rope_type", "default")
        need(rt in ("default", "llama3"), "rope_parameters",
             f"rope_type {rt!r} is not supported (default or llama3)")
        need(float(self.rope_parameters.get("rope_theta", 0)) > 0, "rope_parameters", "needs a positive rope_theta")
        nh, hp, ds = self.mamba_nheads, self.mamba_headdim, self.mamba_d_state
        need(self.mamba_d_inner == nh * hp, "mamba_d_inner",
             f"must equal mamba_nheads * mamba_headdim ({nh} * {hp}), got {self.mamba_d_inner}")
        need(self.mamba_d_xb > 0 and self.mamba_d_xb % hp == 0, "mamba_d_xb",
             f"must be a positive multiple of mamba_headdim ({hp}), got {self.mamba_d_xb}")
        need(self.mamba_d_xb // hp > 0 and nh % (self.mamba_d_xb // hp) == 0, "mamba_d_xb",
             f"mamba_nheads ({nh}) must be divisible by mamba_d_xb / mamba_headdim ({self.mamba_d_xb // hp})")
        need(self.mamba_d_xb == (self.mamba_d_xb // hp) * ds, "mamba_d_state",
             f"B is projected at width mamba_d_xb ({self.mamba_d_xb}), so mamba_d_state must equal "
             f"mamba_headdim ({hp}), got {ds}")
        need(self.mamba_d_conv >= 1, "mamba_d_conv", f"must be >= 1, got {self.mamba_d_conv}")
        need(self.mamba_chunk_size >= 1, "mamba_chunk_size", f"must be >= 1, got {self.mamba_chunk_size}")
        need(0 < self.mamba_dt_min <= self.mamba_dt_max, "mamba_dt_min", "need 0 < mamba_dt_min <= mamba_dt_max")
        need(0 < self.mamba_A_init_min <= self.mamba_A_init_max, "mamba_A_init_min",
             "need 0 < mamba_A_init_min <= mamba_A_init_max")
        if not math.isfinite(self.rms_norm_eps) or self.rms_norm_eps <= 0:
            raise ValueError(f"ZebraConfig.rms_norm_eps: must be positive, got {self.rms_norm_eps}")
        check_choice("ZebraConfig.mamba_kernels", self.mamba_kernels, MAMBA_KERNELS)
        check_choice("ZebraConfig.mla_decode_attention", self.mla_decode_attention, DECODE_KERNELS)
        need(isinstance(self.fused_kernels, bool), "fused_kernels",
             f"must be True or False, got {self.fused_kernels!r}")
        need(self.mla_absorb_max_tokens >= 0, "mla_absorb_max_tokens",
             f"must be >= 0, got {self.mla_absorb_max_tokens}")
