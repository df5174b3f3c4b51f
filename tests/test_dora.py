"""DoRA (`LoraConfig(use_dora=True)`): init, forward, merge and files, against the real peft and a direct formula."""

import copy
import os

import peft
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_gpt2, tiny_llama
from safetensors import safe_open
from torch import nn

import lorakit as lk
from lorakit.kernels.dora_linear import row_norm, row_norm_expanded, row_norm_reference
from lorakit.lora import LoraLinear

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj", "gate_proj"]


def _perturb(model, seed=3):
    """Non-zero B and magnitudes away from the norms: otherwise DoRA's output is the base model's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.3 * torch.rand(param.shape, generator=generator))


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _keys(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def _direct_dora(x, weight, bias, A, B, magnitude, scale):
    """The paper's formula with the full matrix: m * (W + s·B·A) / ||W + s·B·A||_row, applied to x."""
    full = weight + scale * B @ A
    directed = full / torch.linalg.norm(full, dim=1, keepdim=True)
    return F.linear(x, magnitude[:, None] * directed, bias)


MODELS = [("llama", tiny_llama, LLAMA_TARGETS), ("gpt2", tiny_gpt2, ["c_attn", "c_fc", "c_proj"])]


@pytest.mark.parametrize("kind,build,targets", MODELS)
def test_init_and_logits_equal_peft(kind, build, targets):
    """Seeded: lorakit's magnitudes equal PEFT's, and after the same perturbation the logits agree."""
    config = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    torch.manual_seed(7)
    ours = lk.add_adapter(build(), lk.LoraConfig(**config))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    our_params = {k: v for k, v in ours.named_parameters() if v.requires_grad}
    their_params = {k.removeprefix("base_model.model."): v for k, v in theirs.named_parameters() if v.requires_grad}
    assert set(our_params) == set(their_params)
    assert any("lora_magnitude_vector" in k for k in our_params)
    for key, value in our_params.items():
        assert torch.equal(value, their_params[key]), key
    _perturb(ours)
    _perturb(theirs)
    base = _logits(build())
    ours_out, theirs_out = _logits(ours), _logits(theirs)
    assert (ours_out - base).abs().max() > 1e-2  # the adapter changes the output
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,build,targets", MODELS)
def test_files_both_ways_with_peft(kind, build, targets, tmp_path):
    """Ours loads in PeftModel.from_pretrained with the same logits; PEFT's loads here with the same logits."""
    config = dict(r=4, lora_alpha=8, target_modules=targets, use_dora=True)
    ours = lk.add_adapter(build(), lk.LoraConfig(**config))
    _perturb(ours, seed=5)
    lk.save_adapter(ours, tmp_path / "ours")
    keys = _keys(tmp_path / "ours")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    assert not any("magnitude_vector.weight" in k for k in keys)
    loaded = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    torch.testing.assert_close(_logits(loaded), _logits(ours), atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    _perturb(theirs, seed=6)
    theirs.save_pretrained(tmp_path / "theirs")
    assert _keys(tmp_path / "theirs") == keys
    mine = lk.load_adapter(build(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(mine), _logits(theirs), atol=1e-5, rtol=0)


def _layer(base, r=4, alpha=8, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(base)
    layer.add("default", r, alpha, dropout, use_dora=True)
    layer.active_adapters = ["default"]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(std=0.3)
        layer.lora_magnitude_vector["default"].weight.mul_(1.2)
    return layer


def test_forward_matches_the_direct_formula_linear_and_conv1d():
    """y = m·(W + s·B·A)/||W + s·B·A||·x + b for nn.Linear and for Conv1D (whose weight is [in, out])."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    x = torch.randn(3, 5, 24)
    for base in (nn.Linear(24, 40), Conv1D(40, 24)):
        layer = _layer(base)
        weight = base.weight.T if isinstance(base, Conv1D) else base.weight
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected = _direct_dora(x, weight, base.bias, A, B, layer.lora_magnitude_vector["default"].weight, 2.0)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_row_norms_never_forming_the_sum_equal_the_formed_one():
    """The expansion ||W||² + 2s<B, WAᵀ> + s²<B AAᵀ, B> and the fp32 row-block form equal the full sum's norm."""
    generator = torch.Generator().manual_seed(0)
    weight, A, B = (torch.randn(s, generator=generator, dtype=torch.float64) for s in ((48, 32), (8, 32), (48, 8)))
    expected = row_norm_reference(weight, A, B, 0.7).double()
    got = row_norm_expanded(weight, A, B, 0.7, weight.square().sum(1))
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)
    import lorakit.kernels.dora_linear as dora_linear

    blocks, dora_linear.ROW_BLOCK_ELEMENTS = dora_linear.ROW_BLOCK_ELEMENTS, 5 * 32  # five rows a block
    try:
        blocked = row_norm(weight.float(), A.float(), B.float(), 0.7, None)
    finally:
        dora_linear.ROW_BLOCK_ELEMENTS = blocks
    torch.testing.assert_close(blocked, row_norm_reference(weight.float(), A.float(), B.float(), 0.7),
                               atol=0, rtol=2e-7)  # an ulp: a block's products may round as the whole's do not


@pytest.mark.parametrize("conv1d", [False, True])
def test_merge_and_unmerge_are_exact(conv1d):
    """Merged forward equals the unmerged one; unmerge restores W within fp32 rounding; two adapters stack."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    base = Conv1D(40, 24) if conv1d else nn.Linear(24, 40)
    original = base.weight.detach().clone()
    layer = _layer(base)
    layer.add("second", 2, 4, use_dora=False)
    with torch.no_grad():
        layer.lora_B["second"].weight.normal_(std=0.3)
    layer.active_adapters = ["default", "second"]
    x = torch.randn(4, 24)
    with torch.no_grad():
        live = layer(x)
        layer.merge()
        assert layer.merged_adapters == ["default", "second"]
        torch.testing.assert_close(layer(x), live, atol=1e-5, rtol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=1e-6)
    assert not torch.equal(live, base(x))


def test_unload_with_merge_keeps_the_output(tmp_path):
    """lk.unload(merge=True) of a DoRA model gives plain layers with the adapted model's logits."""
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
    _perturb(model)
    adapted = _logits(model)
    plain = lk.unload(model, merge=True)
    assert not any("lora" in k for k in plain.state_dict())
    torch.testing.assert_close(_logits(plain), adapted, atol=1e-5, rtol=1e-5)


def test_qdora_equals_dora_over_the_dequantized_weight():
    """QDoRA over an NF4 base gives DoRA over the dequantized float weight: init, forward, gradients, merge."""
    from lorakit.quant.linear4bit import Linear4bit

    torch.manual_seed(2)
    linear = nn.Linear(64, 96)
    quantized = Linear4bit.from_linear(linear, quant_type="nf4", blocksize=64, double_quant=True,
                                       compute_dtype=torch.float32)
    plain = nn.Linear(64, 96)
    with torch.no_grad():
        plain.weight.copy_(quantized.dequantize(torch.float32))
        plain.bias.copy_(quantized.bias)
    q_layer, f_layer = _layer(quantized), _layer(plain)
    for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
        assert torch.allclose(getattr(q_layer, attr)["default"].weight, getattr(f_layer, attr)["default"].weight)
    x = torch.randn(6, 64)
    q_out, f_out = q_layer(x), f_layer(x)
    torch.testing.assert_close(q_out, f_out, atol=1e-5, rtol=1e-5)
    q_out.square().sum().backward()
    f_out.square().sum().backward()
    for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
        torch.testing.assert_close(getattr(q_layer, attr)["default"].weight.grad,
                                   getattr(f_layer, attr)["default"].weight.grad, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        q_layer.merge()
        merged = q_layer.base_layer.dequantize(torch.float32)
        expected = q_layer.merged_weight(["default"], quantized.dequantize(torch.float32))
    # Requantizing the merged weight is NF4's rounding, no more: within one NF4 step of each block's absmax.
    assert (merged - expected).abs().max() < 0.2 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("quantized", [False, True])
def test_node_matches_the_reference_in_training(dtype, quantized):
    """The one-node DoRA forward/backward equals the op-by-op reference (bf16 rounding) over float and 4-bit."""
    from lorakit.kernels.dispatch import select
    from lorakit.quant.linear4bit import Linear4bit

    torch.manual_seed(3)
    linear = nn.Linear(64, 96, dtype=dtype).requires_grad_(False)
    base = Linear4bit.from_linear(linear, quant_type="nf4", blocksize=64, double_quant=True,
                                  compute_dtype=dtype) if quantized else linear
    layer = _layer(base)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 7, 64, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    args = (x, layer.base_layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight,
            layer.lora_magnitude_vector["default"].weight, layer.lora_dropout["default"], 2.0,
            layer.weight_out_in, lambda w: layer.dora_norm("default", w))
    assert select("dora_linear", *args).name == "one_node"
    out = layer(x)
    import os as _os
    _os.environ["LORAKIT_KERNELS"] = "reference"
    try:
        ref = twin(x_ref)
    finally:
        del _os.environ["LORAKIT_KERNELS"]
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=3e-2, rtol=3e-2)
    for attr in ("lora_A", "lora_B", "lora_magnitude_vector"):
        got, want = getattr(layer, attr)["default"].weight.grad, getattr(twin, attr)["default"].weight.grad
        assert (got - want).norm() <= 1e-2 * want.norm(), attr


def test_dora_refused_where_unsupported():
    """DoRA on an Embedding target is a clear configuration error, not a silent plain LoRA."""
    model = tiny_llama()
    with pytest.raises(lk.LorakitError, match="linear layers only.*Embedding"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["embed_tokens"], use_dora=True))
    with pytest.raises(lk.LorakitError, match="use_dora must be true or false"):
        lk.LoraConfig(use_dora="yes")


@pytest.mark.slow
def test_smollm2_dora_files_both_ways_with_peft(tmp_path):
    """On the real SmolLM2-135M (fp32): DoRA r=16 on all linear layers, saved here and loaded by PEFT, and back."""
    from transformers import AutoModelForCausalLM

    from lorakit.models import convert_gguf, embedded_gguf_path

    folder = convert_gguf(embedded_gguf_path())

    def build():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()

    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    config = dict(r=16, lora_alpha=32, target_modules="all-linear", use_dora=True)
    torch.manual_seed(0)
    ours = lk.add_adapter(build(), lk.LoraConfig(**config))
    torch.manual_seed(0)
    theirs = peft.get_peft_model(build(), peft.LoraConfig(**config))
    magnitudes = {k: v for k, v in ours.named_parameters() if "magnitude" in k}
    assert len(magnitudes) == 30 * 7
    for key, value in theirs.named_parameters():
        if "magnitude" in key:
            assert torch.equal(value, magnitudes[key.removeprefix("base_model.model.")]), key
    _perturb(ours, seed=11)
    lk.save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(ids).logits
        got = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")(ids).logits
    assert (expected - build()(ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    _perturb(theirs, seed=12)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(lk.load_adapter(build(), tmp_path / "theirs")(ids).logits, theirs(ids).logits,
                                   atol=1e-5, rtol=0)


def test_cli_merge_and_inspect_a_dora_adapter_and_the_engine_refuses_it(tmp_path, capsys):
    """`lorakit merge` folds DoRA into a plain folder with the adapted logits; inspect names it; serving says merge."""
    from helpers import save_tiny
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from lorakit.serve.adapters import read_adapter

    base = save_tiny(tmp_path / "model")
    model = lk.add_adapter(copy.deepcopy(base), lk.LoraConfig(r=4, target_modules=LLAMA_TARGETS, use_dora=True))
    _perturb(model)
    lk.save_adapter(model, tmp_path / "dora")
    assert main(["merge", "--model", str(tmp_path / "model"), "--adapter", str(tmp_path / "dora"),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), _logits(model), atol=1e-4, rtol=1e-4)
    assert (_logits(merged) - _logits(base)).abs().max() > 1e-2
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "dora")]) == 0
    assert "peft_type LORA (DoRA)" in capsys.readouterr().out
    with pytest.raises(lk.LorakitError, match="DoRA adapter.*merge it into the base"):
        read_adapter("d", tmp_path / "dora", {}, 16)


@pytest.mark.parametrize("fused", [True, False])
def test_training_steps_equal_peft_with_any_adamw(fused):
    """Three AdamW steps (fused ones leave tensor versions alone): losses and weights stay PEFT's, and a
    no-grad forward after the steps uses the moved A and B, not a norm kept from before."""
    config = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, use_dora=True)
    torch.manual_seed(7)
    ours = lk.add_adapter(tiny_llama(), lk.LoraConfig(**config))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**config))
    _logits(ours)  # fills the no-grad norm cache before any step
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, fused=fused)
                  for m in (ours, theirs)]
    for _ in range(3):
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers):
            loss = model(TOKENS, labels=TOKENS).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-4, rtol=0)
