"""The memory estimator: hand-computed arithmetic, presets, the plot, and one measured training step."""

import json

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.memory import (
    ModelShape,
    PeakMemoryTracker,
    adapter_tensors,
    comparison_table,
    estimate,
    estimate_from_spec,
    nf4_bytes,
    parameter_count,
    plot_memory_vs_size,
)

LLAMA_7B = ModelShape.from_name("llama-7b")


def test_llama_7b_and_smollm2_parameter_counts():
    assert parameter_count(LLAMA_7B) == 6_738_415_616  # Llama-2-7B's published count
    assert parameter_count(ModelShape.from_name("smollm2-135m")) == 134_515_008  # SmolLM2-135M, tied head


def test_full_finetune_is_16_bytes_per_param():
    est = estimate(LLAMA_7B, method="full", compute_dtype=torch.bfloat16, param_dtype=torch.float32)
    n = parameter_count(LLAMA_7B)
    assert est.weights == 2 * n and est.master_weights == 4 * n
    assert est.gradients == 2 * n and est.optimizer == 8 * n
    held = est.weights + est.master_weights + est.gradients + est.optimizer
    assert held == 16 * n
    fp32_grads = estimate(LLAMA_7B, method="full", grad_dtype=torch.float32)
    assert fp32_grads.gradients == 4 * n  # the common fp32-gradient variant: 18 bytes/param
    assert est.as_dict()["optimizer"] == 8 * n
    assert f"  {'optimizer':<15} {8 * n / 1e9:10.2f} GB" in est.table().splitlines()  # 53.91 GB


def test_lora_adapter_count_llama_7b_r16_all_linear():
    h, inter, layers, r = 4096, 11008, 32, 16
    per_layer = 4 * r * (h + h) + 2 * r * (h + inter) + r * (inter + h)  # q,k,v,o + gate,up + down
    assert sum(n for _, n in adapter_tensors(LLAMA_7B, 16, "all-linear")) == layers * per_layer == 39_976_960
    est = estimate(LLAMA_7B, method="lora", rank=16)
    assert est.trainable_params == 39_976_960
    # frozen bf16 base; fp32 adapter with fp32 grads and AdamW m, v
    assert est.weights == 2 * parameter_count(LLAMA_7B)
    assert est.adapter == 4 * 39_976_960 and est.gradients == 4 * 39_976_960
    assert est.optimizer == 8 * 39_976_960


def test_qlora_base_is_about_0_52_bytes_per_linear_param():
    numel = 4096 * 11008
    assert nf4_bytes(numel, 64, double_quant=True) / numel == pytest.approx(0.5 + 0.127 / 8, abs=5e-4)
    assert nf4_bytes(numel, 64, double_quant=False) / numel == pytest.approx(0.5 + 0.5 / 8, abs=1e-5)
    est = estimate(LLAMA_7B, method="qlora")
    embed_and_head = 2 * 32000 * 4096
    norms = (2 * 32 + 1) * 4096
    linear = parameter_count(LLAMA_7B) - embed_and_head - norms
    quantized = est.weights - 2 * (embed_and_head + norms)
    assert quantized / linear == pytest.approx(0.516, abs=0.001)


def test_8bit_and_paged_optimizer_states():
    est8 = estimate(LLAMA_7B, method="lora", optimizer="adamw8bit")
    n = est8.trainable_params
    # every LoRA tensor here has >= 4096 elements: 2 bytes/param + two fp32 absmax per 256
    assert est8.optimizer == pytest.approx(2 * n + 2 * 4 * n / 256, rel=1e-6)
    paged = estimate(LLAMA_7B, method="lora", optimizer="paged_adamw8bit")
    assert paged.optimizer_host == est8.optimizer
    assert paged.optimizer < est8.optimizer / 100  # one tensor's states at a time on the device
    assert paged.total < est8.total


def test_seed_comparison_figures():
    seven_full = estimate(LLAMA_7B, method="full")
    held = seven_full.weights + seven_full.master_weights + seven_full.gradients + seven_full.optimizer
    assert 105e9 < held < 115e9  # "about 112 GB for a 7B model"
    seventy = ModelShape.from_name("70b")
    full70 = estimate(seventy, method="full")
    assert 1.0e12 < full70.total < 1.2e12  # "about 1.1 terabytes"
    qlora70 = estimate(seventy, method="qlora")
    assert 35e9 < qlora70.total < 48e9  # fits a 48 GB card
    table = comparison_table()
    assert "llama-70b" in table and table.count("qlora") == 2


def test_shape_from_hf_config_and_spec(tmp_path):
    from transformers import GPT2Config, LlamaConfig

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    shape = ModelShape.from_hf_config(cfg.to_dict())
    assert parameter_count(shape) == parameter_count(ModelShape.from_name("smollm2-135m"))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert estimate_from_spec(str(tmp_path), method="qlora") == estimate_from_spec("smollm2-135m", method="qlora")
    from transformers import GPT2LMHeadModel

    gpt2_cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    gpt2 = ModelShape.from_hf_config(gpt2_cfg.to_dict())
    assert parameter_count(gpt2) == sum(p.numel() for p in GPT2LMHeadModel(gpt2_cfg).parameters())
    with pytest.raises(LorakitError, match="unknown model preset"):
        estimate_from_spec("llama-9000b")
    with pytest.raises(LorakitError, match="method"):
        estimate(shape, method="half")


def test_plot_writes_a_png(tmp_path):
    path = plot_memory_vs_size(str(tmp_path / "memory.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def _measured_training_step(batch: int, seq: int, checkpointing: bool):
    """Peak tensor bytes of a steady-state step (2nd) of a full fp32 fine-tune, and the model shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).train()
    if checkpointing:
        model.activation_checkpointing_enable()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with PeakMemoryTracker() as tracker:
        for _ in range(2):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del loss
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return tracker.peak_bytes + weights, ModelShape.from_hf_config(cfg.to_dict())


def test_predicted_peak_matches_a_measured_training_step():
    measured, shape = _measured_training_step(batch=4, seq=128, checkpointing=False)
    est = estimate(shape, method="full", batch=4, seq_len=128, gradient_checkpointing=False,
                   compute_dtype=torch.float32, param_dtype=torch.float32, chunked_ce=False)
    assert abs(measured / est.total - 1) <= 0.15, (measured, est.total)


def test_predicted_peak_with_checkpointing_matches_a_measured_step():
    measured, shape = _measured_training_step(batch=4, seq=128, checkpointing=True)
    est = estimate(shape, method="full", batch=4, seq_len=128, gradient_checkpointing=True,
                   compute_dtype=torch.float32, param_dtype=torch.float32, chunked_ce=False)
    assert abs(measured / est.total - 1) <= 0.15, (measured, est.total)


def test_tracker_counts_live_and_peak_bytes():
    x = torch.ones(1000)
    with PeakMemoryTracker() as tracker:
        y = x * 2  # 4000 bytes
        z = y + 1  # 4000 more
        view = z[:10]  # a view: nothing new
        del y
    assert tracker.peak_bytes == 8000 and tracker.live_bytes == 4000
    assert view.numel() == 10
