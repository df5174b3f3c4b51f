"""LoraConfig: PEFT's names and defaults, validation on construction, PEFT's pattern rule."""

import peft
import pytest

from lorakit import LoraConfig, LorakitError
from lorakit.config import config_from_peft_dict, peft_config_dict


def test_shared_defaults_equal_peft():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    shared = [name for name in ours.to_dict() if hasattr(theirs, name)]
    assert len(shared) >= 15
    for name in shared:
        assert getattr(ours, name) == getattr(theirs, name), name


def test_field_names_are_peft_names():
    names = set(LoraConfig().to_dict())
    peft_names = set(peft.LoraConfig().to_dict())
    assert names <= peft_names, names - peft_names


@pytest.mark.parametrize("kwargs, allowed", [
    ({"r": 0}, ">= 1"),
    ({"r": -3}, ">= 1"),
    ({"r": 2.5}, "integer"),
    ({"lora_alpha": 0}, "> 0"),
    ({"lora_alpha": -1.0}, "> 0"),
    ({"lora_dropout": 1.0}, "[0, 1)"),
    ({"lora_dropout": -0.1}, "[0, 1)"),
    ({"lora_dropout": "lots"}, "[0, 1)"),
    ({"init_lora_weights": "kaiming"}, "gaussian"),
    ({"init_lora_weights": "pissa_niter_x"}, "pissa_niter_<K>"),
    ({"bias": "some"}, "lora_only"),
    ({"rank_pattern": {"q_proj": 0}}, ">= 1"),
    ({"alpha_pattern": {"q_proj": -2}}, "> 0"),
    ({"target_modules": "q_proj("}, "regex"),
    ({"target_modules": ["q_proj", 3]}, "list of module names"),
])
def test_bad_values_raise_with_what_is_allowed(kwargs, allowed):
    with pytest.raises(LorakitError) as info:
        LoraConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert allowed in str(info.value)
    assert next(iter(kwargs)) in str(info.value)


def test_valid_inits_accepted():
    for init in (True, False, "gaussian", "pissa", "pissa_niter_4", "olora"):
        assert LoraConfig(init_lora_weights=init).init_lora_weights == init


def test_unknown_option_suggests_closest_key():
    with pytest.raises(LorakitError, match="unknown option 'lora_alpah'; did you mean 'lora_alpha'"):
        LoraConfig.from_dict({"r": 4, "lora_alpah": 16}, strict=True)


def test_unknown_option_dropped_when_not_strict():
    config = LoraConfig.from_dict({"r": 4, "megatron_core": "x"}, strict=False)
    assert config.r == 4 and not hasattr(config, "megatron_core")


def test_normalisation_of_sets_and_ints():
    config = LoraConfig(target_modules={"v_proj", "q_proj"}, layers_to_transform=1)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.layers_to_transform == [1]


def test_pattern_rule_matches_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, "proj": 3}
    config = LoraConfig(r=8, rank_pattern=patterns, alpha_pattern={"k_proj": 32})
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
             "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "model.layers.0.self_attn.k_proj"]
    for name in names:
        key = get_pattern_key(list(patterns), name)
        assert config.rank_for(name) == patterns.get(key, 8), name
    assert [config.rank_for(n) for n in names] == [2, 6, 8, 8, 8]
    assert config.alpha_for("model.layers.0.self_attn.k_proj") == 32.0
    assert config.alpha_for("model.layers.0.self_attn.xk_proj") == 8.0


def test_peft_dict_roundtrip():
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"], use_rslora=True)
    data = peft_config_dict(config, ["q_proj"])
    assert data["peft_type"] == "LORA"
    again = config_from_peft_dict(data, "x.json")
    assert again == config


def test_non_lora_peft_type_refused():
    with pytest.raises(LorakitError, match="peft_type is 'IA3'.*'LORA'"):
        config_from_peft_dict({"peft_type": "IA3", "target_modules": ["q_proj"]}, "a.json")


def test_unsupported_peft_option_refused():
    with pytest.raises(LorakitError, match="lora_bias=True is not supported"):
        config_from_peft_dict({"peft_type": "LORA", "lora_bias": True}, "a.json")
