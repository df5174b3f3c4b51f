"""PEFT adapter folders both ways against the real peft, and clear errors for bad files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from helpers import tiny_gpt2, tiny_llama
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit as lk
from lorakit.lora import LoraLayer

TOKENS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def _randomise_adapter(model, seed=3):
    """Give lora_B (and embedding A) non-zero values, or every comparison is the base model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.normal_(std=0.2)


def _keys(folder):
    with safe_open(os.path.join(folder, "adapter_model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


class EmbedConv(nn.Module):
    """A small non-transformers model with an Embedding, a Conv2d and a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(32, 12)
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, ids, image):
        pooled = self.conv(image).mean(dim=(2, 3))
        return self.head(self.embed(ids).mean(dim=1) + pooled)


EC_IDS = torch.tensor([[1, 5, 31], [0, 2, 9]])
EC_IMAGE = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))

CASES = [
    ("named", tiny_llama, dict(target_modules=["q_proj", "v_proj"]), "default"),
    ("regex", tiny_llama, dict(target_modules=r".*\.mlp\.(up|down)_proj"), "default"),
    ("all_linear", tiny_llama, dict(target_modules="all-linear", lora_alpha=16), "default"),
    ("rslora", tiny_llama, dict(target_modules=["k_proj", "o_proj"], use_rslora=True, lora_alpha=4), "default"),
    ("patterns", tiny_llama, dict(target_modules=["q_proj", "v_proj", "gate_proj"], rank_pattern={"v_proj": 2},
                                  alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32}), "default"),
    ("other_name", tiny_llama, dict(target_modules=["q_proj", "up_proj"]), "other"),
    ("gpt2", tiny_gpt2, dict(target_modules=["c_attn", "c_proj"]), "default"),
]


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("case, make, kwargs, name", CASES, ids=[c[0] for c in CASES])
def test_lorakit_save_loads_in_peft(tmp_path, case, make, kwargs, name):
    ours = lk.add_adapter(make(), lk.LoraConfig(r=4, **kwargs), name=name)
    _randomise_adapter(ours)
    lk.save_adapter(ours, tmp_path, name=name)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["fan_in_fan_out"] is (make is tiny_gpt2)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path, adapter_name=name)
    expected = _logits(ours)
    assert (expected - _logits(make())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(theirs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case, make, kwargs, name", CASES, ids=[c[0] for c in CASES])
def test_peft_save_loads_in_lorakit(tmp_path, case, make, kwargs, name):
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, **kwargs), adapter_name=name)
    _randomise_adapter(theirs)
    theirs.save_pretrained(tmp_path)
    folder = tmp_path if name == "default" else tmp_path / name
    ours = lk.load_adapter(make(), folder, name=name)
    assert lk.active_adapters(ours) == [name]
    expected = _logits(theirs)
    assert (expected - _logits(make())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(ours), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(target_modules=["q_proj", "v_proj"]), dict(target_modules="all-linear"),
                                    dict(target_modules=["q_proj"], modules_to_save=["lm_head"])])
def test_saved_keys_equal_peft_keys(tmp_path, kwargs):
    ours = lk.add_adapter(tiny_llama(), lk.LoraConfig(**kwargs))
    lk.save_adapter(ours, tmp_path / "ours")
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs)).save_pretrained(tmp_path / "theirs")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])


def test_embedding_and_conv_interop_both_ways(tmp_path):
    kwargs = dict(r=3, lora_alpha=6, target_modules=["embed", "conv", "head"])
    ours = lk.add_adapter(EmbedConv(), lk.LoraConfig(**kwargs))
    _randomise_adapter(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(EmbedConv(), tmp_path / "ours")
    with torch.no_grad():
        expected = ours(EC_IDS, EC_IMAGE)
        assert (expected - EmbedConv()(EC_IDS, EC_IMAGE)).abs().max() > 1e-2
        torch.testing.assert_close(theirs(EC_IDS, EC_IMAGE), expected, atol=1e-5, rtol=0)

    theirs = peft.get_peft_model(EmbedConv(), peft.LoraConfig(**kwargs))
    _randomise_adapter(theirs, seed=4)
    theirs.save_pretrained(tmp_path / "theirs")
    assert _keys(tmp_path / "theirs") == _keys(tmp_path / "ours")
    loaded = lk.load_adapter(EmbedConv(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(EC_IDS, EC_IMAGE), theirs(EC_IDS, EC_IMAGE), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(target_modules=["c_attn"], bias="all"),
                                    dict(target_modules=["c_attn", "c_fc"], bias="lora_only"),
                                    dict(target_modules=["c_attn"], modules_to_save=["ln_f"])])
def test_biases_and_saved_modules_interop_both_ways(tmp_path, kwargs):
    def randomise(model):
        _randomise_adapter(model)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad and ("bias" in name or "modules_to_save" in name):
                    param.normal_()

    ours = lk.add_adapter(tiny_gpt2(), lk.LoraConfig(**kwargs))
    randomise(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    expected = _logits(ours)
    assert (expected - _logits(tiny_gpt2())).abs().max() > 1e-2
    torch.testing.assert_close(_logits(peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "ours")), expected,
                               atol=1e-5, rtol=0)
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(**kwargs))
    randomise(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    assert _keys(tmp_path / "ours") == _keys(tmp_path / "theirs")
    loaded = lk.load_adapter(tiny_gpt2(), tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded), _logits(theirs), atol=1e-5, rtol=0)


def test_embedding_and_conv_seeded_init_equal_peft():
    kwargs = dict(r=3, lora_alpha=6, target_modules=["embed", "conv", "head"])
    model, their_base = EmbedConv(), EmbedConv()  # EmbedConv() seeds itself: build both first
    torch.manual_seed(5)
    theirs = peft.get_peft_model(their_base, peft.LoraConfig(**kwargs))
    torch.manual_seed(5)
    lk.add_adapter(model, lk.LoraConfig(**kwargs))
    their_sd = {k.removeprefix("base_model.model.").replace(".default", ""): v
                for k, v in theirs.state_dict().items() if "lora_" in k}
    our_sd = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert our_sd.keys() == their_sd.keys() and len(our_sd) == 6
    assert all(torch.equal(our_sd[k], their_sd[k]) for k in our_sd)


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    frozen = lk.load_adapter(tiny_llama(), tmp_path)
    assert lk.trainable_parameters(frozen)[0] == 0
    trainable = lk.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert lk.trainable_parameters(trainable)[0] == lk.trainable_parameters(model)[0] > 0


# ---- bad files: a clear LorakitError naming the file, and the model left as it was ----

@pytest.fixture(scope="module")
def good_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    _randomise_adapter(model)
    lk.save_adapter(model, folder)
    return folder


def _copy(folder, to):
    to.mkdir()
    for name in os.listdir(folder):
        (to / name).write_bytes((folder / name).read_bytes())
    return to


def _assert_load_fails_unchanged(folder, match):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(lk.LorakitError, match=match):
        lk.load_adapter(model, folder)
    assert [type(m) for m in model.modules()] == types
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "lorakit_configs" not in model.__dict__ or model.__dict__["lorakit_configs"] == {}


def test_missing_folder(tmp_path):
    _assert_load_fails_unchanged(tmp_path / "nope", "nope: not a folder")


def test_missing_weights(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    (folder / "adapter_model.safetensors").unlink()
    _assert_load_fails_unchanged(folder, "adapter_model.safetensors: no such file")


def test_pickled_bin_alone_refused(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    _assert_load_fails_unchanged(folder, "adapter_model.bin is not loaded")


def test_corrupt_weights(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    _assert_load_fails_unchanged(folder, "adapter_model.safetensors: corrupt or truncated")


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_weights(tmp_path, good_folder, cut):
    folder = _copy(good_folder, tmp_path / "a")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[:-cut])
    _assert_load_fails_unchanged(folder, "adapter_model.safetensors: corrupt or truncated")


def test_invalid_json(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    _assert_load_fails_unchanged(folder, "adapter_config.json: not valid JSON")


def test_missing_config(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    _assert_load_fails_unchanged(folder, "adapter_config.json: no such file")


@pytest.mark.parametrize("config", [peft.IA3Config(target_modules=["q_proj", "down_proj"],
                                                   feedforward_modules=["down_proj"]),
                                    peft.LoHaConfig(target_modules=["q_proj"])])
def test_non_lora_peft_folder(tmp_path, config):
    peft.get_peft_model(tiny_llama(), config).save_pretrained(tmp_path)
    _assert_load_fails_unchanged(tmp_path, f"adapter_config.json: peft_type is '{config.peft_type.value}'")


def test_shapes_for_another_model(tmp_path):
    other = lk.add_adapter(tiny_llama(hidden=32), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lk.save_adapter(other, tmp_path)
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _assert_load_fails_unchanged(tmp_path, rf"adapter_model.safetensors: key '{first}' has shape \(4, 32\)")


def test_unexpected_key(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    _assert_load_fails_unchanged(folder, "unexpected key 'base_model.model.model.layers.0.mlp.up_proj")


def test_targets_missing_in_model(tmp_path, good_folder):
    folder = _copy(good_folder, tmp_path / "a")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    _assert_load_fails_unchanged(folder, "adapter_config.json: target_modules=\\['qkv_proj'\\] matches no module")


def test_save_overwrites_atomically(tmp_path):
    model = lk.add_adapter(tiny_llama(), lk.LoraConfig(target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path)
    _randomise_adapter(model)
    lk.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = lk.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)
    assert not any(isinstance(m, LoraLayer) and m.merged_adapters for m in loaded.modules())


def test_adapter_files_are_byte_stable_and_read_back_with_their_metadata(tmp_path):
    # safetensors writes its metadata map in a per-process order; lorakit sorts the header (three processes).
    script = ("import sys, torch; sys.path.insert(0, 'tests'); from helpers import tiny_llama; "
              "from lorakit.config import LoraConfig; from lorakit.inject import add_adapter; "
              "from lorakit.peft_format import save_adapter; m = tiny_llama(); torch.manual_seed(0); "
              "add_adapter(m, LoraConfig(r=4, target_modules='all-linear', init_lora_weights=False)); "
              "m.name_or_path = 'tiny'; save_adapter(m, sys.argv[1])")
    root = Path(__file__).resolve().parents[1]
    files = []
    for index in range(3):
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(index))], cwd=root, check=True)
        files.append((tmp_path / str(index) / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]
    with safe_open(tmp_path / "0" / "adapter_model.safetensors", framework="pt") as handle:
        metadata = handle.metadata()
        assert metadata["format"] == "pt" and metadata["lorakit.base_model"] == "tiny"
        assert len(metadata["lorakit.base_fingerprint"]) == 16
        assert len(list(handle.keys())) == 2 * 14
