"""Adapter layers: the forward formula, scaling, several adapters, merge/unmerge, inits."""

import math

import peft
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, add_adapter
from lorakit.lora import LoraConv2d, LoraEmbedding, LoraLinear, lora_scale


def _linear(seed=0, fan_in=16, fan_out=12):
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out)


def _randomise_b(layer, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in layer.adapter_names:
            if isinstance(layer, LoraEmbedding):
                layer.lora_embedding_A[name].normal_()
            else:
                layer.lora_B[name].weight.normal_()


@pytest.mark.parametrize("rslora, expected", [(False, 8 / 4), (True, 8 / 2)])
def test_forward_is_base_plus_scaled_low_rank(rslora, expected):
    layer = LoraLinear(_linear())
    layer.add("default", r=4, alpha=8, use_rslora=rslora)
    layer.active_adapters = ["default"]
    _randomise_b(layer)
    assert layer.scaling["default"] == expected == lora_scale(8, 4, rslora)
    x = torch.randn(3, 16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    W, bias = layer.base_layer.weight, layer.base_layer.bias
    by_hand = x @ W.T + bias + expected * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), by_hand, atol=1e-5, rtol=0)
    assert (layer(x) - (x @ W.T + bias)).abs().max() > 1e-2


def test_dropout_applies_to_adapter_input_only():
    layer = LoraLinear(_linear())
    layer.add("default", r=4, alpha=4, dropout=0.5)
    layer.active_adapters = ["default"]
    _randomise_b(layer)
    x = torch.randn(64, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(3)
    out = layer(x)
    torch.manual_seed(3)
    mask_x = nn.functional.dropout(x, 0.5, training=True)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.testing.assert_close(out, layer.base_layer(x) + (mask_x @ A.T @ B.T), atol=1e-5, rtol=0)


def test_two_active_adapters_sum_their_deltas():
    layer = LoraLinear(_linear())
    layer.add("a", r=2, alpha=4)
    layer.add("b", r=3, alpha=3)
    _randomise_b(layer)
    x = torch.randn(5, 16)
    base = layer.base_layer(x)
    deltas = {}
    for name in ("a", "b"):
        layer.active_adapters = [name]
        deltas[name] = layer(x) - base
    layer.active_adapters = []
    torch.testing.assert_close(layer(x), base, atol=0, rtol=0)
    layer.active_adapters = ["a", "b"]
    torch.testing.assert_close(layer(x), base + deltas["a"] + deltas["b"], atol=1e-5, rtol=0)
    assert not torch.allclose(deltas["a"], deltas["b"])


def test_merge_unmerge_linear_exact():
    layer = LoraLinear(_linear())
    layer.add("a", r=4, alpha=8)
    layer.add("b", r=2, alpha=2)
    layer.active_adapters = ["a", "b"]
    _randomise_b(layer)
    x = torch.randn(5, 16)
    before_w = layer.base_layer.weight.detach().clone()
    expected = layer(x)
    layer.merge()
    assert layer.merged_adapters == ["a", "b"]
    assert (layer.base_layer.weight - before_w).abs().max() > 1e-2
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.base_layer(x), expected, atol=1e-5, rtol=0)
    layer.unmerge()
    assert layer.merged_adapters == []
    torch.testing.assert_close(layer.base_layer.weight, before_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)


def test_embedding_forward_and_merge():
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(20, 8))
    layer.add("default", r=3, alpha=6)
    layer.active_adapters = ["default"]
    assert torch.count_nonzero(layer.lora_embedding_A["default"]) == 0
    _randomise_b(layer)
    ids = torch.tensor([[0, 5, 19], [3, 3, 7]])
    A, B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    by_hand = layer.base_layer.weight[ids] + 2.0 * (A.T[ids] @ B.T)
    out = layer(ids)
    torch.testing.assert_close(out, by_hand, atol=1e-5, rtol=0)
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer(ids), out, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv2d_forward_and_merge(kernel):
    torch.manual_seed(0)
    layer = LoraConv2d(nn.Conv2d(3, 6, kernel, padding=kernel // 2))
    layer.add("default", r=2, alpha=4)
    layer.active_adapters = ["default"]
    _randomise_b(layer)
    x = torch.randn(2, 3, 7, 7)
    out = layer(x)
    assert (out - layer.base_layer(x)).abs().max() > 1e-2
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer.base_layer(x), out, atol=1e-5, rtol=0)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, before, atol=1e-6, rtol=0)


def test_default_init_kaiming_a_and_zero_b():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(256, 64))
    layer.add("default", r=64, alpha=8)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    bound = 1 / math.sqrt(256)
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    assert torch.count_nonzero(B) == 0


def test_gaussian_init_std_one_over_r():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(512, 32))
    layer.add("default", r=4, alpha=8, init="gaussian")
    A = layer.lora_A["default"].weight
    assert abs(A.std().item() - 1 / 4) < 0.01
    assert abs(A.mean().item()) < 0.01
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


def test_init_false_leaves_both_random():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12))
    layer.add("default", r=4, alpha=8, init=False)
    assert torch.count_nonzero(layer.lora_A["default"].weight) == 4 * 16
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 12 * 4


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_principal_inits_preserve_the_weight(init):
    base = _linear(fan_in=16, fan_out=12)
    original = base.weight.detach().clone()
    layer = LoraLinear(base)
    layer.add("default", r=4, alpha=8, init=init)
    residual = layer.base_layer.weight.detach()
    assert (residual - original).abs().max() > 1e-2
    torch.testing.assert_close(residual + layer.delta_weight("default"), original, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_match_peft(init):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))

    x = torch.randn(4, 16)
    theirs = peft.get_peft_model(model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                           init_lora_weights=init))
    ours = add_adapter(model(), LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=init))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
        for index in ("0", "2"):
            torch.testing.assert_close(ours.get_submodule(index).base_layer.weight,
                                       theirs.base_model.model.get_submodule(index).base_layer.weight,
                                       atol=1e-5, rtol=0)
        # The adapter must not be trivially zero, or the output equality says nothing.
        assert ours[0].lora_B["default"].weight.abs().max() > 1e-2
