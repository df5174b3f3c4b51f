"""AdaLoRA: the SVD-form layer, the rank budget and the orthogonality term against PEFT and direct computations,
and PEFT AdaLoRA folders (pruned by rank_pattern) both ways."""

import json
import os

import peft
import pytest
import torch
from helpers import tiny_llama
from peft.tuners.adalora.layer import RankAllocator
from safetensors import safe_open
from torch import nn

import lorakit as lk
from lorakit.adalora import AdaLoraLinear
from lorakit.adalora_budget import budget_schedule
from lorakit.inject import adapter_configs

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
TARGETS = ["q_proj", "v_proj", "up_proj"]
# task_type makes PeftModelForCausalLM run AdaLoraModel.forward, which adds the orthogonality term to the loss.
KWARGS = dict(task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=30, tinit=5, tfinal=5, deltaT=2,
              target_modules=TARGETS)


def _perturb(model, seed=3):
    """Training-like values (at init E is zero and the adapter is a no-op)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(f"lora_{f}" in name for f in "AEB"):
                param.copy_(torch.randn_like(param) * 0.3)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _shapes(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as handle:
        return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}


def _train(model, step_fn, steps=30, lr=5e-3):
    data = torch.randint(0, 128, (steps, 4, 12), generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    budgets = []
    for step in range(steps):
        loss = step_fn(model, data[step])
        loss.backward()
        optimizer.step()
        if isinstance(model, peft.PeftModel):
            model.base_model.update_and_allocate(step)
        else:
            budgets.append(lk.update_and_allocate(model, step))
        optimizer.zero_grad()
    return model.eval(), budgets


def _ours_step(model, ids):
    return model(input_ids=ids, labels=ids).loss + lk.orthogonal_regularization(model)


def _peft_step(model, ids):
    return model(input_ids=ids, labels=ids).loss  # PEFT adds the orthogonality term inside forward


def test_init_equals_peft_bitwise():
    torch.manual_seed(5)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**KWARGS))
    torch.manual_seed(5)
    ours = lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(**KWARGS))
    peft_params = {k.replace("base_model.model.", ""): v for k, v in theirs.named_parameters()}
    adapter = {k: v for k, v in ours.named_parameters() if "lora_" in k or "ranknum" in k}
    assert len(adapter) == 2 * len(TARGETS) * 4
    for key, value in adapter.items():
        assert torch.equal(value, peft_params[key]), key
        assert value.requires_grad == peft_params[key].requires_grad, key


def test_lorakit_save_loads_in_peft_and_back(tmp_path):
    ours = lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(**KWARGS))
    _perturb(ours)
    lk.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["rank_pattern"] is None and config["init_r"] == 6
    expected = _logits(ours)
    assert (expected - _logits(tiny_llama())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)), expected,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(lk.load_adapter(tiny_llama(), tmp_path)), expected, atol=0, rtol=0)


def test_gpt2_conv1d_interop_both_ways(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    def make():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)).eval()

    kwargs = dict(init_r=4, target_r=2, total_step=10, target_modules=["c_attn", "c_fc"])
    ours = lk.add_adapter(make(), lk.AdaLoraConfig(**kwargs))
    _perturb(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "ours")
    ids = TOKENS % 100
    with torch.no_grad():
        expected = ours(ids).logits
        assert (expected - make()(ids).logits).abs().max() > 1e-2
        torch.testing.assert_close(theirs(ids).logits, expected, atol=1e-5, rtol=0)
    _perturb(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        loaded = lk.load_adapter(make(), tmp_path / "theirs")
        torch.testing.assert_close(loaded(ids).logits, theirs(ids).logits, atol=1e-5, rtol=0)


def test_peft_save_loads_in_lorakit(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**KWARGS))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapter(tiny_llama(), tmp_path)
    assert isinstance(adapter_configs(ours)["default"], lk.AdaLoraConfig)
    assert lk.trainable_parameters(ours)[0] == 0
    expected = _logits(theirs)
    assert (expected - _logits(tiny_llama())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)


def test_budget_schedule_equals_peft():
    config = lk.AdaLoraConfig(**KWARGS)
    theirs = RankAllocator(peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**KWARGS)),
                           peft.AdaLoraConfig(**KWARGS), "default")
    assert (theirs.init_bgt, theirs.target_bgt) == (6 * 6, 2 * 6)
    for step in range(32):
        assert budget_schedule(config, step, 36, 12) == theirs.budget_schedule(step), step


def test_training_prunes_like_peft_and_reaches_target_r(tmp_path):
    """Same init, data and optimizer: the same losses, the same kept ranks, and target_r per layer on average."""
    torch.manual_seed(5)
    theirs, _ = _train(peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**KWARGS)), _peft_step)
    torch.manual_seed(5)
    ours, budgets = _train(lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(**KWARGS)), _ours_step)
    assert budgets[0] == 36 and budgets[-1] == 12
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))  # the budget only shrinks
    rank_pattern = adapter_configs(ours)["default"].rank_pattern
    peft_pattern = {k.replace(".default", ""): v for k, v in theirs.peft_config["default"].rank_pattern.items()}
    assert rank_pattern == peft_pattern
    kept = [sum(flags) for flags in rank_pattern.values()]
    assert len(kept) == 6 and sum(kept) / len(kept) == 2  # target_r on average, by total_step - tfinal
    for path, layer in ours.named_modules():
        if isinstance(layer, AdaLoraLinear):  # pruned ranks held at zero through the final phase
            keep = torch.tensor(rank_pattern[f"{path}.lora_E"])
            assert torch.all(layer.lora_E["default"][~keep] == 0)
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=1e-5, rtol=0)

    lk.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert _shapes(tmp_path / "ours") == _shapes(tmp_path / "theirs")
    assert _shapes(tmp_path / "ours")["base_model.model.model.layers.0.self_attn.q_proj.lora_A"][0] == \
        sum(rank_pattern["model.layers.0.self_attn.q_proj.lora_E"])
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == rank_pattern
    expected = _logits(ours)
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")), expected,
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(lk.load_adapter(tiny_llama(), tmp_path / "theirs")), expected,
                               atol=1e-5, rtol=0)
    back = lk.load_adapter(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(_logits(back), expected, atol=1e-5, rtol=0)
    assert back.model.layers[0].self_attn.q_proj.ranknum["default"].item() == 6  # PEFT keeps the initial rank


def test_orthogonal_regularization_against_direct_computation():
    model = lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(**{**KWARGS, "orth_reg_weight": 0.3}))
    _perturb(model)
    norms = []
    for module in model.modules():
        if isinstance(module, AdaLoraLinear):
            A, B = module.lora_A["default"].detach(), module.lora_B["default"].detach()
            norms.append(((A @ A.T - torch.eye(6)) ** 2).sum().sqrt())
            norms.append(((B.T @ B - torch.eye(6)) ** 2).sum().sqrt())
    value = lk.orthogonal_regularization(model)
    torch.testing.assert_close(value, 0.3 * torch.stack(norms).mean(), atol=1e-5, rtol=1e-6)
    value.backward()  # differentiable: it trains A and B towards orthogonality
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].grad is not None


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(6, 10)
        self.down = nn.Linear(10, 4, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_forward_merge_and_unload_match_direct_computation():
    config = lk.AdaLoraConfig(init_r=3, target_r=1, total_step=10, lora_alpha=4, target_modules=["up", "down"])
    model = lk.add_adapter(TwoLinears(), config)
    _perturb(model)
    x = torch.randn(5, 6)
    layer = model.up
    A, E, B = (getattr(layer, f)["default"].detach() for f in ("lora_A", "lora_E", "lora_B"))
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias + (x @ (A * E).T @ B.T) * 4 / (3 + 1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)
        before = model(x)
        lk.merge_adapters(model)
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
        lk.unmerge_adapters(model)
        plain = lk.unload(model, merge=True)
        assert type(plain.up) is nn.Linear
        torch.testing.assert_close(plain(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "total_step is required"),
    (dict(total_step=0), "total_step must be an integer >= 1"),
    (dict(total_step=10, tinit=6, tfinal=4), "leaves no budgeting phase"),
    (dict(total_step=10, target_r=16), "target_r=16 exceeds init_r=12"),
    (dict(total_step=10, beta1=1.0), r"beta1 must be in \(0, 1\)"),
    (dict(total_step=10, orth_reg_weight=-1), "orth_reg_weight must be a number >= 0"),
    (dict(total_step=10, deltaT=0), "deltaT must be an integer >= 1"),
    (dict(total_step=10, bias="vera_only"), "bias must be one of"),
    (dict(total_step=10, rank_pattern={"a.lora_E": [True]}), "list of init_r=12"),
])
def test_bad_configs_refused_with_the_reason(kwargs, message):
    with pytest.raises(lk.LorakitError, match=message):
        lk.AdaLoraConfig(**kwargs)


def test_unknown_option_and_misuse_refused():
    with pytest.raises(lk.LorakitError, match="did you mean 'init_r'"):
        lk.AdaLoraConfig.from_dict({"int_r": 4, "total_step": 10})
    with pytest.raises(lk.LorakitError, match="adapts linear layers only"):
        lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(total_step=10, target_modules=["embed_tokens"]))
    model = lk.add_adapter(tiny_llama(), lk.AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    with pytest.raises(lk.LorakitError, match="no gradient"):
        lk.update_and_allocate(model, 0)
    with pytest.raises(lk.LorakitError, match="one adapter kind per model"):
        lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"]), name="lora")
