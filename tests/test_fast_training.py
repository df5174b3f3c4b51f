"""enable_fast_training on a plain transformers model: what it switches, the same training, and an exact undo."""

import pytest
import torch
from helpers import tiny_llama

import lorakit as lk
from lorakit.kernels.attention import NAME

LAYERS = 2


def _lora_llama(dtype=torch.float32):
    model = tiny_llama(layers=LAYERS).to(dtype)
    model.set_attn_implementation("sdpa")
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def _forwards(model):
    return {name: module.__dict__.get("forward") for name, module in model.named_modules()}


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


def test_enable_names_what_it_switched():
    model = _lora_llama()
    done = lk.enable_fast_training(model, allocator_setting=False)
    assert done.summary() == {"attention": f"sdpa -> {NAME}", "rms_norm": 2 * LAYERS + 1, "swiglu": LAYERS,
                              "loss": True, "allocator": False}
    assert model.config._attn_implementation == NAME
    assert lk.enable_fast_training(model) is done  # enabling twice changes nothing more


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_training_trains_the_same_function(dtype):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    model = _lora_llama(dtype)
    ref, ref_grads = _loss_and_grads(model, ids)
    lk.enable_fast_training(model, allocator_setting=False)
    out, grads = _loss_and_grads(model, ids)
    assert out.logits is None and ref.logits is not None  # the fused loss never builds the logits
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(out.loss.item() - ref.loss.item()) <= tol * ref.loss.item()
    assert grads.keys() == ref_grads.keys() and len(grads) == 14 * 2
    for name, grad in grads.items():
        err = (grad.double() - ref_grads[name].double()).norm() / ref_grads[name].double().norm()
        assert err < (1e-4 if dtype == torch.float32 else 5e-2), name


def test_num_items_in_batch_sums_and_divides_as_transformers_does():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    model = _lora_llama()
    ref = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(50)).loss
    lk.enable_fast_training(model, allocator_setting=False)
    fast = model(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(50)).loss
    assert ref.item() == pytest.approx(fast.item(), rel=1e-5)
    assert fast.item() == pytest.approx(model(input_ids=ids, labels=ids).loss.item() * 30 / 50, rel=1e-5)


def test_disable_restores_the_model_exactly():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    model = _lora_llama(torch.bfloat16)
    wrapped = model.forward  # a forward someone else already replaced (accelerate does so) must come back as is
    model.forward = lambda *args, **kwargs: wrapped(*args, **kwargs)
    user_forward = model.forward
    before_forwards = _forwards(model)
    before, before_grads = _loss_and_grads(model, ids)
    with torch.no_grad():
        logits_before = model(input_ids=ids).logits
    lk.enable_fast_training(model, allocator_setting=False)
    assert _forwards(model) != before_forwards
    undone = lk.disable_fast_training(model)
    assert undone.swiglu == LAYERS and undone.loss
    assert _forwards(model) == before_forwards and model.forward is user_forward
    assert model.config._attn_implementation == "sdpa"
    after, after_grads = _loss_and_grads(model, ids)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits_before)  # bit for bit
    assert torch.equal(after.loss, before.loss) and torch.equal(after.logits, before.logits)
    assert all(torch.equal(after_grads[name], grad) for name, grad in before_grads.items())
    assert lk.disable_fast_training(model).summary()["swiglu"] == 0  # nothing left to undo


def test_a_model_without_llama_parts_gets_what_applies():
    from helpers import tiny_gpt2

    model = tiny_gpt2()  # GPT-2: eager attention by default here, LayerNorm, no gated MLP, a linear head
    done = lk.enable_fast_training(model, allocator_setting=False)
    assert (done.rms_norm, done.swiglu) == (0, 0)
    lk.disable_fast_training(model)
    assert all("forward" not in module.__dict__ for module in model.modules())
