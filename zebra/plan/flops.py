"""FLOPs per token of the Llama teacher and of the hybrid (MLA + Mamba2), counted from the layer definitions.

Convention (the usual "model FLOPs" of MFU):
- One multiply-accumulate = 2 FLOPs. Counted: every matmul / product of the forward pass (projections, MLP,
  LM head, attention scores and values, the depthwise conv, the SSD scan's products and its D skip).
  Not counted: element-wise work (RMSNorm, RoPE, SiLU / softplus / exp, gating, softmax, residual adds,
  the SSD's decay factors), embedding lookups, biases (none in these models).
- Backward = 2 x forward (input and weight gradients cost one forward matmul each), so a trained model costs
  3 x its forward per token; a frozen teacher costs its forward only. Recomputation (activation checkpointing,
  flash attention's backward recompute) is not model work and is not counted.
- Attention counts what causal (block-causal when packed) attention needs: the query at position i of its
  document attends to i + 1 keys, so per token and layer the score product costs 2 h d_qk c and the value
  product 2 h d_v c, with c the mean context (T + 1) / 2 for one document of T tokens (`causal_mean_context`).
  Packed rows use their documents' lengths: c = sum_d L_d (L_d + 1) / 2 / sum_d L_d.
- The SSD (Mamba2's chunked scan, chunk size Q, heads n, head dim P, state N; zebra.model.ops.ssd) per token:
    intra-chunk scores  C_l . B_s for the s <= l of its chunk      2 n N c_Q
    intra-chunk values  sum_s score_ls dt_s x_s                    2 n P c_Q
    chunk state write   the token's dt x B^T into its chunk's state 2 n P N
    state passing       S_c = a_c S_(c-1) + s_c once per chunk      2 n P N / Q  (per token: chunks / T)
    state output        C_l . S (carried state's part of y)        2 n P N
    D skip              y += D x                                   2 n P
  with c_Q the mean causal context inside a chunk (chunks cut from the start of the row, the last one
  possibly short; document resets inside a chunk do not change the scan's work, so they are not subtracted).
  The depthwise conv over [x, B, C]: 2 conv_dim d_conv per token.
- LM head: 2 H V per token (tied or not: the matmul runs either way); `lm_head=False` leaves it out (the ILD
  teacher forward and ILD students never compute logits; the KD teacher's logits are computed in the loss).

Layer by layer (H hidden, I MLP width, h heads, g KV heads, hd head dim, V vocabulary):
  MLP (SwiGLU)      gate, up H -> I, down I -> H               2 (3 H I)
  Llama attention   q H -> h hd, k and v H -> g hd, o h hd -> H  2 (2 H h hd + 2 H g hd)
                    + scores 2 h hd c + values 2 h hd c
  MLA               q_a H -> r_q, q_b r_q -> h (d_nope + d_rope), kv_a H -> r_kv + d_rope,
                    kv_b r_kv -> g (d_nope + d_v) (materialised K/V, the training path), o h d_v -> H
                    + scores 2 h (d_nope + d_rope) c + values 2 h d_v c
  Mamba2            in_proj H -> 2 d_inner + 2 d_xb + n, out_proj d_inner -> H, conv, SSD (above)
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


# ------------------------------------------------------------------------------------------------ contexts
def causal_mean_context(doc_lengths: Iterable[int] | int) -> float:
    """Mean number of keys a query attends under causal attention within documents of these lengths:
    sum_d L_d (L_d + 1) / 2 / sum_d L_d. An int is one document of that length ((T + 1) / 2)."""
    lengths = [int(doc_lengths)] if isinstance(doc_lengths, int) else [int(n) for n in _flatten(doc_lengths)]
    total = sum(lengths)
    if total <= 0:
        raise ValueError(f"document lengths must sum to a positive number, got {lengths}")
    return sum(n * (n + 1) / 2 for n in lengths) / total


def chunk_mean_context(seq_len: int, chunk_size: int) -> float:
    """Mean causal context inside SSD chunks of `chunk_size` cut from the start of a row of `seq_len`."""
    full, rest = divmod(int(seq_len), int(chunk_size))
    return causal_mean_context([chunk_size] * full + ([rest] if rest else []))


def doc_lengths_from_position_ids(position_ids: torch.Tensor) -> list[int]:
    """Document lengths of packed rows (position ids restart at 0 at each document), all rows flattened."""
    lengths = []
    for row in position_ids.detach().cpu().tolist():
        starts = [i for i, p in enumerate(row) if p == 0 or i == 0]
        lengths += [b - a for a, b in zip(starts, starts[1:] + [len(row)])]
    return lengths


def _flatten(x):
    for v in x:
        if isinstance(v, (list, tuple)):
            yield from _flatten(v)
        else:
            yield v


# ------------------------------------------------------------------------------------------------ layers
def _linear(n_in: int, n_out: int) -> float:
    return 2.0 * n_in * n_out


def _dims(config):
    H, h = config.hidden_size, config.num_attention_heads
    g = getattr(config, "num_key_value_heads", None) or h
    hd = getattr(config, "head_dim", None) or H // h
    return H, h, g, hd


def mlp_flops(config) -> dict:
    return {"linear": 3 * _linear(config.hidden_size, config.intermediate_size)}


def llama_attention_flops(config, context: float) -> dict:
    H, h, g, hd = _dims(config)
    linear = _linear(H, h * hd) + 2 * _linear(H, g * hd) + _linear(h * hd, H)
    return {"linear": linear, "attention": 2.0 * h * hd * context + 2.0 * h * hd * context}


def mla_flops(config, context: float) -> dict:
    H, h, g, _ = _dims(config)
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    rq, rkv = config.q_lora_rank, config.kv_lora_rank
    linear = (_linear(H, rq) + _linear(rq, h * (dn + dr)) + _linear(H, rkv + config.mla_rope_key_dim)
              + _linear(rkv, g * (dn + dv)) + _linear(h * dv, H))
    return {"linear": linear, "attention": 2.0 * h * (dn + dr) * context + 2.0 * h * dv * context}


def ssd_flops(config, seq_len: int) -> dict:
    """The chunked SSD scan's products per token (module docstring), itemised."""
    n, P, N, Q = config.mamba_nheads, config.mamba_headdim, config.mamba_d_state, config.mamba_chunk_size
    cq = chunk_mean_context(seq_len, Q)
    chunks = math.ceil(seq_len / Q)
    return {"intra_scores": 2.0 * n * N * cq, "intra_values": 2.0 * n * P * cq, "chunk_states": 2.0 * n * P * N,
            "state_passing": 2.0 * n * P * N * chunks / seq_len, "state_output": 2.0 * n * P * N,
            "d_skip": 2.0 * n * P}


def mamba2_flops(config, seq_len: int) -> dict:
    H = config.hidden_size
    d_in, d_xb, n = config.mamba_d_inner, config.mamba_d_xb, config.mamba_nheads
    linear = _linear(H, 2 * d_in + 2 * d_xb + n) + _linear(d_in, H)
    return {"linear": linear, "conv": 2.0 * config.mamba_conv_dim * config.mamba_d_conv,
            "ssd": sum(ssd_flops(config, seq_len).values())}


# ------------------------------------------------------------------------------------------------ models
def _config(model_or_config):
    return getattr(model_or_config, "config", model_or_config)


def is_hybrid(config) -> bool:
    return getattr(config, "model_type", "") == "zebra"


def forward_flops(model_or_config, seq_len: int, doc_lengths: Iterable[int] | None = None, lm_head: bool = True,
                  ) -> dict:
    """Forward FLOPs per token, by kind: linear (projections + MLP), attention, conv, ssd, lm_head, and total.

    `seq_len` is the row length (SSD chunks); `doc_lengths` the documents' lengths for the attention context
    (default: one document per row, (seq_len + 1) / 2)."""
    cfg = _config(model_or_config)
    ctx = causal_mean_context(doc_lengths if doc_lengths is not None else int(seq_len))
    out = {"linear": 0.0, "attention": 0.0, "conv": 0.0, "ssd": 0.0, "lm_head": 0.0}
    types = list(cfg.hybrid_layer_types) if is_hybrid(cfg) else ["llama"] * cfg.num_hidden_layers
    if len(types) != cfg.num_hidden_layers:
        raise ValueError(f"{len(types)} layer types for {cfg.num_hidden_layers} layers")
    per_kind = {"llama": lambda: llama_attention_flops(cfg, ctx), "mla": lambda: mla_flops(cfg, ctx),
                "mamba": lambda: mamba2_flops(cfg, seq_len)}
    for kind in types:
        if kind not in per_kind:
            raise ValueError(f"unknown layer type {kind!r}")
        for part in (per_kind[kind](), mlp_flops(cfg)):
            for k, v in part.items():
                out[k] += v
    if lm_head:
        out["lm_head"] = _linear(cfg.hidden_size, cfg.vocab_size)
    out["total"] = sum(out.values())
    return out


def forward_flops_per_token(model_or_config, seq_len: int, doc_lengths=None, lm_head: bool = True) -> float:
    return forward_flops(model_or_config, seq_len, doc_lengths, lm_head)["total"]


def training_flops_per_token(model_or_config, seq_len: int, doc_lengths=None, lm_head: bool = True) -> float:
    """Forward + backward (= 3 x forward) of a trained model."""
    return 3.0 * forward_flops_per_token(model_or_config, seq_len, doc_lengths, lm_head)


# ------------------------------------------------------------------------------------------------ stage steps
def kd_step_flops(student, teacher, seq_len: int, doc_lengths=None) -> dict:
    """Per token of a KD step (zebra.stages.kd): the teacher's body forward (zebra.stages.teacher.teacher_forward returns
    hidden states), the teacher's logits (computed inside the chunked KD loss), and the student's forward +
    backward with its LM head (its logits and their gradients are also formed inside the loss)."""
    t_body = forward_flops_per_token(teacher, seq_len, doc_lengths, lm_head=False)
    t_head = forward_flops(teacher, seq_len, doc_lengths)["lm_head"]
    s_train = training_flops_per_token(student, seq_len, doc_lengths, lm_head=True)
    return {"teacher_forward": t_body, "teacher_lm_head": t_head, "student_train": s_train,
            "total": t_body + t_head + s_train}


def ild_step_flops(students: dict, teacher, seq_len: int, doc_lengths=None) -> dict:
    """Per token of an ILD step (zebra.stages.ilkd): the teacher's body forward once (no logits) and, per
    student, forward + backward of its decoder layers (no embeddings, no LM head; the final norm is
    element-wise)."""
    t_body = forward_flops_per_token(teacher, seq_len, doc_lengths, lm_head=False)
    out = {"teacher_forward": t_body}
    for name, s in students.items():
        out[f"student_train_{name}"] = training_flops_per_token(s, seq_len, doc_lengths, lm_head=False)
    out["total"] = sum(out.values())
    return out


def matmul_params(model: torch.nn.Module, lm_head: bool = True) -> int:
    """Weights of the model's nn.Linear layers (the LM head counted once even when tied), for checking the
    linear FLOPs above against 2 x the parameters that take part in matmuls."""
    seen, total = set(), 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (lm_head or not name.endswith("lm_head")):
            if id(mod.weight) not in seen:
                seen.add(id(mod.weight))
                total += mod.weight.numel()
    return total
