"""Fixtures for zebra.compose tests: tiny random Llama bases (transformers' own LlamaForCausalLM)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(g: int = 2, h: int = 4, hd: int = 16, hidden: int = 64, layers: int = 3, vocab: int = 97,
                    dtype=torch.float64, tied: bool = False, rope: dict | None = None, seed: int = 0):
    """A random LlamaForCausalLM (GQA when g < h), eval mode. Weights are scaled up from HF's N(0, 0.02) so that
    attention is far from uniform and the logits actually depend on the mixers."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=h, num_key_value_heads=g, head_dim=hd, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight.mul_(3.0)  # sharper attention (scores x9)
    return model.to(dtype).eval()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spin-waiting
    makes small matmuls and SVDs ~50x slower. Slow (real-model) tests keep the default."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
