"""kernels.lora_linear: one autograd node gives the general path's values, and runs only where it applies."""

import pytest
import torch
from helpers import devices, tiny_llama
from torch import nn

import lorakit as lk
from lorakit.kernels.dispatch import TABLE
from lorakit.kernels.lora_linear import add_low_rank_update
from lorakit.lora import LoraLinear
from lorakit.quant.linear4bit import Linear4bit

BF16 = torch.bfloat16
SCALE = 2.0  # alpha 16 / r 8


def make_layer(kind: str, bias: bool = False, seed: int = 0) -> LoraLinear:
    """A LoraLinear over a frozen bf16 nn.Linear or a Linear4bit (bf16 compute), B random so it matters."""
    torch.manual_seed(seed)
    linear = nn.Linear(96, 160, bias=bias)
    base = Linear4bit.from_linear(linear) if kind == "4bit" else linear.to(BF16).requires_grad_(False)
    layer = LoraLinear(base)
    layer.add("default", 8, 16)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def run(layer: LoraLinear, x: torch.Tensor, grad_y: torch.Tensor, general: bool):
    """(y, x.grad, A.grad, B.grad) through the node, or through autograd over add_low_rank_update."""
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.grad = B.grad = None
    x = x.detach().clone().requires_grad_(x.requires_grad)
    if general:
        y = add_low_rank_update(layer.base_layer(x), x, A, B, SCALE)
    else:
        y = layer(x)
        assert type(y.grad_fn).__name__ == "_LoraLinearBackward"
    y.backward(grad_y)
    return y.detach(), x.grad, A.grad.clone(), B.grad.clone()


def fp64_reference(layer: LoraLinear, x: torch.Tensor, grad_y: torch.Tensor):
    """The same layer in fp64 from the same (rounded) weights and inputs."""
    base = layer.base_layer
    W = base.dequantize(torch.float64) if isinstance(base, Linear4bit) else base.weight.double()
    A = layer.lora_A["default"].weight.detach().double().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().double().requires_grad_(True)
    x = x.detach().double().requires_grad_(True)
    y = x @ W.t() + SCALE * (x @ A.t()) @ B.t()
    if base.bias is not None:
        y = y + base.bias.double()
    y.backward(grad_y.double())
    return y.detach(), x.grad, A.grad, B.grad


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["linear", "4bit"])
@pytest.mark.parametrize("bias", [False, True])
def test_node_matches_the_general_path(kind, bias, device):
    layer = make_layer(kind, bias).to(device)
    torch.manual_seed(1)
    x = torch.randn(3, 40, 96, dtype=BF16).to(device).requires_grad_()
    grad_y = torch.randn(3, 40, 160, dtype=BF16).to(device)
    y, gx, gA, gB = run(layer, x, grad_y, general=False)
    y0, gx0, gA0, gB0 = run(layer, x, grad_y, general=True)
    # Same products in the same order: output and adapter gradients are bit-identical.
    assert torch.equal(y, y0) and torch.equal(gA, gA0) and torch.equal(gB, gB0)
    assert gA.dtype == gB.dtype == torch.float32
    # x's gradient: the update's part is added in the matmul (one rounding) instead of in a separate bf16 add.
    assert not torch.equal(gx, gx0)
    assert torch.allclose(gx.float(), gx0.float(), rtol=2**-7, atol=1e-2)
    ref_gx = fp64_reference(layer, x, grad_y)[1]
    assert rel_err(gx, ref_gx) <= rel_err(gx0, ref_gx)


@pytest.mark.parametrize("kind", ["linear", "4bit"])
def test_input_without_gradient_still_trains_the_adapter(kind):
    # The first block's q, k, v read frozen embeddings: no x gradient, no base backward product.
    layer = make_layer(kind)
    torch.manual_seed(2)
    x = torch.randn(2, 24, 96, dtype=BF16)
    grad_y = torch.randn(2, 24, 160, dtype=BF16)
    y, gx, gA, gB = run(layer, x, grad_y, general=False)
    _, _, gA0, gB0 = run(layer, x, grad_y, general=True)
    assert gx is None
    assert torch.equal(gA, gA0) and torch.equal(gB, gB0)
    _, _, ref_gA, ref_gB = fp64_reference(layer, x, grad_y)
    assert rel_err(gA, ref_gA) < 2e-2 and rel_err(gB, ref_gB) < 2e-2


def node_ran(layer: LoraLinear, x: torch.Tensor) -> bool:
    return type(layer(x).grad_fn).__name__ == "_LoraLinearBackward"


def test_node_runs_only_where_it_applies():
    layer = make_layer("4bit")
    x = torch.randn(2, 8, 96, dtype=BF16, requires_grad=True)
    assert node_ran(layer, x)
    assert not node_ran(layer, x.float())  # fp32 activations: PEFT's dtype rules, general path
    assert not node_ran(layer, x.half())  # activations in another dtype than the 4-bit layer computes in
    with torch.no_grad():
        assert layer(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.float16):
        assert not node_ran(layer, x)  # autocast to another half type decides the dtypes
    with torch.autocast("cpu", dtype=BF16):
        assert node_ran(layer, x)
    layer.lora_dropout["default"] = nn.Dropout(0.1)
    assert not node_ran(layer, x)  # dropout feeds the update another x than the base
    layer.eval()
    assert node_ran(layer, x)  # no dropout in eval mode
    layer.train()
    layer.lora_dropout["default"] = nn.Identity()
    layer.add("second", 4, 8)
    layer.active_adapters = ["default", "second"]
    assert not node_ran(layer, x)
    layer.active_adapters = ["second"]
    assert node_ran(layer, x)
    layer = make_layer("linear")
    assert node_ran(layer, x)
    seen = []
    hook = layer.base_layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    assert not node_ran(layer, x) and seen == [(2, 8, 160)]  # a hooked base runs its own forward
    hook.remove()
    assert node_ran(layer, x)
    layer.base_layer.weight.requires_grad_(True)  # a training base weight needs its own gradient
    assert not node_ran(layer, x)


def test_a_model_trains_alike_through_the_node(monkeypatch):
    model = tiny_llama().to(BF16)
    lk.add_adapter(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    nodes = [m for m in model.modules() if isinstance(m, LoraLinear)]
    with torch.no_grad():
        for layer in nodes:  # a trained adapter: B non-zero, so every gradient is
            layer.lora_B["default"].weight.normal_(std=0.1)
    model.train()
    torch.manual_seed(3)
    tokens = torch.randint(0, 128, (2, 16))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = step()
    assert len(nodes) == 14
    monkeypatch.setitem(TABLE, "lora_linear", TABLE["lora_linear"][-1:])  # the reference (general path) everywhere
    loss0, grads0 = step()
    assert torch.equal(loss, loss0)  # forward bit-identical
    assert grads.keys() == grads0.keys() and len(grads) == 28
    for name in grads:
        # x gradients differ by a rounding and carry it down the layers: adapter grads agree to bf16 precision
        assert rel_err(grads[name], grads0[name].double()) < 2e-2, name  # measured <= 1.5e-2
