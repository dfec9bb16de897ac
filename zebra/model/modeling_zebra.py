"""ZebraForCausalLM: a Llama-block decoder whose mixers are MLA or attention-shaped Mamba2 layers.

Plain single-device PyTorch + transformers. Parallelism, mixed precision and training loops are
applied from outside (zebra.stages); nothing here imports Lightning, Hydra or DeepSpeed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .cache import HybridCache
from .configuration_zebra import ZebraConfig
from .mamba2 import Mamba2Mixer, is_partitioned
from .mla import MultiHeadLatentAttention
from .ops.dispatch import fused_inference
from .ops.fused_mlp import fused_silu_mul
from .ops.fused_norm import fused_rms_norm
from .packing import doc_ids_from_position_ids, is_packed
from .rope import MLARotaryEmbedding


class ZebraRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, config: ZebraConfig | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.config = config  # its `fused_kernels` switch; without a config (a norm on its own) always eager

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """`weight * rms_norm(x)`; with `residual`, (`weight * rms_norm(residual + x)`, `residual + x`).

        Llama's numerics: x * rsqrt(mean(x^2) + eps) computed in fp32 for bf16/fp16 inputs (torch's rms_norm
        upcasts them), rounded to x's dtype, then scaled by the weight. For inference on CUDA one Triton kernel
        does the add and the norm (zebra.model.ops.fused_norm: three kernels become one)."""
        if self.config is not None and fused_inference(self.config, x) and not is_partitioned(self.weight):
            return fused_rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            summed = residual + x
            return self.weight * F.rms_norm(summed, (summed.shape[-1],), eps=self.eps), summed
        return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)


class ZebraMLP(nn.Module):
    def __init__(self, config: ZebraConfig):
        super().__init__()
        self.config = config
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if fused_inference(self.config, x):  # one kernel instead of two (zebra.model.ops.fused_mlp)
            return self.down_proj(fused_silu_mul(gate, up))
        return self.down_proj(F.silu(gate) * up)


class ZebraDecoderLayer(GradientCheckpointingLayer):
    """`h = h + Mixer(RMSNorm(h)); h = h + MLP(RMSNorm(h))`, the mixer being MLA or Mamba2."""

    def __init__(self, config: ZebraConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.hybrid_layer_types[layer_idx]
        self.input_layernorm = ZebraRMSNorm(config.hidden_size, config.rms_norm_eps, config)
        mixer_cls = MultiHeadLatentAttention if self.layer_type == "mla" else Mamba2Mixer
        self.mixer = mixer_cls(config, layer_idx)
        self.post_attention_layernorm = ZebraRMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.mlp = ZebraMLP(config)

    def forward(self, hidden_states: torch.Tensor, position_ids: torch.Tensor | None = None,
                doc_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                cache=None, cache_position: torch.Tensor | None = None, memo: dict | None = None,
                **kwargs) -> torch.Tensor:
        if position_ids is None:
            b, t = hidden_states.shape[:2]
            position_ids = torch.arange(t, device=hidden_states.device).expand(b, t)
        mixed = self.mixer(self.input_layernorm(hidden_states), position_ids=position_ids, doc_ids=doc_ids,
                           attention_mask=attention_mask, cache=cache, cache_position=cache_position, memo=memo)
        normed, hidden_states = self.post_attention_layernorm(mixed, residual=hidden_states)  # h + mixed, normed
        return hidden_states + self.mlp(normed)


class ZebraPreTrainedModel(PreTrainedModel):
    config_class = ZebraConfig
    config: ZebraConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ZebraDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    # The SSM parameters stay fp32 under bf16 (METHOD §4b).
    _keep_in_fp32_modules_strict = ["A_log", "D", "dt_bias"]

    def _init_weights(self, module):
        if any(is_partitioned(p) for p in module.parameters(recurse=False)):
            return  # sharded by ZeRO-3 after its constructor initialised it; zebra.stages.zero inits it gathered
        if isinstance(module, Mamba2Mixer):
            # Mamba2's own init (dt_bias, A_log, D, norm; conv as torch's default), not N(0, 0.02).
            module.reset_ssm_parameters()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
        elif isinstance(module, ZebraRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, MLARotaryEmbedding):
            # Non-persistent buffer: from_pretrained leaves it uninitialised memory unless we refill it.
            module.reset_inv_freq()
        elif isinstance(module, nn.Conv1d):
            return  # handled with its Mamba2Mixer above
        else:
            super()._init_weights(module)


class ZebraModel(ZebraPreTrainedModel):
    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([ZebraDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = ZebraRMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: HybridCache | None = None,
                use_cache: bool | None = None, inputs_embeds: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, start_layer: int = 0,
                cache_position: torch.Tensor | None = None, **kwargs) -> BaseModelOutputWithPast:
        """`start_layer=i` runs only layers i.. with `inputs_embeds` as the hidden state entering layer i: SMART
        re-runs the top of the stack from cached hidden states when it swaps one layer.

        `cache_position` [T] (a device LongTensor; needs a static `past_key_values`, `make_cache(batch,
        max_length=N)`): the cache slots of the T new tokens, the same in every row. This is the CUDA-graph-safe
        path: no host syncs, fixed shapes, writes in place at the slots the tensor holds, so a recorded step
        replays at whatever position the tensor has been advanced to. `attention_mask` is then None or [B, N]
        over all slots (1 = real token); `position_ids` default to `cache_position` (or, with a mask, count
        the real tokens before each slot)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        b, t = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = HybridCache(self.config, b, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
        if cache_position is not None:
            return self._forward_static(inputs_embeds, attention_mask, position_ids, past_key_values,
                                        cache_position, start_layer, use_cache)
        past = past_key_values.seen_tokens if past_key_values is not None else 0

        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2D padding mask [batch, tokens], got {attention_mask.dim()}D")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: lets MLA use the plain causal (flash) path
        if position_ids is None:
            if attention_mask is not None:
                # Left padding (generate): real tokens count from 0, pads get 1 as in transformers.
                position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -t:]
            else:
                position_ids = torch.arange(past, past + t, device=inputs_embeds.device).expand(b, t)
        # Packed rows (position ids restarting at 0) are split into documents; only on a fresh forward,
        # since a cache continues one document per row.
        doc_ids = None
        if past == 0 and t > 1 and is_packed(position_ids):
            doc_ids = doc_ids_from_position_ids(position_ids)

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if i < start_layer:
                continue
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, position_ids=position_ids, doc_ids=doc_ids,
                                  attention_mask=attention_mask,
                                  cache=past_key_values[i] if past_key_values is not None else None)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)  # the last entry is after the final norm, as in transformers
        if past_key_values is not None:
            past_key_values.seen_tokens += t
        return BaseModelOutputWithPast(last_hidden_state=hidden_states,
                                       past_key_values=past_key_values if use_cache else None,
                                       hidden_states=tuple(all_hidden) if all_hidden is not None else None)


    def _forward_static(self, hidden_states, attention_mask, position_ids, cache, cache_position, start_layer,
                        use_cache) -> BaseModelOutputWithPast:
        """The static-cache path of `forward` (its docstring): nothing here reads a tensor on the host."""
        b, t = hidden_states.shape[:2]
        if cache is None or not getattr(cache, "is_static", False):
            raise ValueError("cache_position needs a static HybridCache: model.make_cache(batch, max_length=N)")
        if cache_position.dim() != 1 or cache_position.shape[0] != t:
            raise ValueError(f"cache_position must be [T={t}] slot indices, got shape {tuple(cache_position.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, cache.max_length):
            raise ValueError(f"with cache_position the attention_mask covers every cache slot: [{b}, "
                             f"{cache.max_length}], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            if attention_mask is None:
                position_ids = cache_position[None].expand(b, t)
            else:
                counted = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
                position_ids = counted.index_select(1, cache_position)
        memo: dict = {}  # what every MLA layer of this step would recompute: RoPE cos/sin, the slot mask
        for i, layer in enumerate(self.layers):
            if i >= start_layer:
                hidden_states = layer(hidden_states, position_ids=position_ids, attention_mask=attention_mask,
                                      cache=cache[i], cache_position=cache_position, memo=memo)
        hidden_states = self.norm(hidden_states)
        cache.seen_tokens += t  # eager calls only: a replayed CUDA graph runs no Python
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=cache if use_cache else None)


class ZebraForCausalLM(ZebraPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: ZebraConfig):
        super().__init__(config)
        self.model = ZebraModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the hybrid makes its own HybridCache in forward

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def make_cache(self, batch_size: int, max_length: int | None = None, dtype=None, device=None) -> HybridCache:
        """An empty cache for this model; with `max_length` preallocated (static, CUDA-graph friendly)."""
        p = self.lm_head.weight
        return HybridCache(self.config, batch_size, dtype=dtype or p.dtype, device=device or p.device,
                           max_length=max_length)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, output_hidden_states: bool | None = None,
                logits_to_keep: int | torch.Tensor = 0, cache_position: torch.Tensor | None = None,
                **kwargs) -> CausalLMOutputWithPast:
        """`cache_position`: the CUDA-graph-safe static-cache path (ZebraModel.forward)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds,
                         output_hidden_states=output_hidden_states, cache_position=cache_position)
        hidden = out.last_hidden_state
        # Prefill must not materialise full-vocab logits for every position (67 GB at 8 x 32k x 128k).
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # in the head's dtype: a mixed-precision run may hold a bf16 (frozen) head after fp32 (trained) layers
        logits = self.lm_head(hidden[:, keep, :].to(self.lm_head.weight.dtype))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, logits_to_keep=None, **kwargs):
        past = past_key_values.seen_tokens if isinstance(past_key_values, HybridCache) else 0
        if past > 0:
            input_ids = input_ids[:, past:]
            inputs_embeds = None
        t = input_ids.shape[1] if inputs_embeds is None else inputs_embeds.shape[1]
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, -t:]
        inputs = {"input_ids": input_ids if inputs_embeds is None else None, "inputs_embeds": inputs_embeds,
                  "attention_mask": attention_mask, "position_ids": position_ids,
                  "past_key_values": past_key_values, "use_cache": use_cache,
                  "logits_to_keep": 1 if logits_to_keep is None else logits_to_keep}
        return inputs

    def _reorder_cache(self, past_key_values: HybridCache, beam_idx: torch.Tensor) -> HybridCache:
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
