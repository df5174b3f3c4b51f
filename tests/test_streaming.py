"""Streaming load: the same model as transformers' loader (plus quantize_model), one tensor at a time."""

import json

import pytest
import torch
from helpers import logits, save_tiny, tiny_llama, tiny_tokenizer
from safetensors.torch import load_file, save_file

from lorakit import streaming
from lorakit.errors import LorakitError
from lorakit.models import load_model
from lorakit.quant import Linear4bit, QuantConfig, quantize_model
from lorakit.streaming import SafetensorsFile


def test_a_conversion_in_small_chunks_equals_one_cast(tmp_path, monkeypatch):
    torch.manual_seed(0)
    tensors = {"a": torch.randn(1000, 37), "b": torch.randn(5), "ids": torch.arange(11)}
    save_file(tensors, tmp_path / "t.safetensors")
    monkeypatch.setattr(streaming, "CHUNK_BYTES", 4 * 333)  # 333 values a read: many reads, a short last one
    header = SafetensorsFile(tmp_path / "t.safetensors")
    with (tmp_path / "t.safetensors").open("rb") as handle:
        for key, tensor in tensors.items():
            got = header.read(handle, key, torch.bfloat16)
            want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor  # integers never convert
            assert got.dtype == want.dtype and torch.equal(got, want), key
            assert torch.equal(header.read(handle, key), tensor)


@pytest.mark.parametrize("quantize", [None, "nf4", "fp4"])
def test_streamed_model_equals_load_then_quantize(tmp_path, quantize):
    original = save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path), quantize=quantize)
    if quantize:
        quantize_model(original, QuantConfig(quant_type=quantize))
        quantized = {name: m for name, m in model.named_modules() if isinstance(m, Linear4bit)}
        reference = {name: m for name, m in original.named_modules() if isinstance(m, Linear4bit)}
        assert quantized.keys() == reference.keys() and len(quantized) == 14
        for name, layer in quantized.items():  # the same 4-bit codes and block constants, bit for bit
            ours, theirs = dict(layer.named_buffers()), dict(reference[name].named_buffers())
            assert ours.keys() == theirs.keys() and "packed" in ours, name
            assert all(torch.equal(ours[key], theirs[key]) for key in ours), name
            assert layer.compute_dtype == reference[name].compute_dtype == torch.bfloat16
    assert torch.equal(logits(model), logits(original, like=model))


def test_a_sharded_folder_streams_every_shard(tmp_path):
    from transformers import AutoModelForCausalLM

    original = tiny_llama()
    original.save_pretrained(tmp_path, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    assert streaming.weight_files(tmp_path) == [tmp_path / name for name in dict.fromkeys(index["weight_map"].values())]
    model, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)  # transformers' own load
    assert torch.equal(logits(model), logits(reference, like=model))


def test_files_transformers_must_map_fall_back_to_its_loader(tmp_path):
    original = save_tiny(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.unused_extra"] = torch.zeros(3)  # a key the model does not have: not a plain 1:1 file
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    from transformers import AutoConfig, AutoModelForCausalLM

    with streaming.meta_parameters():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
    assert all(p.is_meta for p in skeleton.parameters())
    assert not streaming.can_stream(skeleton, [SafetensorsFile(tmp_path / "model.safetensors")])
    model = load_model(str(tmp_path))[0]
    assert not any(p.is_meta for p in model.parameters())
    assert torch.equal(logits(model), logits(original, like=model))


def test_a_truncated_file_is_damaged_not_a_traceback(tmp_path):
    save_tiny(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LorakitError, match="truncated at tensor .*damaged"):
        load_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x05\x00")
    with pytest.raises(LorakitError, match="not a readable safetensors file"):
        load_model(str(tmp_path))


def test_a_sharded_folder_quantizes_as_one_file_does(tmp_path):
    # Tied embeddings, and shards small enough that most hold one tensor: each linear is quantized from the
    # shard it sits in, and the result is the single-file load's, buffer for buffer.
    original = tiny_llama(tie=True)
    original.save_pretrained(tmp_path / "one")
    original.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    for folder in ("one", "sharded"):
        tiny_tokenizer().save_pretrained(tmp_path / folder)
    assert len(streaming.weight_files(tmp_path / "sharded")) > 3
    whole, _ = load_model(str(tmp_path / "one"), quantize="nf4", dtype=torch.bfloat16)
    sharded, _ = load_model(str(tmp_path / "sharded"), quantize="nf4", dtype=torch.bfloat16)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    ours, theirs = dict(sharded.named_buffers()), dict(whole.named_buffers())
    assert ours.keys() == theirs.keys() and sum(".packed" in key for key in ours) == 14
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    assert all(torch.equal(p, q) for p, q in zip(sharded.parameters(), whole.parameters(), strict=True))
    assert torch.equal(logits(sharded), logits(whole))


def test_a_shard_the_index_names_but_is_missing_is_an_error(tmp_path):
    tiny_llama().save_pretrained(tmp_path, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(tmp_path)
    streaming.weight_files(tmp_path)[1].unlink()
    with pytest.raises(LorakitError, match="not a readable safetensors file"):
        load_model(str(tmp_path), quantize="nf4")


def test_freed_memory_goes_back_after_each_quantized_linear(tmp_path, monkeypatch):
    # glibc keeps the holes a stored weight and the quantizer's temporaries leave between packed layers; over a
    # 1.5B model that was up to 1.5 GB above the 4-bit model (docs/memory.md), so each layer returns them.
    save_tiny(tmp_path)
    calls = []
    monkeypatch.setattr(streaming.allocator, "release_freed_memory", lambda: calls.append(1) or True)
    load_model(str(tmp_path), quantize="nf4")
    assert len(calls) == 14  # 7 linears x 2 layers
