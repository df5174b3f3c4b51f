"""The fused SwiGLU product against transformers' two-op form, and its use in Llama MLPs."""

import pytest
import torch
from helpers import devices, fast_kernels, tiny_llama

from lorakit.fast_training import enable_fast_training
from lorakit.kernels.rms_norm import rms_norm, rms_norm_reference
from lorakit.kernels.swiglu import silu_mul, silu_mul_reference


def _inputs(dtype, device="cpu"):
    gen = torch.Generator().manual_seed(0)
    gate = (torch.randn(4, 37, 96, generator=gen) * 3).to(dtype).to(device).requires_grad_()
    up = torch.randn(4, 37, 96, generator=gen).to(dtype).to(device).requires_grad_()
    grad = torch.randn(4, 37, 96, generator=gen).to(dtype).to(device)
    return gate, up, grad


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_two_op_reference_within_one_rounding(dtype, device):
    gate, up, grad = _inputs(dtype, device)
    kernels = fast_kernels("silu_mul", gate, up) or pytest.skip(f"no fast silu_mul on {device}")
    for kernel in kernels:
        _check_silu_mul(kernel.fn, gate, up, grad, dtype)
    assert silu_mul(gate, up).grad_fn.name() == kernels[0].fn(gate, up).grad_fn.name()  # the dispatch runs it


def _check_silu_mul(fast, gate, up, grad, dtype):
    results = []
    for fn in (silu_mul_reference, fast):
        out = fn(gate, up)
        results.append((out, *torch.autograd.grad(out, (gate, up), grad)))
    for got, ref in zip(results[1], results[0]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        diff, ref = (got.float() - ref.float()).abs(), ref.float().abs()
        if dtype == torch.bfloat16:  # at most one bf16 rounding apart, element by element
            assert torch.all(diff <= 2.0**-7 * ref)
        else:  # exp's last bits, amplified where silu' crosses 0 (measured 8.7e-8 of the largest)
            assert diff.max() <= 1e-6 * ref.max()
    assert torch.equal(results[1][0], results[0][0]) or dtype == torch.bfloat16  # fp32 forward: same ops


def test_saves_gate_and_up_only():
    gate, up, _ = _inputs(torch.bfloat16)
    counts = {}
    for fn in (silu_mul_reference, silu_mul):
        saved: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(saved.append, lambda t: t):
            fn(gate, up)
        counts[fn.__name__] = sum(t.shape == gate.shape for t in saved)
    assert counts == {"silu_mul_reference": 3, "silu_mul": 2}  # gate, silu(gate), up vs gate, up


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_trains", [False, True])
def test_rms_norm_equals_llamas(dtype, weight_trains, device):
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.randn(4, 37, 96, generator=gen) * 2).to(device)
    grad = torch.randn(4, 37, 96, generator=gen).to(device)
    weight0 = (1 + 0.1 * torch.randn(96, generator=gen)).to(device)
    kernels = (fast_kernels("rms_norm", x0.to(dtype), weight0.to(dtype), 1e-5)
               or pytest.skip(f"no fused norm on {device}"))
    x = x0.to(dtype).requires_grad_()
    weight = weight0.to(dtype)
    assert rms_norm(x, weight, 1e-5).grad_fn.name() == kernels[0].fn(x, weight, 1e-5).grad_fn.name()
    for kernel in kernels:
        _check_rms_norm(kernel.fn, x0, weight0, grad, dtype, weight_trains)


def _check_rms_norm(fast, x0, weight0, grad, dtype, weight_trains):
    results = []
    for fn in (rms_norm_reference, fast):
        x, weight = x0.to(dtype).requires_grad_(), weight0.to(dtype).requires_grad_(weight_trains)
        out = fn(x, weight, 1e-5)
        inputs = (x, weight) if weight_trains else (x,)
        results.append((out, *torch.autograd.grad(out, inputs, grad.to(dtype))))
    # fp32: rsqrt's and the reductions' last bits (measured <= 3.1e-7 of the largest value); bf16: within two
    # roundings of the largest value, 2^-7 (measured 6.9e-3: a rounding of the normalized input can flip)
    tol = 1e-6 if dtype == torch.float32 else 2.0**-7
    for got, ref in zip(results[1], results[0]):
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max()


def test_rms_norm_saves_its_input_not_an_fp32_copy():
    x = torch.randn(4, 37, 96, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(96, dtype=torch.bfloat16)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(saved.append, lambda t: t):
        rms_norm(x, weight, 1e-5)
    assert sorted((tuple(t.shape), t.dtype) for t in saved) == sorted(
        [((4, 37, 96), torch.bfloat16), ((96,), torch.bfloat16), ((4, 37, 1), torch.float32)])


def test_fused_kernels_on_a_llama_train_the_same():
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, 16))
    results = []
    for fused in (False, True):
        model = tiny_llama()
        if fused:  # one MLP per layer; two norms per layer and the final one
            switched = enable_fast_training(model, attention=False, loss=False, allocator_setting=False)
            assert switched.swiglu == model.config.num_hidden_layers
            assert switched.swiglu + switched.rms_norm == 3 * model.config.num_hidden_layers + 1
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_ref, grads_ref), (loss, grads) = results
    assert torch.allclose(loss, loss_ref, rtol=1e-6)
    for got, ref in zip(grads, grads_ref):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max())
