"""FLOP counting (zebra.plan.flops) against hand counts on tiny configs, the models' own Linear weights, the
packing mask, and torch's FlopCounterMode."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from zebra.plan import flops as F
from zebra.model import ZebraConfig, ZebraForCausalLM
from zebra.model.packing import block_causal_mask

# H 8, I 16, h 2, g 1, hd 4, V 10; MLA r_q 6, r_kv 3, d_rope 2, d_nope 2, d_v 4; Mamba2 d_inner 8, d_xb 4,
# 2 heads of 4, d_state 4, d_conv 4, chunk 4.
TINY = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
            head_dim=4, q_lora_rank=6, kv_lora_rank=3, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=4,
            mamba_chunk_size=4)


def tiny_hybrid(types=("mla", "mamba")):
    return ZebraConfig(num_hidden_layers=len(types), hybrid_layer_types=list(types), **TINY)


def tiny_llama(layers=1):
    return LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=4)


def test_hybrid_hand_count():
    T = 10  # one document: mean causal context 11 / 2; SSD chunks of 4, 4, 2
    mla_linear = 2 * 8 * 6 + 2 * 6 * (2 * 4) + 2 * 8 * (3 + 2) + 2 * 3 * (1 * 6) + 2 * 8 * 8  # 436
    mla_attention = 2 * 2 * 4 * 5.5 + 2 * 2 * 4 * 5.5  # 176
    mlp = 3 * 2 * 8 * 16  # 768 per layer
    mamba_linear = 2 * 8 * (2 * 8 + 2 * 4 + 2) + 2 * 8 * 8  # 544
    conv = 2 * (2 * 4 + 2 * 4) * 4  # 128
    c_q = (10 + 10 + 3) / 10  # chunk contexts: 1+2+3+4, 1+2+3+4, 1+2
    ssd = (2 * 2 * 4 * c_q) * 2 + 2 * 2 * 4 * 4 + 2 * 2 * 4 * 4 * 3 / 10 + 2 * 2 * 4 * 4 + 2 * 2 * 4
    lm_head = 2 * 8 * 10
    got = F.forward_flops(tiny_hybrid(), T)
    assert got["linear"] == pytest.approx(mla_linear + mamba_linear + 2 * mlp)
    assert got["attention"] == pytest.approx(mla_attention)
    assert got["conv"] == pytest.approx(conv)
    assert got["ssd"] == pytest.approx(ssd)
    assert got["lm_head"] == pytest.approx(lm_head)
    assert got["total"] == pytest.approx(3216.8)
    assert F.training_flops_per_token(tiny_hybrid(), T) == pytest.approx(3 * 3216.8)
    assert F.forward_flops_per_token(tiny_hybrid(), T, lm_head=False) == pytest.approx(3216.8 - 160)


def test_llama_hand_count():
    got = F.forward_flops(tiny_llama(), 10)
    assert got["linear"] == pytest.approx(2 * 8 * 8 + 2 * 2 * 8 * 4 + 2 * 8 * 8 + 3 * 2 * 8 * 16)  # 1152
    assert got["attention"] == pytest.approx(2 * 2 * 4 * 5.5 * 2)
    assert got["total"] == pytest.approx(1152 + 176 + 160)


@pytest.mark.parametrize("types", [("mla", "mamba"), ("mamba", "mamba"), ("mla", "mla", "mamba")])
def test_linear_flops_are_twice_the_linear_weights(types):
    cfg = tiny_hybrid(types)
    model = ZebraForCausalLM(cfg)
    fl = F.forward_flops(cfg, 16)
    assert fl["linear"] == 2 * F.matmul_params(model, lm_head=False)
    assert fl["linear"] + fl["lm_head"] == 2 * F.matmul_params(model)
    llama = LlamaForCausalLM(tiny_llama(2))
    fl = F.forward_flops(llama, 16)
    assert fl["linear"] + fl["lm_head"] == 2 * F.matmul_params(llama)


def test_causal_context_matches_the_block_causal_mask():
    lengths = [[3, 5], [8], [1, 1, 6]]
    doc_ids = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])
    pairs = block_causal_mask(doc_ids).sum().item()  # (query, key) pairs attention computes
    assert F.causal_mean_context(lengths) == pytest.approx(pairs / doc_ids.numel())
    assert F.causal_mean_context(2048) == pytest.approx(2049 / 2)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], list(range(8)), [0, 0, 0, 1, 2, 3, 4, 5]])
    assert F.doc_lengths_from_position_ids(pos) == [3, 5, 8, 1, 1, 6]


def test_chunk_context_brute_force():
    for T, Q in [(10, 4), (2048, 256), (7, 16)]:
        brute = sum((t % Q) + 1 for t in range(T)) / T
        assert F.chunk_mean_context(T, Q) == pytest.approx(brute)


def test_packed_rows_count_less_attention():
    cfg = tiny_hybrid(("mla", "mla"))
    one = F.forward_flops(cfg, 64)
    packed = F.forward_flops(cfg, 64, [16, 16, 16, 16])
    assert packed["attention"] == pytest.approx(one["attention"] * (17 / 2) / (65 / 2))
    assert packed["linear"] == one["linear"]


def test_stage_steps():
    s, t = tiny_hybrid(), tiny_llama(3)
    kd = F.kd_step_flops(s, t, 10)
    assert kd["teacher_forward"] == pytest.approx(F.forward_flops_per_token(t, 10, lm_head=False))
    assert kd["teacher_lm_head"] == pytest.approx(2 * 8 * 10)
    assert kd["student_train"] == pytest.approx(3 * 3216.8)
    assert kd["total"] == pytest.approx(kd["teacher_forward"] + kd["teacher_lm_head"] + kd["student_train"])
    ild = F.ild_step_flops({"a": s, "b": tiny_hybrid(("mamba", "mamba"))}, t, 10)
    assert ild["student_train_a"] == pytest.approx(3 * (3216.8 - 160))
    assert ild["total"] == pytest.approx(ild["teacher_forward"] + ild["student_train_a"] + ild["student_train_b"])


def _matmul_flops(model, T):
    """aten.mm / addmm FLOPs per token that torch's FlopCounterMode counts (projections, MLP, LM head)."""
    from torch.utils.flop_counter import FlopCounterMode

    ids = torch.randint(0, model.config.vocab_size, (2, T))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if str(op).split(".")[-1] in ("mm", "addmm")) / ids.numel()


@pytest.mark.parametrize("types", [None, ("mla", "mla"), ("mla", "mamba", "mamba")])
def test_against_torch_flop_counter(types):
    """Independent count of the matmuls (torch's counter; it does not count CPU SDPA nor our SSD einsums)."""
    T = 12
    torch.manual_seed(0)
    if types is None:
        cfg = tiny_llama(2)
        model = LlamaForCausalLM(cfg).eval()
    else:
        cfg = tiny_hybrid(types)
        model = ZebraForCausalLM(cfg).eval()
    fl = F.forward_flops(cfg, T)
    assert _matmul_flops(model, T) == pytest.approx(fl["linear"] + fl["lm_head"])
