"""LoftQ init: error against NF4 alone, the base as its own NF4 round trip, PEFT's numbers, and the saved layout."""

import json

import bitsandbytes as bnb
import peft
import pytest
import torch
from helpers import tiny_llama
from peft.utils.loftq_utils import _low_rank_decomposition, loftq_init
from safetensors import safe_open
from torch import nn

import lorakit as lk
from lorakit.loftq import loftq_decompose, nf4_roundtrip, reconstruction_error
from lorakit.loftq_save import save_loftq
from lorakit.lora import LoraLinear
from lorakit.quant import Linear4bit

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
FP32_NF4 = lk.QuantConfig(quant_type="nf4", blocksize=64, double_quant=False, compute_dtype=torch.float32)


def _weight(out_features=256, in_features=512, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


def _loftq_layer(weight, r=16, alpha=16, iters=1, dtype=torch.float32):
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        base.weight.copy_(weight)
    layer = LoraLinear(base)
    layer.add("default", r=r, alpha=alpha, init="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": iters})
    return layer


def _layer_error(weight, layer):
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    return reconstruction_error(weight, layer.base_layer.weight, A, B, layer.scaling["default"])


def _nf4_error(weight):
    return torch.linalg.matrix_norm(weight - nf4_roundtrip(weight)).item()


def _peft_loftq_on_cpu(weight, r, num_iter):
    """PEFT's loftq_init steps with its own parts, on the CPU: bnb's Params4bit NF4 and PEFT's SVD helper.

    PEFT's loftq_init itself moves the weight to "cuda" (or "xpu"), so it cannot run on a CPU-only torch.
    """
    weight = weight.float()
    target = weight
    for step in range(num_iter):
        param = bnb.nn.Params4bit(target, requires_grad=False, compress_statistics=False, quant_type="nf4").to("cpu")
        q = bnb.functional.dequantize_4bit(param.data, param.quant_state)
        parts = _low_rank_decomposition(weight - q, reduced_rank=r)
        if step + 1 < num_iter:
            target = weight - parts["L"] @ parts["R"]
    return q, parts["R"], parts["L"]


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _loftq_llama(r=8, alpha=16, iters=5):
    model = tiny_llama()
    config = lk.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", init_lora_weights="loftq",
                           loftq_config={"loftq_bits": 4, "loftq_iter": iters})
    return lk.add_adapter(model, config)


def test_error_is_below_nf4_alone_and_does_not_grow_with_iterations():
    weight = _weight()
    nf4 = _nf4_error(weight)
    one, five = (_layer_error(weight, _loftq_layer(weight, iters=n)) for n in (1, 5))
    assert one < 0.95 * nf4  # measured 0.917 of NF4's error
    assert five <= one
    assert five < 0.85 * nf4  # measured 0.817


def test_scaling_is_divided_out_so_any_alpha_approximates_w():
    # PEFT's factors times s = 2 would give back exactly NF4's error (W - Q - 2·R_r has norm ||W - Q||).
    weight = _weight()
    same = _layer_error(weight, _loftq_layer(weight, r=16, alpha=16))
    double = _layer_error(weight, _loftq_layer(weight, r=16, alpha=32))
    assert double == pytest.approx(same, rel=1e-4)
    assert double < 0.95 * _nf4_error(weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_base_is_its_own_nf4_round_trip(dtype):
    layer = _loftq_layer(_weight(), iters=2, dtype=dtype)
    base = layer.base_layer.weight
    assert base.dtype == dtype
    requantized = Linear4bit.from_weight(base, None, "nf4", 64, double_quant=False, compute_dtype=dtype)
    assert torch.equal(requantized.dequantize(dtype), base)
    A = layer.lora_A["default"].weight
    assert A.dtype == torch.float32
    assert torch.equal(A, A.to(dtype).float())  # half-rounded values in fp32, as PEFT leaves them


def test_conv1d_is_decomposed_in_its_out_in_layout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)).eval()
    original = {name: m.weight.detach().clone() for name, m in model.named_modules() if name.endswith("c_attn")}
    config = lk.LoraConfig(r=8, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], init_lora_weights="loftq",
                           loftq_config={"loftq_iter": 2})
    lk.add_adapter(model, config)
    for name, weight in original.items():
        layer = model.get_submodule(name)
        assert layer.fan_in_fan_out and layer.base_layer.weight.shape == weight.shape == (64, 192)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape == (8, 64) and B.shape == (192, 8)
        q, A_ref, B_ref = loftq_decompose(weight.T, 8, 1.0, 2)  # blocks over [out, in], as transformers quantizes
        assert torch.equal(layer.base_layer.weight, q.T) and torch.equal(A, A_ref) and torch.equal(B, B_ref)
        assert torch.equal(nf4_roundtrip(layer.base_layer.weight.T), layer.base_layer.weight.T)
        assert reconstruction_error(weight.T, q, A, B) < _nf4_error(weight.T)
    ids = torch.randint(0, 100, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("iters", [1, 5])
def test_bit_identical_to_peft_loftq_steps_on_cpu(iters):
    # With alpha == r lorakit divides by 1.0, so A, B and Q are PEFT's own, bit for bit (bnb's CPU NF4 is
    # lorakit's, and the SVD is the same LAPACK call on the same residual).
    weight = _weight()
    q, A, B = _peft_loftq_on_cpu(weight, 16, iters)
    layer = _loftq_layer(weight, iters=iters)
    assert torch.equal(layer.base_layer.weight, q)
    assert torch.equal(layer.lora_A["default"].weight, A)
    assert torch.equal(layer.lora_B["default"].weight, B)


@pytest.mark.skipif(torch.cuda.is_available(), reason="PEFT's loftq_init runs where CUDA is available")
def test_peft_loftq_init_needs_cuda_or_xpu():
    # peft 0.21.2 utils/loftq_utils.py: compute_device = "xpu" if is_xpu_available() else "cuda".
    with pytest.raises(AssertionError, match="not compiled with CUDA"):
        loftq_init(_weight(), num_bits=4, reduced_rank=16, num_iter=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_close_to_peft_loftq_init_on_cuda():
    # Not bit-exact: the SVD runs on the GPU there (other rounding, and signs of singular vectors may flip).
    weight = _weight()
    q, A, B = loftq_init(weight, num_bits=4, reduced_rank=16, num_iter=1)
    layer = _loftq_layer(weight)
    assert _layer_error(weight, layer) == pytest.approx(reconstruction_error(weight, q, A.cpu(), B.cpu()), rel=1e-4)
    ours = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(ours, B.cpu() @ A.cpu(), atol=1e-4, rtol=0)


def test_a_quantized_base_is_refused_with_the_way_out():
    layer = LoraLinear(Linear4bit.from_linear(nn.Linear(64, 32), double_quant=False))
    with pytest.raises(lk.LorakitError, match="needs the float base weight.*before quantize_model.*save_loftq"):
        layer.add("default", r=4, alpha=4, init="loftq", loftq_config={"loftq_iter": 1})
    model = lk.quantize_model(tiny_llama(), FP32_NF4)
    with pytest.raises(lk.LorakitError, match="already 4-bit"):
        lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear", init_lora_weights="loftq"))


def test_loftq_model_is_closer_to_the_float_model_than_nf4():
    expected = _logits(tiny_llama())
    nf4 = _logits(lk.quantize_model(tiny_llama(), FP32_NF4))
    loftq = _logits(_loftq_llama(r=8, alpha=8, iters=5))
    assert (loftq - expected).norm() < 0.9 * (nf4 - expected).norm()


def test_save_loftq_writes_peft_recipe_layout_and_leaves_the_model(tmp_path):
    model = _loftq_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    out = save_loftq(model, tmp_path / "loftq")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [type(m) for m in model.modules()] == types
    config = json.loads((out / "loftq_init" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["base_model_name_or_path"] == str(out)
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        q_proj = handle.get_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not any("lora_" in k or "base_layer" in k for k in keys)
    assert torch.equal(q_proj, model.model.layers[0].self_attn.q_proj.base_layer.weight)  # deq(Q), not merged
    assert not [p.name for p in tmp_path.iterdir() if p.name != "loftq"]  # no temporary folder left


def test_saved_loftq_quantized_in_lorakit_gives_the_in_memory_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _loftq_llama()
    expected = _logits(model)
    out = save_loftq(model, tmp_path / "loftq")
    backbone = lk.quantize_model(AutoModelForCausalLM.from_pretrained(out).eval(), FP32_NF4)
    q_proj = backbone.model.layers[1].self_attn.q_proj
    assert torch.equal(q_proj.dequantize(torch.float32), model.model.layers[1].self_attn.q_proj.base_layer.weight)
    lk.load_adapter(backbone, out / "loftq_init")  # a rerun of LoftQ would refuse this 4-bit base
    torch.testing.assert_close(_logits(backbone), expected, atol=1e-5, rtol=0)


def test_saved_loftq_loads_in_peft_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _loftq_llama()
    expected = _logits(model)
    out = save_loftq(model, tmp_path / "loftq")
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out).eval(), out / "loftq_init")
    assert (expected - _logits(tiny_llama())).abs().max() > 1e-3
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)


def test_loading_the_saved_adapter_does_not_rerun_loftq(tmp_path):
    model = _loftq_llama()
    out = save_loftq(model, tmp_path / "loftq")
    original = tiny_llama()
    weights = {k: v.clone() for k, v in original.state_dict().items()}
    lk.load_adapter(original, out / "loftq_init")
    # A rerun would have replaced the base weights with deq(NF4(W)) and recomputed A and B.
    base = {k.replace(".base_layer", ""): v for k, v in original.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], v) for k, v in weights.items())
    ours = original.model.layers[0].mlp.down_proj.lora_A["default"].weight
    assert torch.equal(ours, model.model.layers[0].mlp.down_proj.lora_A["default"].weight)


def test_save_loftq_replaces_its_own_folder_and_refuses_others(tmp_path):
    model = _loftq_llama(iters=1)
    out = save_loftq(model, tmp_path / "loftq")
    (out / "stale.txt").write_text("from an earlier save")
    save_loftq(model, out)
    assert not (out / "stale.txt").exists() and (out / "loftq_init" / "adapter_model.safetensors").is_file()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(lk.LorakitError, match="holds other files"):
        save_loftq(model, foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    lk.merge_adapters(model)
    with pytest.raises(lk.LorakitError, match="merged"):
        save_loftq(model, tmp_path / "merged")
