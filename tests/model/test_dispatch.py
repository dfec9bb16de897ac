"""Kernel choice: ZebraConfig fields select the kernels, the environment overrides them, bad values name the field."""

import os

import pytest
import torch

from test_modeling import make_model, rel  # the same tiny float64 models (tests/model)
from zebra.model import ZebraConfig, ZebraForCausalLM, mla
from zebra.model.ops import dispatch
from zebra.model.ops.dispatch import fused_inference, mamba_backend


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    monkeypatch.delenv("ZEBRA_MAMBA_KERNELS", raising=False)
    monkeypatch.delenv("ZEBRA_FUSED_KERNELS", raising=False)


@pytest.mark.parametrize("user_value", [None, "0"])
def test_mamba_ssm_autotune_results_are_kept_on_disk_unless_the_user_says(monkeypatch, user_value):
    # set before mamba_ssm is imported (its autotuners read it when built), whether or not the import succeeds
    if user_value is None:
        monkeypatch.delenv("TRITON_CACHE_AUTOTUNING", raising=False)
    else:
        monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", user_value)
    dispatch.mamba_ssm_kernels.cache_clear()
    try:
        dispatch.mamba_ssm_kernels()
        assert os.environ["TRITON_CACHE_AUTOTUNING"] == (user_value or "1")
    finally:
        dispatch.mamba_ssm_kernels.cache_clear()


def test_defaults_select_todays_kernels():
    c = ZebraConfig()
    assert (c.mamba_kernels, c.fused_kernels, c.mla_decode_attention, c.mla_absorb_max_tokens) == \
        ("auto", True, "matmul", 16)


@pytest.mark.parametrize("field,value", [("mamba_kernels", "triton"), ("mla_decode_attention", "flash"),
                                         ("fused_kernels", "no"), ("mla_absorb_max_tokens", -1)])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"ZebraConfig.{field}"):
        ZebraConfig(**{field: value})


def test_mamba_backend_from_the_config_and_the_environment(monkeypatch):
    auto, torch_only, kernels = (ZebraConfig(mamba_kernels=k) for k in ("auto", "torch", "mamba_ssm"))
    assert mamba_backend(auto, "cpu") == "torch"
    if dispatch.mamba_ssm_kernels() is None:  # true on the CPU machines: CUDA alone is not enough
        assert mamba_backend(auto, torch.device("cuda")) == "torch"
    assert mamba_backend(auto, torch.device("cuda"), torch.float64) == "torch"  # float64 is the reference precision
    assert mamba_backend(torch_only, torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="mamba_ssm"):
        mamba_backend(kernels, "cpu")
    monkeypatch.setenv("ZEBRA_MAMBA_KERNELS", "torch")
    assert mamba_backend(kernels, "cpu") == "torch"  # the override wins over the field
    monkeypatch.setenv("ZEBRA_MAMBA_KERNELS", "mamba_ssm")
    with pytest.raises(RuntimeError):
        mamba_backend(torch_only, "cpu")
    monkeypatch.setenv("ZEBRA_MAMBA_KERNELS", "triton")
    with pytest.raises(ValueError, match="ZEBRA_MAMBA_KERNELS"):
        mamba_backend(auto, "cpu")


def test_a_models_mamba_kernels_field_and_its_override(monkeypatch):
    """`model.config.mamba_kernels` reaches every Mamba2 layer; insisting on mamba_ssm on CPU fails at the forward
    and ZEBRA_MAMBA_KERNELS=torch lets the same model run (in float32: float64 always takes the torch path)."""
    model = make_model(["mamba", "mla"], dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 6))
    want = model(ids).logits
    model.config.mamba_kernels = "mamba_ssm"
    with pytest.raises(RuntimeError, match="mamba_kernels"):
        model(ids)
    monkeypatch.setenv("ZEBRA_MAMBA_KERNELS", "torch")
    assert torch.equal(model(ids).logits, want)


def test_fused_kernels_field_and_its_override(monkeypatch):
    on, off = ZebraConfig(), ZebraConfig(fused_kernels=False)
    cpu = torch.zeros(1)
    with torch.no_grad():
        assert fused_inference(on) and not fused_inference(off)
        assert not fused_inference(on, cpu)  # CUDA tensors only
        monkeypatch.setenv("ZEBRA_FUSED_KERNELS", "0")
        assert not fused_inference(on)
        monkeypatch.setenv("ZEBRA_FUSED_KERNELS", "1")
        assert fused_inference(off)
        monkeypatch.setenv("ZEBRA_FUSED_KERNELS", "yes")
        with pytest.raises(ValueError, match="ZEBRA_FUSED_KERNELS"):
            fused_inference(on)
    monkeypatch.setenv("ZEBRA_FUSED_KERNELS", "1")
    assert not fused_inference(on)  # with gradients on: the kernels have no backward


def test_decode_attention_field_selects_the_kernel(monkeypatch):
    model = make_model(["mla", "mamba", "mla"])
    ids = torch.randint(0, 97, (2, 9))
    used = []
    real = mla.decode_attention
    monkeypatch.setattr(mla, "decode_attention", lambda *a: used.append(a[-1]) or real(*a))

    def decode():
        cache = model.make_cache(2)
        out = [model(ids[:, :6], past_key_values=cache).logits[:, -1:]]
        out += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(6, 9)]
        return torch.cat(out, 1)

    ref = decode()
    assert used == ["matmul"] * (2 * 3)
    used.clear()
    model.config.mla_decode_attention = "sdpa"
    assert rel(decode(), ref) < 1e-10
    assert used == ["sdpa"] * (2 * 3)
    model.config.mla_decode_attention = "flash"
    with pytest.raises(ValueError, match="ZebraConfig.mla_decode_attention"):
        decode()


def test_absorb_max_tokens_field_selects_the_form():
    """Absorbed decode reads kv_b_proj's weight without calling it; at 0 every cached call materialises K/V."""
    model = make_model(["mla", "mla"])
    ids = torch.randint(0, 97, (1, 8))
    calls = []
    for layer in model.model.layers:
        layer.mixer.kv_b_proj.register_forward_hook(lambda *a: calls.append(1))

    def decode():
        cache = model.make_cache(1)
        out = [model(ids[:, :5], past_key_values=cache).logits[:, -1:]]
        calls.clear()
        out += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(5, 8)]
        return torch.cat(out, 1)

    absorbed = decode()
    assert not calls
    model.config.mla_absorb_max_tokens = 0
    assert rel(decode(), absorbed) < 1e-10
    assert len(calls) == 2 * 3


def test_kernel_fields_travel_with_the_checkpoint(tmp_path):
    model = make_model(["mla", "mamba"], mla_decode_attention="sdpa", mamba_kernels="torch")
    model.save_pretrained(tmp_path)
    loaded = ZebraForCausalLM.from_pretrained(tmp_path)
    assert (loaded.config.mla_decode_attention, loaded.config.mamba_kernels) == ("sdpa", "torch")
    loaded = ZebraForCausalLM.from_pretrained(tmp_path, mla_decode_attention="matmul")
    assert loaded.config.mla_decode_attention == "matmul"
    assert loaded.model.layers[0].mixer.config is loaded.config  # what the layers read is the model's config
