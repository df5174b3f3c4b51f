"""4-bit checkpoints: lorakit's safetensors file, and the bitsandbytes/transformers layout both ways."""

import json
import os
import warnings

import pytest
import torch
from helpers import tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.checkpoint import load_bnb_state_dict, load_quantized, save_quantized, to_bnb_state_dict
from lorakit.quant.linear4bit import Linear4bit, QuantConfig, quantize_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def _unchanged(model, snapshot):
    state, kinds = snapshot
    now = model.state_dict()
    return (
        kinds == [type(m) for m in model.modules()]
        and state.keys() == now.keys()
        and all(torch.equal(state[k], now[k]) for k in state)
    )


def _mixed_model(tie=False):
    # nf4 + double quant with bf16 compute on attention, fp4 without double quant on the MLP
    model = quantize_model(
        tiny_llama(tie=tie), QuantConfig(), skip=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    )
    return quantize_model(model, QuantConfig("fp4", 128, False, "float32"))


def _read(path):
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata()


# ---- lorakit's own file --------------------------------------------------------------------------------


def test_save_load_round_trip_into_float_model(tmp_path):
    model = _mixed_model()
    path = save_quantized(model, tmp_path / "model.safetensors")
    loaded = load_quantized(tiny_llama(seed=5), path)
    q_proj, down_proj = loaded.model.layers[1].self_attn.q_proj, loaded.model.layers[1].mlp.down_proj
    assert (
        isinstance(q_proj, Linear4bit)
        and q_proj.compute_dtype is torch.bfloat16
        and q_proj.quant_type == "nf4"
    )
    assert isinstance(down_proj, Linear4bit) and down_proj.quant_type == "fp4" and down_proj.blocksize == 128
    assert down_proj.nested_blocksize is None and down_proj.compute_dtype is torch.float32
    assert type(loaded.lm_head) is nn.Linear
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)
    records = json.loads(_read(path)[1]["lorakit_quant_layers"])
    assert records["model.layers.0.mlp.up_proj"] == {
        "shape": [128, 64],
        "dtype": "float32",
        "quant_type": "fp4",
        "blocksize": 128,
        "bias": False,
        "compute_dtype": "float32",
        "nested": False,
        "nested_blocksize": None,
        "nested_dtype": None,
    }
    assert len(records) == 14


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    model = _mixed_model(tie=True)
    path = save_quantized(model, tmp_path / "tied.safetensors")
    tensors, metadata = _read(path)
    assert (
        "lm_head.weight" not in tensors
        and json.loads(metadata["lorakit_aliases"])["lm_head.weight"] == "model.embed_tokens.weight"
    )
    loaded = load_quantized(tiny_llama(seed=5, tie=True), path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, model(TOKENS).logits)


def test_loads_into_meta_device_architecture(tmp_path):
    def build():
        return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 32))

    torch.manual_seed(0)
    model = quantize_model(build(), QuantConfig(compute_dtype="float32"))
    path = save_quantized(model, tmp_path / "seq.safetensors")
    with torch.device("meta"):
        skeleton = build()
    loaded = load_quantized(skeleton, path)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))


def test_save_replaces_atomically_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "m.safetensors"
    save_quantized(quantize_model(tiny_llama(seed=1), QuantConfig()), path)
    save_quantized(_mixed_model(), path)
    assert os.listdir(tmp_path) == ["m.safetensors"]
    assert (
        json.loads(_read(path)[1]["lorakit_quant_layers"])["model.layers.0.mlp.up_proj"]["quant_type"]
        == "fp4"
    )
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError):  # os.replace cannot put a file over a directory
        save_quantized(_mixed_model(), tmp_path / "adir")
    assert sorted(os.listdir(tmp_path)) == ["adir", "m.safetensors"] and os.listdir(tmp_path / "adir") == []


def test_save_needs_a_quantized_model(tmp_path):
    with pytest.raises(LorakitError, match="run quantize_model first"):
        save_quantized(tiny_llama(), tmp_path / "x.safetensors")


def _tampered(tmp_path, change):
    path = save_quantized(_mixed_model(), tmp_path / "good.safetensors")
    tensors, metadata = _read(path)
    change(tensors, metadata)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    return bad


def _pop(key):
    return lambda tensors, metadata: tensors.pop(key)


def _shrink(key):
    return lambda tensors, metadata: tensors.__setitem__(key, tensors[key][:-1].clone())


@pytest.mark.parametrize(
    "change, bad_key",
    [
        (_pop("model.layers.1.mlp.down_proj.absmax"), "model.layers.1.mlp.down_proj.absmax"),
        (_pop("model.norm.weight"), "model.norm.weight"),
        (_shrink("model.layers.0.self_attn.k_proj.packed"), "model.layers.0.self_attn.k_proj.packed"),
        (
            _shrink("model.layers.0.self_attn.q_proj.nested_absmax"),
            "model.layers.0.self_attn.q_proj.nested_absmax",
        ),
        (_shrink("model.embed_tokens.weight"), "model.embed_tokens.weight"),
        (lambda t, m: t.__setitem__("model.extra", torch.zeros(2)), "model.extra"),
        (
            lambda t, m: m.__setitem__(
                "lorakit_quant_layers", m["lorakit_quant_layers"].replace("[64, 64]", "[64, 65]", 1)
            ),
            "model.layers.0.self_attn.q_proj",
        ),
    ],
)
def test_tampered_file_names_the_bad_key_and_leaves_model_unchanged(tmp_path, change, bad_key):
    bad = _tampered(tmp_path, change)
    model = tiny_llama(seed=5)
    before = _snapshot(model)
    with pytest.raises(LorakitError) as err:
        load_quantized(model, bad)
    assert str(bad) in str(err.value) and repr(bad_key) in str(err.value), str(err.value)
    assert _unchanged(model, before)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: data[: len(data) - 100], "not a valid safetensors file"),
        (lambda data: b"\xff" * 8 + data[8:], "not a valid safetensors file"),
    ],
)
def test_truncated_or_garbled_file_is_a_clear_error(tmp_path, damage, message):
    path = save_quantized(_mixed_model(), tmp_path / "m.safetensors")
    path.write_bytes(damage(path.read_bytes()))
    model = tiny_llama(seed=5)
    before = _snapshot(model)
    with pytest.raises(LorakitError, match=message) as err:
        load_quantized(model, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert _unchanged(model, before)


def test_plain_safetensors_file_is_rejected(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(tiny_llama().state_dict(), str(path))
    with pytest.raises(LorakitError, match="not a lorakit 4-bit checkpoint"):
        load_quantized(tiny_llama(), path)


# ---- bitsandbytes / transformers layout ----------------------------------------------------------------


def _bnb_layer(quant_type, double_quant, seed=0):
    # in_features a multiple of the blocksize: bnb 0.50.2's AVX-512 CPU dequant is wrong otherwise (§2.5)
    torch.manual_seed(seed)
    linear = nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(
        128,
        64,
        bias=True,
        compute_dtype=torch.float32,
        compress_statistics=double_quant,
        quant_type=quant_type,
    )
    layer.load_state_dict(linear.state_dict())
    return nn.Sequential(layer.to("cpu")).train()  # train mode: no CPU repacking (facts §2.8)


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_bnb_state_dict_loads_into_lorakit(quant_type, double_quant):
    reference = _bnb_layer(quant_type, double_quant)
    model = load_bnb_state_dict(
        nn.Sequential(nn.Linear(128, 64)), reference.state_dict(), compute_dtype="float32"
    )
    weight = reference[0].weight
    assert isinstance(model[0], Linear4bit) and model[0].quant_state.nested is double_quant
    assert torch.equal(
        model[0].dequantize(torch.float32), bnbF.dequantize_4bit(weight.data, weight.quant_state)
    )
    x = torch.randn(5, 128)
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", True), ("fp4", False)])
def test_lorakit_state_dict_is_bnb_serialization(quant_type, double_quant):
    torch.manual_seed(0)
    model = quantize_model(
        nn.Sequential(nn.Linear(128, 64)), QuantConfig(quant_type, 64, double_quant, "float32")
    )
    state = to_bnb_state_dict(model)
    stats = {k.removeprefix("0.weight."): v for k, v in state.items() if k.startswith("0.weight.")}
    weight = bnb.nn.Params4bit.from_prequantized(state["0.weight"], stats, device="cpu")
    assert torch.equal(
        bnbF.dequantize_4bit(weight.data, weight.quant_state), model[0].dequantize(torch.float32)
    )
    # and byte for byte what bitsandbytes itself serializes for that layer
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        state["0.weight"], dict(stats), device="cpu", module=layer
    )
    layer.bias = nn.Parameter(state["0.bias"])
    expected = nn.Sequential(layer).state_dict()
    assert list(state) == list(expected)
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_bnb_state_dict_with_missing_key_names_it_and_leaves_model_unchanged():
    state = _bnb_layer("nf4", True).state_dict()
    del state["0.weight.nested_absmax"]
    model = nn.Sequential(nn.Linear(128, 64))
    before = _snapshot(model)
    with pytest.raises(LorakitError, match=r"'0\.weight\.nested_absmax' is missing"):
        load_bnb_state_dict(model, state)
    assert _unchanged(model, before)
    with pytest.raises(LorakitError, match="not a bitsandbytes 4-bit state dict"):
        load_bnb_state_dict(model, nn.Sequential(nn.Linear(128, 64)).state_dict())


def test_transformers_4bit_checkpoint_loads_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(hidden=128).save_pretrained(tmp_path / "fp32")
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=config, device_map="cpu"
    )
    reference.save_pretrained(tmp_path / "4bit")
    with safe_open(str(tmp_path / "4bit" / "model.safetensors"), "pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    model = load_bnb_state_dict(tiny_llama(seed=9, hidden=128), state, compute_dtype=torch.float32)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 14
    reference.train()  # bnb's CPU eval path repacks weights and changes the numerics (facts §2.8)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, reference(TOKENS).logits)
