"""Model surgery: target selection (same as PEFT), freezing, switching, merge, delete, unload, report."""

import contextlib
import io

import peft
import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from torch import nn

import lorakit as lk
from lorakit.lora import LoraLayer, LoraLinear, ModulesToSave

PREFIX = "base_model.model."


def _peft_targets(peft_model) -> dict[str, int]:
    """{module name: rank} of every module PEFT wrapped."""
    return {n.removeprefix(PREFIX): m.r["default"] for n, m in peft_model.named_modules()
            if isinstance(m, PeftLoraLayer)}


def _our_targets(model) -> dict[str, int]:
    return {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _randomise_b(model, seed=7):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(std=0.1)


def _sequential():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))


CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=r".*\.(k_proj|down_proj)"),
    dict(target_modules="all-linear"),
    dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
    dict(target_modules=["q_proj", "v_proj", "o_proj"], rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
         alpha_pattern={"o_proj": 32}),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_targets_and_ranks_equal_peft(kwargs):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, **kwargs))
    ours = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, **kwargs))
    assert _our_targets(ours) == _peft_targets(theirs)
    for name, module in theirs.named_modules():
        if isinstance(module, PeftLoraLayer):
            assert ours.get_submodule(name.removeprefix(PREFIX)).scaling["default"] == module.scaling["default"]


@pytest.mark.parametrize("make", [tiny_gpt2, _sequential])
def test_all_linear_equals_peft_on_gpt2_and_plain_modules(make):
    theirs = peft.get_peft_model(make(), peft.LoraConfig(target_modules="all-linear"))
    chosen = lk.resolve_targets(make(), lk.LoraConfig(target_modules="all-linear"))
    assert set(chosen) == set(_peft_targets(theirs))
    assert "lm_head" not in chosen


def test_all_linear_excludes_only_the_head():
    chosen = lk.resolve_targets(tiny_llama(), lk.LoraConfig(target_modules="all-linear"))
    assert len(chosen) == 2 * 7
    assert "lm_head" not in chosen


def test_attention_and_mlp_shorthands():
    model = tiny_llama()
    attention = lk.resolve_targets(model, lk.LoraConfig(target_modules="all-attention"))
    mlp = lk.resolve_targets(model, lk.LoraConfig(target_modules="all-mlp"))
    assert sorted({n.rsplit(".", 1)[1] for n in attention}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted({n.rsplit(".", 1)[1] for n in mlp}) == ["down_proj", "gate_proj", "up_proj"]
    assert len(attention) == 8 and len(mlp) == 6


def test_no_match_lists_linear_names_folded():
    with pytest.raises(lk.LorakitError) as info:
        lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["qkv"]))
    message = str(info.value)
    assert "['qkv'] matches no module" in message
    assert "model.layers.N.self_attn.q_proj (x2)" in message
    assert "model.layers.N.mlp.down_proj (x2)" in message
    assert "lm_head" in message and "layers.0" not in message


def test_seeded_init_bit_identical_to_peft():
    for make, targets in ((tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])):
        theirs_model, ours = make(), make()
        torch.manual_seed(11)
        theirs = peft.get_peft_model(theirs_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        torch.manual_seed(11)
        lk.add_adapter(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        their_sd = {k.removeprefix(PREFIX).replace(".default", ""): v for k, v in theirs.state_dict().items()
                    if "lora_" in k}
        our_sd = {k.replace(".default", ""): v for k, v in ours.state_dict().items() if "lora_" in k}
        assert their_sd.keys() == our_sd.keys() and len(our_sd) > 0
        for key in our_sd:
            assert torch.equal(our_sd[key], their_sd[key]), key


def test_freezes_everything_but_adapters():
    model = tiny_llama().requires_grad_(True)
    assert lk.trainable_base_parameters(model) != []
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 2 * 2
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert lk.trainable_base_parameters(model) == []
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    assert lk.trainable_base_parameters(model) == ["model.layers.0.mlp.up_proj.weight"]


def test_modules_to_save_copies_and_trains_the_module():
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert isinstance(model.lm_head, ModulesToSave)
    assert model.lm_head.modules_to_save["default"].weight.requires_grad
    assert not model.lm_head.original_module.weight.requires_grad
    tokens = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        before = model(tokens).logits
        model.lm_head.modules_to_save["default"].weight.mul_(2)
        doubled = model(tokens).logits
        with lk.disable_adapters(model):
            assert torch.allclose(model(tokens).logits, tiny_llama()(tokens).logits, atol=1e-6)
    torch.testing.assert_close(doubled, 2 * before, atol=1e-5, rtol=1e-5)


def test_set_adapter_one_list_and_unknown(tokens):
    model = tiny_llama()
    base = model(tokens).logits.detach()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(target_modules=["v_proj", "o_proj"]), name="b")
    _randomise_b(model)
    assert lk.active_adapters(model) == ["a"]
    with torch.no_grad():
        out_a = model(tokens).logits
        lk.set_adapter(model, "b")
        assert lk.active_adapters(model) == ["b"]
        out_b = model(tokens).logits
        lk.set_adapter(model, ["a", "b"])
        both = model(tokens).logits
    assert lk.active_adapters(model) == ["a", "b"]
    assert not torch.allclose(out_a, out_b) and not torch.allclose(both, out_a) and not torch.allclose(out_a, base)
    v_proj = model.model.layers[0].self_attn.v_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(v_proj(x) - v_proj.base_layer(x),
                                   v_proj.scaling["a"] * v_proj.lora_B["a"](v_proj.lora_A["a"](x))
                                   + v_proj.scaling["b"] * v_proj.lora_B["b"](v_proj.lora_A["b"](x)),
                                   atol=1e-5, rtol=0)
    with pytest.raises(lk.LorakitError, match="no adapter named 'c'; this model has \\['a', 'b'\\]"):
        lk.set_adapter(model, ["a", "c"])


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_base_and_restores(tokens, merged):
    model = tiny_llama()
    base = model(tokens).logits.detach()
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear"))
    _randomise_b(model)
    with torch.no_grad():
        adapted = model(tokens).logits
        if merged:
            lk.merge_adapters(model)
        with lk.disable_adapters(model):
            torch.testing.assert_close(model(tokens).logits, base, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(tokens).logits, adapted, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-2
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.merged_adapters == (["default"] if merged else []) and not q_proj.disabled


def test_merge_then_unmerge_model(tokens):
    model = tiny_llama()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear"))
    _randomise_b(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        adapted = model(tokens).logits
        lk.merge_adapters(model)
        torch.testing.assert_close(model(tokens).logits, adapted, atol=1e-5, rtol=0)
        lk.unmerge_adapters(model)
    for key, value in model.state_dict().items():
        if key in weights:
            torch.testing.assert_close(value, weights[key], atol=1e-6, rtol=0)


def test_delete_adapter_unwraps_layers(tokens):
    model = tiny_llama()
    base = model(tokens).logits.detach()
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), name="a")
    lk.add_adapter(model, lk.LoraConfig(target_modules=["q_proj", "k_proj"]), name="b")
    attention = model.model.layers[0].self_attn
    lk.delete_adapter(model, "b")
    assert isinstance(attention.q_proj, LoraLinear) and attention.q_proj.adapter_names == ["a"]
    assert type(attention.k_proj) is nn.Linear
    lk.delete_adapter(model, "a")
    assert type(attention.q_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())
    torch.testing.assert_close(model(tokens).logits.detach(), base, atol=0, rtol=0)
    with pytest.raises(lk.LorakitError, match="no adapter named 'a'"):
        lk.delete_adapter(model, "a")


@pytest.mark.parametrize("merge", [True, False])
def test_unload(tokens, merge):
    model = tiny_gpt2()
    base = model(tokens).logits.detach()
    lk.add_adapter(model, lk.LoraConfig(target_modules="all-linear"))
    _randomise_b(model)
    with torch.no_grad():
        adapted = model(tokens).logits
    plain = lk.unload(model, merge=merge)
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in plain.modules())
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert not any("lora_" in k or "base_layer" in k for k in plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, adapted if merge else base, atol=1e-5, rtol=0)
    assert (adapted - base).abs().max() > 1e-2


REPORT_CONFIGS = [
    (tiny_llama, dict(r=4, target_modules=["q_proj", "v_proj"])),
    (tiny_llama, dict(r=8, target_modules="all-linear", rank_pattern={"down_proj": 2})),
    (tiny_gpt2, dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"])),
    (lambda: tiny_llama(tie=True), dict(r=2, target_modules=["o_proj"])),
]


@pytest.mark.parametrize("make, kwargs", REPORT_CONFIGS)
def test_report_line_equals_peft(make, kwargs):
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        peft.get_peft_model(make(), peft.LoraConfig(**kwargs)).print_trainable_parameters()
        lk.print_trainable_parameters(lk.add_adapter(make(), lk.LoraConfig(**kwargs)))
    theirs, ours = buffer.getvalue().strip().splitlines()
    assert ours == theirs


def test_one_step_changes_only_adapters():
    model = tiny_llama().train()
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    tokens = torch.randint(0, 128, (2, 12))
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    adapter_keys = {k for k in before if ".lora_A." in k or ".lora_B." in k}
    assert changed == adapter_keys and len(adapter_keys) == 2 * 7 * 2
    assert lk.trainable_parameters(model)[0] == sum(before[k].numel() for k in adapter_keys)
