"""The fused Mamba2 decode state update against the torch step (zebra.model.ops.ssd.ssd_step), on CPU tensors
under Triton's interpreter: grouped x and B as the mixer produces them, raw step with dt_bias or final step."""

from __future__ import annotations

import pytest
import torch

from zebra.model.ops import ssd
from zebra.model.ops.ssd import ssd_step


@pytest.fixture
def fused():
    from zebra.model.ops.fused_state_update import fused_state_update, interpreting

    assert interpreting() or torch.cuda.is_available()
    return fused_state_update


@pytest.mark.parametrize("dtype,with_bias,with_d", [(torch.float64, True, True), (torch.float32, False, True),
                                                    (torch.float32, True, False)])
def test_fused_update_equals_torch_step_over_tokens(fused, dtype, with_bias, with_d):
    g = torch.Generator().manual_seed(0)
    b, h, p, n, gx, gc = 2, 8, 20, 24, 2, 8  # P and N not powers of two; x and B in 2 groups, C per head
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    a_log = (torch.rand(h, generator=g) * 2).to(dtype)
    d = rnd(h) if with_d else None
    dt_bias = rnd(h) if with_bias else None
    state_ref = rnd(b, h, p, n)
    state = state_ref.clone()
    for step in range(3):  # the state carries over
        x, B, C = rnd(b, gx, p), rnd(b, gx, n), rnd(b, gc, n)
        dt = rnd(b, h) if with_bias else torch.rand(b, h, generator=g).to(dtype) * 0.5
        if step == 1 and with_bias:
            dt[0, 0] = 30.0  # softplus's linear branch
        want, state_ref = ssd_step(state_ref, x.repeat_interleave(h // gx, dim=1), dt, -torch.exp(a_log), B, C, d,
                                   dt_bias=dt_bias)
        got = fused(state, x, dt, a_log, B, C, d, dt_bias=dt_bias)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        torch.testing.assert_close(state, state_ref, rtol=tol, atol=tol)


def test_shape_errors_name_the_shapes(fused):
    with pytest.raises(ValueError, match="expected"):
        fused(torch.zeros(1, 4, 3, 5), torch.zeros(1, 3, 3), torch.zeros(1, 4), torch.zeros(4), torch.zeros(1, 1, 5),
              torch.zeros(1, 4, 5))


def test_mixer_decode_takes_the_fused_update_and_matches_the_eager_step(fused, monkeypatch):
    """Decode through a whole hybrid with the kernel backend selected (as on a GPU with mamba_ssm; its own kernels
    fall back to torch on CPU, so the fused conv step and state update are what differ) equals the eager decode;
    `config.fused_kernels` switches the fused kernels off, ZEBRA_FUSED_KERNELS overrides the config."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from test_modeling import make_model

    import zebra.model.ops.fused_state_update as fsu
    from zebra.model import mamba2

    model = make_model(["mamba", "mla", "mamba"], dtype=torch.float32)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))

    def decode(kernel_path: bool):
        cache = model.make_cache(2)
        with torch.no_grad():
            out = [model(input_ids=ids[:, :5], past_key_values=cache, use_cache=True).logits[:, -1]]
            with monkeypatch.context() as m:
                if kernel_path:  # after the prefill (its chunked scan has no CPU kernel)
                    m.setattr(mamba2, "mamba_backend", lambda config, device, dtype=None: "mamba_ssm")
                for t in range(5, 9):
                    out.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1])
        return torch.stack(out, 1)

    eager = decode(False)
    calls = []
    real = fsu.fused_state_update
    monkeypatch.setattr(mamba2, "fused_state_update", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = decode(True)
    assert len(calls) == 2 * 4  # two Mamba2 layers x four decoded tokens
    torch.testing.assert_close(got, eager, rtol=2e-5, atol=2e-5)

    # switched off, the step takes the backend's state update (mamba_ssm's, standing in for it here: the torch one)
    eager_steps = []
    monkeypatch.setattr(mamba2, "state_update", lambda *a, backend, **k: eager_steps.append(backend)
                        or ssd.state_update(*a, backend="torch", **k))
    model.config.fused_kernels = False
    calls.clear()
    torch.testing.assert_close(decode(True), eager, rtol=2e-5, atol=2e-5)
    assert not calls and eager_steps == ["mamba_ssm"] * (2 * 4)
    monkeypatch.setenv("ZEBRA_FUSED_KERNELS", "1")
    decode(True)
    assert len(calls) == 2 * 4 and len(eager_steps) == 2 * 4
