"""The two models the generation benchmark measures, behind one interface (`RUNNERS`): the hybrid
(ZebraForCausalLM over its HybridCache) and its Llama base (transformers' LlamaForCausalLM over a StaticCache,
with the same decode attention as the hybrid's absorbed MLA for a one-token step). Each runner builds its model
with random weights of the preset's shapes and knows how to make, fill, measure and step its static cache."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from zebra.model import ZebraConfig, ZebraForCausalLM
from zebra.model.cache import measure_cache_bytes
from zebra.model.ops.decode_attention import decode_attention
from zebra.utils.paths import model_preset_file

PRESET = model_preset_file("zebra_8b")
ATTN_NAME = "zebra_bench"  # the base's attention implementation name (registered below)

# Tiny shapes for --smoke (the same code path; numbers mean nothing).
SMOKE_PRESET = {
    "name": "smoke",
    "base": dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 max_position_embeddings=4096,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 256}),
    "mla": dict(q_lora_rank=64, kv_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32,
                mla_rope="pairs", mamba_chunk_size=16),
    "paper_mla_layers": [0, 2],
}


# ------------------------------------------------------------------------------------------------ configs
def load_preset(path: str | Path) -> dict:
    """The `base`, `mla` and `paper_mla_layers` blocks of a conf/model preset as plain dicts."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(path)
    return {"name": str(node.get("name", Path(path).stem)),
            "base": OmegaConf.to_container(node["base"], resolve=True),
            "mla": OmegaConf.to_container(node["mla"], resolve=True),
            "paper_mla_layers": list(node["paper_mla_layers"])}


def zebra_config(preset: dict) -> ZebraConfig:
    from zebra.plan.describe import zebra_config_from_preset
    from zebra.plan.mixes import layer_types_for

    n = int(preset["base"]["num_hidden_layers"])
    return zebra_config_from_preset(preset, layer_types_for(n, preset["paper_mla_layers"]))


def llama_config(preset: dict):
    from transformers import LlamaConfig

    base = {k: v for k, v in preset["base"].items() if k not in ("bos_token_id", "eos_token_id")}
    return LlamaConfig(**base, attn_implementation="sdpa")  # switched to ATTN_NAME once built (LlamaRunner)


# ------------------------------------------------------------------------------------------------ base attention
def _bench_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function of the base: its SDPA attention, except a one-token step with a prepared
    bool mask [B|1, 1, 1, S] over the static slots, which runs `decode_attention` with the query heads folded
    per KV head (query [B, h, 1, d] -> [B, g, h/g, d] against key/value [B, g, S, d]: no repeat_kv copy)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    g = key.shape[1]
    q = query.reshape(b, g, h // g, d)
    out = decode_attention(q, key, value, attention_mask, scaling, _bench_attention.kernel)  # [B, g, h/g, d]
    return out.reshape(b, 1, h, d), None  # transformers wants [B, T, heads, d]


_bench_attention.kernel = "matmul"


def register_base_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _bench_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# ------------------------------------------------------------------------------------------------ runners
def _build(cls_or_fn, device, dtype, seed):
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in bf16 on the device: no fp32 copy of 8B parameters
    try:
        with torch.device(device):
            model = cls_or_fn()
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def param_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


class ZebraRunner:
    name = "zebra"

    def __init__(self, preset, device, dtype, seed):
        self.config = zebra_config(preset)
        self.model = _build(lambda: ZebraForCausalLM(self.config), device, dtype, seed)
        self.device, self.dtype = torch.device(device), dtype

    def describe(self) -> dict:
        c = self.config
        return {"class": "zebra.model.ZebraForCausalLM", "config": c.to_dict(), "mla_layers": c.mla_layers,
                "expected": measure_cache_bytes(c, dtype=self.dtype)}

    def new_cache(self, batch, max_length):
        return self.model.make_cache(batch, max_length=max_length)

    def cache_parts(self, cache) -> dict:
        """{kind: bytes} of the tensors the cache holds."""
        return {f"{k}_bytes": v for k, v in cache.nbytes_by_kind().items()}

    def step_traffic(self, cache, batch) -> tuple[int, int]:
        """(bytes read, bytes written) of the cache in one decode step: every slot is read (masked or not);
        Mamba2 states are rewritten, MLA gets one entry per row and layer."""
        parts = cache.nbytes_by_kind()
        elem = torch.finfo(self.dtype).bits // 8
        written = parts["mamba"] + batch * self.config.mla_cache_dim * elem * len(self.config.mla_layers)
        return parts["mla"] + parts["mamba"], written

    def fill_random(self, cache, length):
        for layer in cache.layers:
            for t in layer.tensors():
                t.normal_()
            layer.length = length
        cache.seen_tokens = length

    def reset(self, cache):
        for layer in cache.layers:
            for t in layer.tensors():
                t.zero_()
            layer.length = 0
        cache.seen_tokens = 0

    def set_position(self, cache, pos, length):
        pos.fill_(length)

    def prefill(self, cache, ids, chunk):
        out = None
        for s in range(0, ids.shape[1], chunk):
            out = self.model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits

    def set_kernel(self, kernel):
        self.model.config.mla_decode_attention = kernel

    def make_step(self, cache, ids, pos, greedy=True):
        """One decode token through the static path: reads `ids` [B, 1] and `pos` [1] (device tensors), returns
        logits [B, 1, V]; greedy feeds the argmax back into `ids`; `pos` is advanced in place."""
        model = self.model

        def step():
            logits = model(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True,
                           logits_to_keep=1).logits
            if greedy:
                ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)
            return logits

        return step

    def reference_decode(self, prompt, tokens):
        """Eager decode through the ordinary path (dynamic HybridCache): logits of each forced token."""
        cache = self.model.make_cache(prompt.shape[0])
        self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return [self.model(input_ids=t, past_key_values=cache, use_cache=True).logits for t in tokens]


class LlamaRunner:
    name = "llama"

    def __init__(self, preset, device, dtype, seed):
        from transformers import LlamaForCausalLM

        register_base_attention()
        self.config = llama_config(preset)
        self.model = _build(lambda: LlamaForCausalLM(self.config), device, dtype, seed)
        self.model.config._attn_implementation = ATTN_NAME
        self.device, self.dtype = torch.device(device), dtype
        self.g, self.hd = self.config.num_key_value_heads, self.config.head_dim
        # transformers releases differ in how a StaticCache learns where to write: recent ones keep a device-side
        # length per layer (`cumulative_length`, advanced by every update), earlier ones take the model's
        # `cache_position` argument. Both are driven here from the same device position tensor.
        self.pass_cache_position = "cache_position" in inspect.signature(type(self.model.model).forward).parameters

    def describe(self) -> dict:
        return {"class": "transformers.LlamaForCausalLM", "config": self.config.to_dict(),
                "attention": f"{ATTN_NAME}: transformers sdpa (prefill) + zebra.model.ops.decode_attention (decode)"}

    def new_cache(self, batch, max_length):
        from transformers import StaticCache

        cache = StaticCache(config=self.config, max_cache_len=max_length)
        if hasattr(cache, "early_initialization"):
            cache.early_initialization(batch_size=batch, num_heads=self.g, head_dim=self.hd, dtype=self.dtype,
                                       device=self.device)
        else:  # allocate now (not lazily inside the first update), so the allocation can be measured
            empty = torch.zeros(batch, self.g, 0, self.hd, dtype=self.dtype, device=self.device)
            for layer in cache.layers:
                layer.lazy_initialization(empty)
        return cache

    @staticmethod
    def _set_length(layer, length):
        length_now = getattr(layer, "cumulative_length", None)
        if isinstance(length_now, torch.Tensor):
            length_now.fill_(length)

    def _kv(self, cache):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]

    def cache_parts(self, cache) -> dict:
        return {"kv_bytes": sum(t.numel() * t.element_size() for t in self._kv(cache))}

    def step_traffic(self, cache, batch) -> tuple[int, int]:
        kv = self._kv(cache)
        read = sum(t.numel() * t.element_size() for t in kv)
        written = sum(batch * t.shape[1] * t.shape[3] * t.element_size() for t in kv)
        return read, written

    def fill_random(self, cache, length):
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            self._set_length(layer, length)

    def reset(self, cache):
        cache.reset()

    def set_position(self, cache, pos, length):
        pos.fill_(length)
        for layer in cache.layers:
            self._set_length(layer, length)

    def prefill(self, cache, ids, chunk):
        out = None
        for s in range(0, ids.shape[1], chunk):
            out = self.model(input_ids=ids[:, s:s + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits

    def set_kernel(self, kernel):
        _bench_attention.kernel = kernel

    def make_step(self, cache, ids, pos, greedy=True):
        """As ZebraRunner.make_step. The StaticCache writes at its own device-side length (advanced by every
        update); `pos` mirrors it for the RoPE positions and the mask over the slots."""
        model, b = self.model, ids.shape[0]
        slots = torch.arange(cache.layers[0].max_cache_len, device=ids.device)
        extra = {"cache_position": pos} if self.pass_cache_position else {}

        def step():
            mask = (slots <= pos)[None, None, None, :]  # [1, 1, 1, S]: slots written so far, this one included
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos.view(1, 1).expand(b, 1),
                           past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits
            if greedy:
                ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
            pos.add_(1)
            return logits

        return step

    def reference_decode(self, prompt, tokens):
        """transformers' ordinary eager decode (DynamicCache, sdpa attention)."""
        from transformers import DynamicCache

        self.model.config._attn_implementation = "sdpa"
        try:
            cache = DynamicCache(config=self.config)
            self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return [self.model(input_ids=t, past_key_values=cache, use_cache=True).logits for t in tokens]
        finally:
            self.model.config._attn_implementation = ATTN_NAME


RUNNERS = {"zebra": ZebraRunner, "llama": LlamaRunner}
