"""VeRA: layers against a direct computation, and PEFT VeRA folders both ways against the real peft."""

import json
import os

import peft
import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open
from torch import nn

import lorakit as lk
from lorakit.vera import VeraLinear, vera_projections

TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))


def tiny_gpt2():
    """GPT-2 with transformers Conv1D projections (fan_in_fan_out), random init."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)).eval()


MODELS = {
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),  # three shapes: the shared pair is sliced
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
}


def _perturb(model, seed=3):
    """Training-like values for every lambda (at init lambda_b is 0 and the adapter is a no-op)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vera_lambda" in name:
                param.copy_(torch.randn_like(param) * 0.5)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _keys(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def _peft_projections(peft_model):
    buffers = dict(peft_model.named_buffers())
    key = next(k for k in buffers if k.endswith(".vera_A.default"))
    return buffers[key], buffers[key.replace(".vera_A.", ".vera_B.")]


def _our_projections(model):
    layer = next(m for m in model.modules() if isinstance(m, VeraLinear))
    pair = next(iter(layer.vera_projections.values()))
    return pair.vera_A, pair.vera_B


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("key, r", [(0, 8), (1234, 16)])
def test_projections_and_init_equal_peft_bitwise(model_name, key, r):
    make, targets = MODELS[model_name]
    torch.manual_seed(5)
    theirs = peft.get_peft_model(make(), peft.VeraConfig(r=r, target_modules=targets, projection_prng_key=key,
                                                         init_weights=False))
    torch.manual_seed(5)
    ours = lk.add_adapter(make(), lk.VeraConfig(r=r, target_modules=targets, projection_prng_key=key,
                                                init_weights=False))
    for mine, peft_tensor in zip(_our_projections(ours), _peft_projections(theirs)):
        assert mine.dtype == peft_tensor.dtype == torch.float32
        assert torch.equal(mine, peft_tensor)
    peft_lambdas = {k.replace("base_model.model.", ""): v for k, v in theirs.named_parameters() if "vera_lambda" in k}
    our_lambdas = {k: v for k, v in ours.named_parameters() if "vera_lambda" in k}
    assert our_lambdas.keys() == peft_lambdas.keys()
    for k, v in our_lambdas.items():  # init_weights=False: PEFT's ones / global-RNG randn draws, in its order
        assert torch.equal(v, peft_lambdas[k]), k


def test_projections_are_pure_functions_of_the_key():
    A1, B1 = vera_projections(4, 10, 20, key=7)
    A2, B2 = vera_projections(4, 10, 20, key=7)
    assert torch.equal(A1, A2) and torch.equal(B1, B2)
    assert not torch.equal(vera_projections(4, 10, 20, key=8)[0], A1)
    assert A1.abs().max() <= (6 / 10) ** 0.5 and B1.abs().max() <= (6 / 4) ** 0.5  # kaiming-uniform bounds


@pytest.mark.parametrize("model_name", MODELS)
def test_lorakit_save_loads_in_peft(tmp_path, model_name):
    make, targets = MODELS[model_name]
    ours = lk.add_adapter(make(), lk.VeraConfig(r=8, target_modules=targets, projection_prng_key=11))
    _perturb(ours)
    lk.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "VERA" and config["projection_prng_key"] == 11
    assert config["fan_in_fan_out"] is (model_name == "gpt2")
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    expected = _logits(ours)
    assert (expected - _logits(make())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_name", MODELS)
def test_peft_save_loads_in_lorakit(tmp_path, model_name):
    make, targets = MODELS[model_name]
    theirs = peft.get_peft_model(make(), peft.VeraConfig(r=8, target_modules=targets, d_initial=0.05))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapter(make(), tmp_path)
    assert isinstance(lk.inject.adapter_configs(ours)["default"], lk.VeraConfig)
    assert lk.trainable_parameters(ours)[0] == 0  # loaded for inference unless is_trainable
    expected = _logits(theirs)
    assert (expected - _logits(make())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules="all-linear"),
                                    dict(target_modules=["q_proj"], modules_to_save=["lm_head"]),
                                    dict(target_modules=["k_proj"], save_projection=False)])
def test_saved_keys_and_config_equal_peft(tmp_path, kwargs):
    lk.save_adapter(lk.add_adapter(tiny_llama(), lk.VeraConfig(r=4, **kwargs)), tmp_path / "ours")
    peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=4, **kwargs)).save_pretrained(tmp_path / "theirs")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    shared = {"auto_mapping", "peft_version", "target_modules"}  # PEFT fills these in; lorakit leaves them out
    assert {k: v for k, v in ours.items() if k not in shared} == {k: v for k, v in theirs.items() if k not in shared}


def test_gpt2_bias_vera_only_both_ways(tmp_path):
    kwargs = dict(r=8, target_modules=["c_attn", "c_fc"], bias="vera_only")
    ours = lk.add_adapter(tiny_gpt2(), lk.VeraConfig(**kwargs))
    assert ours.transformer.h[0].attn.c_attn.base_layer.bias.requires_grad
    assert not ours.transformer.h[0].attn.c_proj.bias.requires_grad
    _perturb(ours)
    with torch.no_grad():
        ours.transformer.h[1].mlp.c_fc.base_layer.bias.add_(0.5)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    assert _keys(tmp_path / "theirs") == _keys(tmp_path / "ours")
    back = lk.load_adapter(tiny_gpt2(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(back), _logits(ours), atol=1e-5, rtol=0)


def test_save_projection_false_regenerates_from_key(tmp_path):
    config = lk.VeraConfig(r=8, target_modules=["q_proj", "down_proj"], save_projection=False, projection_prng_key=3)
    ours = lk.add_adapter(tiny_llama(), config)
    _perturb(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    assert not {"base_model.vera_A", "base_model.vera_B"} & _keys(tmp_path / "ours")
    expected = _logits(ours)
    torch.testing.assert_close(_logits(lk.load_adapter(tiny_llama(), tmp_path / "ours")), expected, atol=0, rtol=0)
    with pytest.warns(UserWarning, match="PRNG"):
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    torch.testing.assert_close(_logits(lk.load_adapter(tiny_llama(), tmp_path / "theirs")), expected,
                               atol=1e-5, rtol=0)


def test_saved_projections_win_over_the_key(tmp_path):
    ours = lk.add_adapter(tiny_llama(), lk.VeraConfig(r=8, target_modules=["q_proj"]))
    _perturb(ours)
    with torch.no_grad():
        _our_projections(ours)[0].mul_(2)  # as if generated on another system: the file is the truth
    lk.save_adapter(ours, tmp_path)
    torch.testing.assert_close(_logits(lk.load_adapter(tiny_llama(), tmp_path)), _logits(ours), atol=0, rtol=0)


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 4, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _direct(x, weight, bias, lambda_b, lambda_d, A, B):
    """base(x) + lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ x))), written out."""
    out, fan_in = weight.shape
    y = x @ weight.T + (0 if bias is None else bias)
    return y + lambda_b * ((lambda_d * (x @ A[:, :fan_in].T)) @ B[:out].T)


def test_forward_and_merge_match_direct_computation():
    model = lk.add_adapter(TwoLinears(), lk.VeraConfig(r=5, target_modules=["up", "down"]))
    _perturb(model)
    A, B = _our_projections(model)
    assert A.shape == (5, 10) and B.shape == (10, 5)  # the largest in and out over both layers
    x = torch.randn(3, 6)
    layers = [model.up, model.down]
    h = x
    for layer in layers:
        base = layer.base_layer
        h = _direct(h, base.weight, base.bias, layer.vera_lambda_b["default"], layer.vera_lambda_d["default"], A, B)
        h = torch.relu(h) if layer is model.up else h
    with torch.no_grad():
        torch.testing.assert_close(model(x), h.detach(), atol=1e-6, rtol=0)
        before = model(x)
        weight = model.up.base_layer.weight.clone()
        lk.merge_adapters(model)
        delta = (model.up.vera_lambda_b["default"][:, None] * B[:10]) @ (model.up.vera_lambda_d["default"][:, None]
                                                                          * A[:, :6])
        torch.testing.assert_close(model.up.base_layer.weight, weight + delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
        lk.unmerge_adapters(model)
        torch.testing.assert_close(model.up.base_layer.weight, weight, atol=1e-6, rtol=0)
        plain = lk.unload(model, merge=True)
        assert type(plain.up) is nn.Linear and type(plain.down) is nn.Linear
        torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=0)


def test_gpt2_merge_and_unload_keep_logits():
    model = lk.add_adapter(tiny_gpt2(), lk.VeraConfig(r=8, target_modules=["c_attn", "c_proj"]))
    _perturb(model)
    expected = _logits(model)
    lk.merge_adapters(model)
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=0)
    plain = lk.unload(model)
    assert not any(isinstance(m, VeraLinear) for m in plain.modules())
    torch.testing.assert_close(_logits(plain), expected, atol=1e-5, rtol=0)


def test_adapter_switching_disable_delete_and_trainable_count():
    model = tiny_llama()
    base = _logits(model)
    lk.add_adapter(model, lk.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]), name="a")
    lk.add_adapter(model, lk.VeraConfig(r=4, target_modules=["q_proj"]), name="b")
    # lambda_b [out] and lambda_d [r] per layer; q_proj 64 out, v_proj 32 out, two layers
    assert lk.trainable_parameters(model)[0] == 2 * (64 + 8 + 32 + 8) + 2 * (64 + 4)
    assert lk.trainable_base_parameters(model) == []
    _perturb(model)
    assert lk.active_adapters(model) == ["a"]
    logits_a = _logits(model)
    lk.set_adapter(model, "b")
    logits_b = _logits(model)
    assert (logits_a - logits_b).abs().max() > 1e-3
    with lk.disable_adapters(model):
        torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)
    lk.delete_adapter(model, "b")
    lk.set_adapter(model, "a")
    torch.testing.assert_close(_logits(model), logits_a, atol=0, rtol=0)
    lk.delete_adapter(model, "a")
    assert not any(isinstance(m, VeraLinear) for m in model.modules())
    torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)


def test_vera_on_a_4bit_base_matches_direct_computation():
    model = TwoLinears()
    model.up = nn.Linear(64, 128)  # in_features a multiple of the blocksize (bitsandbytes' CPU quirk)
    model.down = nn.Linear(128, 64)
    lk.quantize_model(model, lk.QuantConfig(compute_dtype=torch.float32), skip=[])
    lk.add_adapter(model, lk.VeraConfig(r=8, target_modules=["up"]))
    _perturb(model)
    layer, x = model.up, torch.randn(2, 64)
    A, B = _our_projections(model)
    weight = layer.base_layer.dequantize(torch.float32)
    expected = _direct(x, weight, layer.base_layer.bias, layer.vera_lambda_b["default"],
                       layer.vera_lambda_d["default"], A, B)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        merged = lk.unload(model, merge=True)
        torch.testing.assert_close(merged.up(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "r must be an integer >= 1"),
    (dict(r=2.5), "r must be an integer >= 1"),
    (dict(vera_dropout=1.0), r"vera_dropout must be in \[0, 1\)"),
    (dict(bias="lora_only"), "bias must be one of"),
    (dict(projection_prng_key="seed"), "projection_prng_key must be an integer"),
    (dict(d_initial=float("nan")), "d_initial must be a finite number"),
    (dict(save_projection="yes"), "save_projection must be true or false"),
    (dict(layers_pattern="layers"), "layers_pattern is set but layers_to_transform is not"),
    (dict(target_modules="(q_proj"), "not a valid regex"),
])
def test_bad_configs_refused_with_the_reason(kwargs, message):
    with pytest.raises(lk.LorakitError, match=message):
        lk.VeraConfig(**kwargs)


def test_unknown_option_suggests_the_right_name():
    with pytest.raises(lk.LorakitError, match="did you mean 'vera_dropout'"):
        lk.VeraConfig.from_dict({"vera_dropuot": 0.1})
    assert lk.VeraConfig.from_dict({"r": 4, "peft_type": "VERA"}, strict=False).r == 4


def test_bad_targets_and_mixes_refused():
    with pytest.raises(lk.LorakitError, match="VeRA adapts linear layers only"):
        lk.add_adapter(tiny_llama(), lk.VeraConfig(r=4, target_modules=["embed_tokens"]))
    lora_model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(lk.LorakitError, match="one adapter kind per model"):
        lk.add_adapter(lora_model, lk.VeraConfig(r=4, target_modules=["q_proj"]), name="v")
    vera_model = lk.add_adapter(tiny_llama(), lk.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(lk.LorakitError, match="one adapter kind per model"):
        lk.add_adapter(vera_model, lk.LoraConfig(target_modules=["q_proj"]), name="l")
    with pytest.raises(lk.LorakitError, match="same key"):
        lk.add_adapter(vera_model, lk.VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1), name="k")


def test_load_refuses_a_folder_for_another_model(tmp_path):
    lk.save_adapter(lk.add_adapter(tiny_llama(), lk.VeraConfig(r=4, target_modules=["q_proj"])), tmp_path)
    with pytest.raises(lk.LorakitError, match="matches no module"):
        lk.load_adapter(tiny_gpt2(), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 6}))
    model = tiny_llama()
    with pytest.raises(lk.LorakitError, match="has shape"):
        lk.load_adapter(model, tmp_path)
    assert not any(isinstance(m, VeraLinear) for m in model.modules())


def test_bf16_base_rounds_like_peft():
    """PEFT casts new adapters to a half base's dtype and back up to fp32: same values, same bf16 logits."""
    def make():
        return tiny_llama().to(torch.bfloat16)

    torch.manual_seed(5)
    theirs = peft.get_peft_model(make(), peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(5)
    ours = lk.add_adapter(make(), lk.VeraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    for mine, peft_tensor in zip(_our_projections(ours), _peft_projections(theirs)):
        assert mine.dtype == torch.float32 and torch.equal(mine, peft_tensor)
        assert torch.equal(mine, mine.to(torch.bfloat16).float())
    _perturb(ours)
    _perturb(theirs)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=0, rtol=0)


def test_the_batched_engine_refuses_a_vera_folder_clearly(tmp_path):
    from lorakit.serve.adapters import read_adapter

    lk.save_adapter(lk.add_adapter(tiny_llama(), lk.VeraConfig(r=4, target_modules=["q_proj"])), tmp_path)
    with pytest.raises(lk.LorakitError, match="a VERA adapter is not served batched"):
        read_adapter("v", tmp_path, {}, max_rank=16)
