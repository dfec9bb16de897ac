"""`stage=describe`'s memory plan (zebra/plan/describe.py): the model-state arithmetic per strategy on known
numbers, the zebra_8b case (~18 bytes/param / 2 = ~75 GB per GPU under ZeRO-3 on two GPUs), and what the other
knobs change."""

from __future__ import annotations

import pytest

from tests.helpers.configs import compose_cfg
from zebra.plan.describe import (cache_at_context, describe, layer_activation_elements, model_activation_elements,
                                 model_state_bytes)

P, FROZEN, LARGEST = 1_000_000_000, 100_000_000, 50_000_000


@pytest.mark.parametrize("strategy, devices, gpu, cpu", [
    ("single", 1, 18 * P + 4 * FROZEN, 0),
    ("ddp", 8, 18 * P + 4 * FROZEN, 0),                            # replicated: N does not help
    ("zero2", 4, 4 * P + 16 * P // 4 + 2 * FROZEN, 0),              # 8 GB + 4 GB + 0.2 GB
    ("zero3", 4, 18 * P // 4 + 2 * FROZEN // 4 + 4 * LARGEST, 0),   # 4.5 GB + 0.05 GB + 0.2 GB
    ("zero3_offload", 4, 2 * P // 4 + 2 * FROZEN // 4 + 4 * LARGEST, 16 * P // 4),
])
def test_model_state_bytes(strategy, devices, gpu, cpu):
    got = model_state_bytes(strategy, P, FROZEN, devices, LARGEST)
    assert got == {"gpu": gpu, "cpu_per_process": cpu}


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="zero3"):
        model_state_bytes("fsdp", P, 0, 2, 0)


def describe_cfg(*overrides: str):
    return compose_cfg(["stage=describe", "describe.out=null", *overrides])


def test_zebra_8b_zero3_two_gpus_is_about_75_gb_of_states():
    info = describe(describe_cfg("model=zebra_8b", "mix=paper", "trainer=gpu", "trainer.devices=2",
                                 "strategy=deepspeed_zero3", "describe.gpu_memory_gb=141"))
    m = info["memory"]
    assert (m["strategy"], m["devices"], m["train_stage"]) == ("zero3", 2, "kd")
    assert m["trainable_params"] == info["params"]
    largest = m["largest_module_params"]
    assert largest == 128256 * 4096  # the embedding (untied LM head of the same size)
    assert m["bytes_per_gpu"]["model_states"] == int(18 * info["params"] / 2 + 4 * largest)
    assert 75e9 < 18 * info["params"] / 2 < 76e9
    # the KD teacher (Llama-3.1-8B = the zebra_8b preset's base), bf16, replicated on each GPU
    assert m["teacher"] == "meta-llama/Llama-3.1-8B-Instruct" and m["teacher_params"] == 8_030_261_248
    assert m["bytes_per_gpu"]["teacher"] == 2 * 8_030_261_248
    assert m["total_bytes_per_gpu"] == sum(m["bytes_per_gpu"].values())
    assert m["fits"] is True  # H200: 141 GB

    h100 = describe(describe_cfg("model=zebra_8b", "mix=paper", "trainer=gpu", "trainer.devices=2",
                                 "strategy=deepspeed_zero3", "describe.gpu_memory_gb=80"))["memory"]
    assert h100["fits"] is False
    offload = describe(describe_cfg("model=zebra_8b", "mix=paper", "trainer=gpu", "trainer.devices=2",
                                    "strategy=deepspeed_zero3_offload", "kd.gradient_checkpointing=true",
                                    "describe.gpu_memory_gb=80"))["memory"]
    assert offload["strategy"] == "zero3_offload" and offload["fits"] is True
    assert offload["cpu_bytes_per_process"] == int(16 * info["params"] / 2)


def test_strategy_follows_the_config():
    for strategy, devices, expected in (("auto", 1, "single"), ("auto", 2, "ddp"), ("ddp", 2, "ddp"),
                                        ("deepspeed_zero2", 2, "zero2"), ("deepspeed_zero3", 2, "zero3"),
                                        ("deepspeed_zero3_offload", 2, "zero3_offload")):
        m = describe(describe_cfg("model=tiny", "mix=uniform", "mix.n_mla=2", f"strategy={strategy}",
                                  f"trainer.devices={devices}"))["memory"]
        assert (m["strategy"], m["devices"]) == (expected, devices)
    m = describe(describe_cfg("model=tiny", "mix=uniform", "mix.n_mla=2", "describe.strategy=zero3",
                              "describe.devices=8"))["memory"]
    assert (m["strategy"], m["devices"]) == ("zero3", 8)


def test_activations_scale_with_tokens_and_checkpointing():
    base = ["model=zebra_1b", "mix=uniform", "mix.n_mla=4"]
    a = describe(describe_cfg(*base, "kd.batch_size=1", "kd.seq_len=1024"))["memory"]
    b = describe(describe_cfg(*base, "describe.micro_batch=2", "describe.seq_len=2048"))["memory"]
    assert (b["micro_batch"], b["seq_len"]) == (2, 2048)
    assert b["bytes_per_gpu"]["activations"] == pytest.approx(4 * a["bytes_per_gpu"]["activations"], rel=1e-6)
    c = describe(describe_cfg(*base, "kd.batch_size=1", "kd.seq_len=1024", "kd.gradient_checkpointing=true"))
    assert c["memory"]["activation_checkpointing"] is True
    assert c["memory"]["bytes_per_gpu"]["activations"] < a["bytes_per_gpu"]["activations"] / 5


def test_layer_activation_formula_on_known_dims():
    from omegaconf import OmegaConf

    from zebra.plan.describe import zebra_config_from_preset
    from zebra.utils.paths import model_preset_file

    model = OmegaConf.load(model_preset_file("tiny"))
    cfg = zebra_config_from_preset(model, ["mla", "mamba", "mla", "mamba"])
    # tiny: H 64, I 128, h 4, g 2, r_q 32, r_kv 16, d_rope 8, d_nope 8, d_v 16
    common = 4 * 64 + 4 * 128
    mla = 32 + 2 * 4 * 16 + 16 + 8 + 2 * (8 + 16) + 2 * 16 + 4 * 16 + 2 * 4
    assert layer_activation_elements(cfg, "mla") == common + mla
    # Mamba2 (attention-shaped defaults): d_inner 64, d_xb 32, nheads 4, headdim 16, d_state 16, conv_dim 128
    mamba = (2 * 64 + 2 * 32 + 4) + 3 * 128 + 2 * 64 + 2 * 4 + 3 * 64 + 2 * 4 * 16 * 16 / 256
    assert layer_activation_elements(cfg, "mamba") == pytest.approx(common + mamba)
    full = model_activation_elements(cfg, checkpointing=False)
    assert full == pytest.approx(2 * (common + mla) + 2 * (common + mamba))
    assert model_activation_elements(cfg, checkpointing=True) == pytest.approx(4 * 64 + common + max(mla, mamba))


def test_cache_at_context_from_measured_bytes():
    out = cache_at_context({"cache_bytes_per_token": 640.0, "cache_constant_bytes": 1000.0,
                            "base_kv_bytes_per_token": 32768.0}, context=1000, batch=2)
    assert out["hybrid_bytes"] == 2 * (640 * 1000 + 1000)
    assert out["base_kv_bytes"] == 2 * 32768 * 1000
    info = describe(describe_cfg("model=zebra_1b", "mix=uniform", "mix.n_mla=4", "describe.context=4096"))
    assert info["cache"]["hybrid_bytes"] == int(info["cache_bytes_per_token"] * 4096 + info["cache_constant_bytes"])


def test_random_kd_teacher_takes_the_named_preset_base():
    """zebra_1b student with an 8B-shaped random KD teacher (model.kd_teacher_base=zebra_8b): describe counts the
    8B teacher, and the kd stage builds it at that shape."""
    import torch

    from zebra.stages.kd import load_kd_teacher

    cfg = describe_cfg("model=zebra_1b", "mix=paper", "model.kd_teacher=random:1", "model.kd_teacher_base=zebra_8b")
    assert describe(cfg)["memory"]["teacher_params"] == 8_030_261_248
    tiny = describe_cfg("model=tiny", "mix=paper", "model.kd_teacher=random:1", "model.kd_teacher_base=smollm2_135m")
    from zebra.stages.teacher import load_model_tokenizer

    teacher = load_kd_teacher(tiny, load_model_tokenizer("smollm2_135m"), 49152, torch.float32)
    assert teacher.model.config.hidden_size == 576 and teacher.model.config.num_hidden_layers == 30
