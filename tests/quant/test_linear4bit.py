"""Linear4bit, QuantConfig and quantize_model: numerics, gradients, memory, model surgery."""

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_llama
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.linear4bit import Linear4bit, QuantConfig, quantize_model, quantized_bytes_per_param
from lorakit.quant.nf4 import dequantize_4bit, quantize_4bit


def _linear(in_features=128, out_features=64, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def _reference_weight(linear, quant_type="nf4", blocksize=64, double_quant=True):
    packed, state = quantize_4bit(linear.weight.detach(), blocksize, quant_type, double_quant)
    return dequantize_4bit(packed, state)


# ---- QuantConfig ---------------------------------------------------------------------------------------


def test_quant_config_accepts_dtype_names_for_yaml():
    assert QuantConfig(compute_dtype="float16").compute_dtype is torch.float16
    assert QuantConfig(compute_dtype="torch.float32").compute_dtype is torch.float32
    assert QuantConfig().compute_dtype is torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, listed",
    [
        ({"quant_type": "int4"}, "'nf4', 'fp4'"),
        ({"blocksize": 100}, "64, 128"),
        ({"compute_dtype": "int8"}, "'bfloat16', 'float16', 'float32'"),
        ({"double_quant": "yes"}, "true or false"),
    ],
)
def test_quant_config_rejects_bad_values_and_lists_allowed(kwargs, listed):
    with pytest.raises(LorakitError, match="QuantConfig") as err:
        QuantConfig(**kwargs)
    assert listed in str(err.value)


# ---- the module ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_dequantize_equals_tensor_level_reference(quant_type, double_quant):
    linear = _linear()
    layer = Linear4bit.from_linear(linear, quant_type=quant_type, double_quant=double_quant)
    expected = _reference_weight(linear, quant_type, 64, double_quant)
    assert torch.equal(layer.dequantize(torch.float32), expected)
    assert layer.dequantize().dtype is torch.bfloat16  # default: compute_dtype
    assert torch.equal(layer.dequantize(), expected.to(torch.bfloat16))
    assert (layer.in_features, layer.out_features) == (128, 64)
    assert layer.quant_state.nested is double_quant
    # 4 bits cost accuracy: the error is real but bounded by half the widest NF4/FP4 code gap of absmax
    err = (expected - linear.weight).abs().max().item()
    assert 0 < err < 0.2 * linear.weight.abs().max().item()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_forward_is_linear_on_dequantized_weight_in_compute_dtype(compute_dtype):
    linear = _linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=compute_dtype)
    x = torch.randn(2, 3, 128)
    y = layer(x)
    weight = _reference_weight(linear).to(compute_dtype)
    expected = F.linear(x.to(compute_dtype), weight, linear.bias.detach().to(compute_dtype)).float()
    assert y.dtype is torch.float32 and y.shape == (2, 3, 64)
    assert torch.equal(y, expected)


def test_input_gradient_matches_autograd_and_no_param_gets_grad():
    linear = _linear()
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(4, 128, requires_grad=True)
    grad_y = torch.randn(4, 64)
    layer(x).backward(grad_y)
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, _reference_weight(linear), linear.bias.detach()).backward(grad_y)
    assert torch.allclose(x.grad, x_ref.grad, rtol=0, atol=1e-6)
    assert x.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.parameters())
    assert not any(p.requires_grad for p in layer.parameters())


def test_unfrozen_bias_gets_its_gradient():
    layer = Linear4bit.from_linear(_linear(), compute_dtype=torch.float32)
    layer.bias.requires_grad_(True)
    grad_y = torch.randn(2, 5, 64)
    layer(torch.randn(2, 5, 128)).backward(grad_y)
    assert torch.allclose(layer.bias.grad, grad_y.sum((0, 1)), atol=1e-5)


def test_backward_saves_packed_weight_not_dequantized_matrix():
    layer = Linear4bit.from_linear(_linear(256, 128), compute_dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(torch.randn(3, 256, requires_grad=True))
    y.sum().backward()
    assert any(t.dtype is torch.uint8 and t.numel() == 256 * 128 // 2 for t in saved)
    assert not any(t.is_floating_point() and t.numel() >= 256 * 128 for t in saved)


def test_to_dtype_keeps_quant_state_exact():
    layer = Linear4bit.from_linear(_linear())
    before = layer.dequantize(torch.float32)
    layer.to(torch.float16)
    assert layer.absmax.dtype is torch.uint8 and layer.nested_absmax.dtype is torch.float32
    assert layer.quant_map.dtype is torch.float32 and layer.bias.dtype is torch.float16
    assert torch.equal(layer.dequantize(torch.float32), before)


def test_state_dict_round_trips_into_another_layer():
    source = Linear4bit.from_linear(_linear(seed=0))
    target = Linear4bit.from_linear(_linear(seed=1))
    assert not torch.equal(source.dequantize(), target.dequantize())
    target.load_state_dict(source.state_dict())
    assert torch.equal(source.dequantize(), target.dequantize())
    assert set(source.state_dict()) == {
        "bias",
        "packed",
        "absmax",
        "quant_map",
        "nested_offset",
        "nested_absmax",
        "nested_quant_map",
    }


def test_to_linear_gives_plain_dequantized_layer():
    linear = _linear(dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(linear)
    plain = layer.to_linear()
    assert type(plain) is nn.Linear and plain.weight.dtype is torch.bfloat16
    assert torch.equal(plain.weight, _reference_weight(linear))
    assert torch.equal(plain.bias, linear.bias)
    assert layer.to_linear(torch.float32).weight.dtype is torch.float32


@pytest.mark.parametrize(
    "weight, message",
    [
        (torch.ones(64, 64, dtype=torch.int32), "floating-point"),
        (torch.ones(0, 64), "empty"),
        (torch.ones(2, 64, 64), "2-D"),
        (torch.ones(64, 64, device="meta"), "meta device"),
    ],
)
def test_bad_weights_raise_clear_errors(weight, message):
    with pytest.raises(LorakitError, match=message):
        Linear4bit.from_weight(weight)


def test_bad_inputs_through_quantize_model_name_the_layer():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    model[2].weight = nn.Parameter(torch.ones(64, 64, dtype=torch.int64), requires_grad=False)
    with pytest.raises(LorakitError, match=r"layer '2'.*floating-point"):
        quantize_model(model, QuantConfig())
    with pytest.raises(LorakitError, match="expected an nn.Linear"):
        Linear4bit.from_linear(nn.Conv1d(4, 4, 1))


# ---- quantize_model ------------------------------------------------------------------------------------


def test_quantize_model_swaps_linears_but_not_head_or_skipped():
    model = tiny_llama()
    quantize_model(model, QuantConfig(), skip=["mlp.down_proj"])
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["lm_head"] is nn.Linear
    assert kinds["model.layers.0.mlp.down_proj"] is nn.Linear
    quantized = [n for n, k in kinds.items() if k is Linear4bit]
    assert len(quantized) == 2 * 6 and "model.layers.1.self_attn.q_proj" in quantized


def test_quantized_model_equals_float_model_on_dequantized_weights():
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model, fake_quantized = tiny_llama(), tiny_llama()
    with torch.no_grad():
        reference = model(tokens).logits
        for name, module in fake_quantized.named_modules():
            if isinstance(module, nn.Linear) and name != "lm_head":
                module.weight.copy_(_reference_weight(module))
        expected = fake_quantized(tokens).logits
        quantize_model(model, QuantConfig(compute_dtype=torch.float32))
        logits = model(tokens).logits
    assert torch.equal(logits, expected)
    rel = ((logits - reference).norm() / reference.norm()).item()
    print(f"\nNF4 tiny-llama (random init) logits relative error vs fp32: {rel:.4f}")
    assert rel > 0  # quantization did change the weights


def test_quantize_model_frees_float_weights_as_it_goes():
    model = tiny_llama()
    weight = weakref.ref(model.model.layers[0].self_attn.q_proj.weight)
    quantize_model(model, QuantConfig())
    gc.collect()
    assert weight() is None


def test_quantize_model_with_nothing_to_quantize_names_the_linears():
    model = tiny_llama(layers=1)
    with pytest.raises(LorakitError, match=r"no nn.Linear layer left.*lm_head"):
        quantize_model(
            model,
            QuantConfig(),
            skip=["self_attn.q_proj", "k_proj", "v_proj", "o_proj", "mlp.gate_proj", "up_proj", "down_proj"],
        )
    with pytest.raises(LorakitError, match="QuantConfig"):
        quantize_model(model, {"quant_type": "nf4"})


def test_quantize_model_refuses_lora_wrapped_layers():
    from lorakit import LoraConfig, add_adapter

    model = add_adapter(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    with pytest.warns(UserWarning, match="quantize the model before adding adapters"):
        with pytest.raises(LorakitError, match="adapters were not added before quantizing"):
            quantize_model(model, QuantConfig())


def _expected_bytes(n: int, double_quant: bool) -> int:
    # packed 4-bit codes + absmax (fp32, or uint8 + fp32 per 256 blocks + offset) + 16-entry fp32 code table,
    # + the 256-entry fp32 dynamic map of the nested absmax
    nblocks = -(-n // 64)
    if double_quant:
        return n // 2 + nblocks + 4 * -(-nblocks // 256) + 4 + 64 + 1024
    return n // 2 + 4 * nblocks + 64


def test_memory_bytes_per_param():
    # hidden 512: realistic block counts, so the per-layer code tables (64 B + 1 KiB) are amortized
    figures = {}
    for double_quant in (True, False):
        model = quantize_model(tiny_llama(hidden=512), QuantConfig(double_quant=double_quant))
        sizes = [m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit)]
        figures[double_quant] = quantized_bytes_per_param(model)
        assert figures[double_quant] == sum(_expected_bytes(n, double_quant) for n in sizes) / sum(sizes)
    print(
        f"\nbytes/param over {sum(sizes)} weights: "
        f"nf4+double_quant {figures[True]:.4f}, nf4 {figures[False]:.4f}"
    )
    assert 0.5 + 1 / 64 < figures[True] <= 0.53
    assert 0.5 + 4 / 64 < figures[False] < 0.5630


# ---- adapters on a 4-bit base --------------------------------------------------------------------------


def test_adapters_train_on_4bit_base_and_base_stays_bit_identical():
    from lorakit import LoraConfig, add_adapter

    model = quantize_model(tiny_llama(), QuantConfig())
    add_adapter(model, LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    # a learnable rule (next token = token + 1), so a few steps of a rank-4 adapter make real progress
    tokens = (torch.tensor([[3], [40], [77], [101]]) + torch.arange(16)) % 128
    model.train()
    losses = []
    for _ in range(20):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert losses[-1] < losses[0] - 0.5, losses  # from ln(128) = 4.85: a real drop, not noise
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    packed = [k for k in before if k.endswith(".packed")]
    assert len(packed) == 14 and all(torch.equal(before[k], after[k]) for k in packed)
