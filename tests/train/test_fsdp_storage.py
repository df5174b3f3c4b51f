"""FSDP2 over a 4-bit base in this process (gloo, one rank): the packed codes are sharded as a float storage
dtype and gathered back byte for byte; a mixed-precision policy that would cast them is refused."""

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import tiny_llama
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.kernels.dequant_4bit import as_bytes
from lorakit.quant import Linear4bit, QuantConfig, quantize_model
from lorakit.train.distributed import Dist, shard

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(2))


@pytest.fixture()
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _qlora_model() -> torch.nn.Module:
    model = quantize_model(tiny_llama(), QuantConfig(compute_dtype=torch.float32))
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a non-zero update, so the adapter takes part in the outputs compared
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _codes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: as_bytes(module.packed.detach()).clone() for name, module in model.named_modules()
            if isinstance(module, Linear4bit)}


def _gathered_codes(model) -> dict[str, torch.Tensor]:
    """The codes each 4-bit layer holds while FSDP has gathered its parameters (as in a forward)."""
    groups = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in groups:
        module.unshard()
    try:
        return _codes(model)
    finally:
        for module in groups:
            module.reshard()


def test_sharded_4bit_base_keeps_its_codes_and_outputs(group):
    model = _qlora_model()
    codes, logits = _codes(model), model(TOKENS).logits.detach()
    shard(model, Dist(rank=0, world=1, kind="fsdp"))
    layer = model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(layer.packed, DTensor) and layer.packed.dtype == torch.float32  # sharded as a float
    assert not layer.packed.requires_grad
    gathered = _gathered_codes(model)
    assert gathered.keys() == codes.keys() and len(codes) == 14
    for name, value in codes.items():
        assert torch.equal(gathered[name], value), name
    torch.testing.assert_close(model(TOKENS).logits.detach(), logits, atol=1e-6, rtol=0)
    # The logical size is unchanged by holding the codes as a Parameter.
    assert lk.inject.trainable_parameters(model)[1] == lk.inject.trainable_parameters(_qlora_model())[1]


def test_a_policy_that_casts_the_codes_is_refused_and_would_corrupt_them(group):
    with pytest.raises(LorakitError, match="cast its 4-bit codes stored as torch.float32 to torch.bfloat16"):
        shard(_qlora_model(), Dist(rank=0, world=1, kind="fsdp"), param_dtype=torch.bfloat16)
    # What the check prevents: FSDP left to that policy gathers rounded bytes, and the base turns to garbage.
    model = _qlora_model()
    codes = _codes(model)
    reference = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.store_packed_as(torch.float32)
    fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    gathered = _gathered_codes(model)
    changed = [name for name, value in codes.items() if not torch.equal(gathered[name], value)]
    assert len(changed) == len(codes)
    # A consistent policy (param_dtype = the storage dtype) keeps them.
    shard(reference, Dist(rank=0, world=1, kind="fsdp"), param_dtype=torch.float32)
    kept = _gathered_codes(reference)
    assert all(torch.equal(kept[name], value) for name, value in codes.items())


def test_storage_needs_a_float_dtype_dividing_the_bytes():
    odd = Linear4bit.from_weight(torch.randn(3, 6), compute_dtype=torch.float32)  # 9 packed bytes
    with pytest.raises(LorakitError, match="9 packed bytes cannot be stored as torch.float32"):
        odd.store_packed_as(torch.float32)
    layer = Linear4bit.from_weight(torch.randn(4, 8), compute_dtype=torch.float32)
    x = torch.randn(2, 8)
    expected = layer(x)
    layer.store_packed_as(torch.bfloat16)
    assert isinstance(layer.packed, torch.nn.Parameter) and layer.packed.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    layer.to(torch.float32)  # a cast of the module leaves the stored bytes alone
    assert layer.packed.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)


def test_an_untied_head_and_embedding_shard_as_groups_of_their_own(group):
    """The chunked loss through FSDP2 with the head and embedding as their own groups: the same loss and
    adapter gradients as unsharded, and the head is sharded again once the backward is done."""
    from lorakit.fast_training import chunked_lm_loss

    model = _qlora_model()
    reference = copy.deepcopy(model)
    inputs = {"input_ids": TOKENS, "attention_mask": torch.ones_like(TOKENS), "use_cache": False}
    expected = chunked_lm_loss(reference, TOKENS, **inputs)[0]
    expected.backward()
    shard(model, Dist(rank=0, world=1, kind="fsdp"))
    assert isinstance(model.lm_head, FSDPModule) and isinstance(model.model.embed_tokens, FSDPModule)
    loss = model.sharded_chunked_loss(TOKENS, **inputs)[0]
    loss.backward()
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    grads = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad.full_tensor(), grads[name], atol=1e-6, rtol=0)
    assert isinstance(model.lm_head.weight, DTensor)  # resharded after its backward
