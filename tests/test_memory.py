"""The memory estimator: hand-computed arithmetic, presets, the plot, saved tensors and measured training steps."""

import json
import re
from collections import Counter

import pytest
import torch
from helpers import tiny_llama

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.kernels import attention
from lorakit.lora import LoraLinear
from lorakit.memory import (
    ModelShape,
    StepSettings,
    activation_bytes,
    adapter_tensors,
    attention_kind,
    comparison_table,
    estimate,
    estimate_from_spec,
    layer_activation_bytes,
    logits_bytes,
    lora_path_bytes,
    nf4_bytes,
    norm_activation_bytes,
    paged_device_state_bytes,
    parameter_count,
    plot_memory_vs_size,
)
from lorakit.optim import make_optimizer
from lorakit.profiling import PeakMemoryTracker, allocator_peak_bytes
from lorakit.train.trainer import causal_lm_loss, enable_checkpointing

LLAMA_7B = ModelShape.from_name("llama-7b")
SMOLLM2 = ModelShape.from_name("smollm2-135m")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_llama_7b_and_smollm2_parameter_counts():
    assert parameter_count(LLAMA_7B) == 6_738_415_616  # Llama-2-7B's published count
    assert parameter_count(ModelShape.from_name("smollm2-135m")) == 134_515_008  # SmolLM2-135M, tied head


def test_full_finetune_is_16_bytes_per_param():
    est = estimate(LLAMA_7B, StepSettings(method="full", compute_dtype=torch.bfloat16, param_dtype=torch.float32))
    n = parameter_count(LLAMA_7B)
    assert est.weights == 2 * n and est.master_weights == 4 * n
    assert est.gradients == 2 * n and est.optimizer == 8 * n
    held = est.weights + est.master_weights + est.gradients + est.optimizer
    assert held == 16 * n
    fp32_grads = estimate(LLAMA_7B, StepSettings(method="full", grad_dtype=torch.float32))
    assert fp32_grads.gradients == 4 * n  # the common fp32-gradient variant: 18 bytes/param
    assert est.as_dict()["optimizer"] == 8 * n
    assert f"  {'optimizer':<15} {8 * n / 1e9:10.2f} GB" in est.table().splitlines()  # 53.91 GB


def test_lora_adapter_count_llama_7b_r16_all_linear():
    h, inter, layers, r = 4096, 11008, 32, 16
    per_layer = 4 * r * (h + h) + 2 * r * (h + inter) + r * (inter + h)  # q,k,v,o + gate,up + down
    assert sum(n for _, n in adapter_tensors(LLAMA_7B, 16, "all-linear")) == layers * per_layer == 39_976_960
    est = estimate(LLAMA_7B, StepSettings(method="lora", rank=16))
    assert est.trainable_params == 39_976_960
    # frozen bf16 base; fp32 adapter with fp32 grads and AdamW m, v
    assert est.weights == 2 * parameter_count(LLAMA_7B)
    assert est.adapter == 4 * 39_976_960 and est.gradients == 4 * 39_976_960
    assert est.optimizer == 8 * 39_976_960


def test_qlora_base_is_about_0_52_bytes_per_linear_param():
    numel = 4096 * 11008
    assert nf4_bytes(numel, 64, double_quant=True) / numel == pytest.approx(0.5 + 0.127 / 8, abs=5e-4)
    assert nf4_bytes(numel, 64, double_quant=False) / numel == pytest.approx(0.5 + 0.5 / 8, abs=1e-5)
    est = estimate(LLAMA_7B, StepSettings(method="qlora"))
    embed_and_head = 2 * 32000 * 4096
    norms = (2 * 32 + 1) * 4096
    linear = parameter_count(LLAMA_7B) - embed_and_head - norms
    quantized = est.weights - 2 * (embed_and_head + norms)
    assert quantized / linear == pytest.approx(0.516, abs=0.001)


def test_8bit_and_paged_optimizer_states():
    est8 = estimate(LLAMA_7B, StepSettings(method="lora", optimizer="adamw8bit"))
    n = est8.trainable_params
    # every LoRA tensor here has >= 4096 elements: 2 bytes/param + two fp32 absmax per 256
    assert est8.optimizer == pytest.approx(2 * n + 2 * 4 * n / 256, rel=1e-6)
    paged = estimate(LLAMA_7B, StepSettings(method="lora", optimizer="paged_adamw8bit"))
    assert paged.optimizer_host == est8.optimizer
    assert paged.optimizer < est8.optimizer / 100  # one bucket's states at a time on the device
    assert paged.total < est8.total
    # 7B LoRA r=16 all-linear, a layer's tensors in order: q, k, v, o's A and B (65,536 values each), then
    # gate/up/down pairs of 65,536 + 176,128. Buckets of 2^18 values: four 65,536s (exactly 2^18), or a
    # pair of 241,664. The largest is four 65,536s: 4 x (2 x 65,536 + 8 x 256 blocks) bytes.
    assert paged.optimizer == 4 * (2 * 65_536 + 8 * 256)


def test_paged_device_state_bytes_is_the_largest_buckets():
    # 40 x 9216-value 8-bit tensors (36 blocks each): 28 to a bucket of 2^18 -> 28 x (2 x 9216 + 8 x 36) bytes.
    assert paged_device_state_bytes([9216] * 40) == 28 * (2 * 9216 + 8 * 36)
    # 100 x 3072-value tensors keep fp32 states (8 bytes/value): 85 to a bucket -> 85 x 8 x 3072.
    assert paged_device_state_bytes([9216] * 40 + [3072] * 100) == 85 * 8 * 3072
    # one tensor larger than a bucket is its own bucket
    assert paged_device_state_bytes([1 << 20]) == 2 * (1 << 20) + 8 * (1 << 12)


def test_seed_comparison_figures():
    seven_full = estimate(LLAMA_7B, StepSettings(method="full"))
    held = seven_full.weights + seven_full.master_weights + seven_full.gradients + seven_full.optimizer
    assert 105e9 < held < 115e9  # "about 112 GB for a 7B model"
    seventy = ModelShape.from_name("70b")
    full70 = estimate(seventy, StepSettings(method="full"))
    assert 1.0e12 < full70.total < 1.2e12  # "about 1.1 terabytes"
    qlora70 = estimate(seventy, StepSettings(method="qlora"))
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
    qlora = StepSettings(method="qlora")
    assert estimate_from_spec(str(tmp_path), qlora) == estimate_from_spec("smollm2-135m", qlora)
    from transformers import GPT2LMHeadModel

    gpt2_cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    gpt2 = ModelShape.from_hf_config(gpt2_cfg.to_dict())
    assert parameter_count(gpt2) == sum(p.numel() for p in GPT2LMHeadModel(gpt2_cfg).parameters())
    with pytest.raises(LorakitError, match="unknown model preset"):
        estimate_from_spec("llama-9000b")
    with pytest.raises(LorakitError, match="method"):
        estimate(shape, StepSettings(method="half"))


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
    est = estimate(shape, StepSettings(method="full", batch=4, seq_len=128, gradient_checkpointing=False,
                                       compute_dtype=torch.float32, param_dtype=torch.float32, chunked_ce=False))
    assert abs(measured / est.total - 1) <= 0.15, (measured, est.total)


def test_predicted_peak_with_checkpointing_matches_a_measured_step():
    measured, shape = _measured_training_step(batch=4, seq=128, checkpointing=True)
    est = estimate(shape, StepSettings(method="full", batch=4, seq_len=128, gradient_checkpointing=True,
                                       compute_dtype=torch.float32, param_dtype=torch.float32, chunked_ce=False))
    assert abs(measured / est.total - 1) <= 0.15, (measured, est.total)


def test_attention_kind_follows_lorakit_attention(monkeypatch):
    assert attention_kind("cpu", 256) == "plain"
    assert attention_kind("cpu", 1024) == "plain"  # 1024 x 1024 scores = attention.MAX_SCORES
    assert attention_kind("cpu", 1025) == "sdpa"
    assert attention_kind("cpu", 1) == "sdpa"  # a decoding step
    assert attention_kind("cuda", 256) == "sdpa"
    monkeypatch.setattr(attention, "MAX_SCORES", 255 * 255)
    assert attention_kind("cpu", 256) == "sdpa"
    with pytest.raises(LorakitError, match="attention must be one of"):
        estimate(SMOLLM2, StepSettings(attention="eager"))


def test_norm_and_lora_path_terms_hand_computed():
    h = 576
    assert norm_activation_bytes(SMOLLM2, 512, 2, weight_trained=False) == 512 * (4 * h + 4)  # fp32 input, rsqrt
    assert norm_activation_bytes(SMOLLM2, 512, 2, weight_trained=True) == 512 * (4 * h + 4 + 2 * h)
    # q_proj 576 -> 576, r=16, 512 tokens, bf16: the LoRA node saves h (r per token) and nothing else
    assert lora_path_bytes(576, 576, 16, 512, 2) == lora_path_bytes(576, 576, 16, 512, 2, copies_A=False) == 16_384
    # fp32: autograd over add_low_rank_update also saves B * scale and, when made, A's copy
    assert lora_path_bytes(576, 576, 16, 512, 4) == 4 * (512 * 16 + 576 * 16 + 576 * 16) == 106_496
    assert lora_path_bytes(576, 576, 16, 512, 4, copies_A=False) == 4 * (512 * 16 + 576 * 16)


def test_layer_terms_hand_computed_for_smollm2():
    b, t, s, r = 2, 256, 2, 16
    n, h, q, kv, inter, heads = b * t, 576, 576, 192, 1536, 9
    norms = 2 * n * (4 * h + 4) + 2 * n * s * h  # two frozen norms and their outputs (read by trained linears)
    mlp = 4 * n * s * inter  # gate, silu(gate), up, their product (down_proj trains)
    lora = 7 * s * n * r  # h = x A^T of each of the seven adapters (the LoRA node)
    # scaled q, k, v; output; probabilities of the four causal blocks of 64 queries (keys up to each end)
    plain = n * s * (q + 2 * kv) + n * s * q + b * heads * 64 * (64 + 128 + 192 + 256) * s
    sdpa = n * (s * (2 * q + 2 * kv) + 4 * heads)  # q, k, v, output; fp32 log-sum-exp per head
    args = (SMOLLM2, b, t, s)
    assert layer_activation_bytes(*args, "plain", ALL_LINEAR, r, 4) == norms + plain + mlp + lora == 12_996_608
    assert layer_activation_bytes(*args, "sdpa", ALL_LINEAR, r, 4) == norms + sdpa + mlp + lora == 11_540_480
    # the block after the frozen embeddings: no first norm
    first = layer_activation_bytes(*args, "plain", ALL_LINEAR, r, 4, first=True)
    assert first == norms + plain + mlp + lora - n * (4 * h + 4)
    # full fine-tune: norms also save the normalized input; every linear's input is saved
    full = layer_activation_bytes(*args, "sdpa")
    assert full == 2 * n * (4 * h + 4 + 2 * s * h) + sdpa + mlp
    # without checkpointing: every layer (the trainer runs with use_cache=False: no KV cache is held)
    stack = activation_bytes(*args, False, "plain", ALL_LINEAR, r, 4)
    outside = n * (4 * h + 4) + 2 * t * 64 * s  # final norm; RoPE cos and sin
    assert stack == 29 * layer_activation_bytes(*args, "plain", ALL_LINEAR, r, 4) + first + outside
    checkpointed = activation_bytes(*args, True, "plain", ALL_LINEAR, r, 4)
    assert checkpointed == 30 * n * h * s + layer_activation_bytes(*args, "plain", ALL_LINEAR, r, 4) + outside


def test_chunked_loss_term_hand_computed():
    v, h = 49152, 576
    # 2048 tokens in chunks of 1024, bf16: buffer 2, fp32 upcast 4, logsumexp's fp32 x - max 4 (bytes per logit)
    bf16 = 1024 * v * (2 + 4 + 4) + 2048 * (2 * h + 21) + 12 * 1024
    assert logits_bytes(SMOLLM2, 2048, 2, 1024) == bf16 == 505_731_072
    # fp32: the buffer is already fp32, no upcast copy
    assert logits_bytes(SMOLLM2, 2048, 4, 1024) == 1024 * v * (4 + 4) + 2048 * (4 * h + 21) + 12 * 1024
    # fewer tokens than a chunk: the buffer holds the tokens
    assert logits_bytes(SMOLLM2, 512, 2, 1024) == 512 * v * 10 + 512 * (2 * h + 21) + 12 * 512
    # a trained head: its fp32 gradient, and grad_logits^T @ hidden (bf16) with its fp32 upcast after each
    # chunk, which here outweigh the chunk's own temporaries (v h 6 > 128 v 8)
    assert logits_bytes(SMOLLM2, 512, 2, 128, head_trained=True) == (
        128 * v * 2 + v * h * (2 + 4) + 4 * v * h + 512 * (2 * h + 21) + 12 * 128)
    assert logits_bytes(SMOLLM2, 512, 2, None) == 512 * (v * 14 + 8)  # plain loss, frozen head


def _lorakit_tiny(quantize=None, attn="plain", layers=3, vocab=128):
    """A bf16 tiny Llama as lorakit loads and trains it, LoRA r=4 on all linears (benchmarks/train_step.py)."""
    model = tiny_llama(layers=layers, vocab=vocab, tie=True).to(torch.bfloat16)
    if attn == "plain":
        assert lk.use_fast_cpu_attention(model)
    model.config.use_cache = True  # as load_model leaves it: the trainer's loss must not keep a KV cache
    if quantize:
        lk.quantize_model(model, lk.QuantConfig(quant_type=quantize))
    torch.manual_seed(0)
    lk.add_adapter(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    return model.train()


def _lorakit_loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as lorakit's trainer
        return causal_lm_loss(model, batch, chunked=True)


def _token_batch(vocab, batch, seq):
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("attn,quantize", [("plain", None), ("plain", "nf4"), ("sdpa", None)])
def test_saved_tensors_of_a_lorakit_step_match_the_layer_terms(attn, quantize):
    model = _lorakit_tiny(quantize, attn)
    shape = ModelShape.from_hf_config(model.config.to_dict())
    b, t = 2, 32
    persistent = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    names = {module: name for name, module in model.named_modules()}
    stack = ["loss"]
    # Not on the adapters' base layers: a hooked base runs its own forward, not the LoRA node's, as training doesn't.
    bases = {id(module.base_layer) for module in model.modules() if isinstance(module, LoraLinear)}
    hooks = [hook for module in model.modules() if id(module) not in bases for hook in (
        module.register_forward_pre_hook(lambda m, args: stack.append(names[m])),
        module.register_forward_hook(lambda m, args, out: stack.pop() and None))]
    saved = Counter()
    seen = set()

    def pack(tensor):
        key = tensor.untyped_storage().data_ptr()
        if key not in persistent and key not in seen:  # each storage once, weights excluded
            seen.add(key)
            layer = re.match(r"model\.layers\.(\d+)", stack[-1])
            saved[int(layer.group(1)) if layer else stack[-1]] += tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = _lorakit_loss(model, _token_batch(shape.vocab, b, t))
    for hook in hooks:
        hook.remove()
    loss.backward()
    layer = layer_activation_bytes(shape, b, t, 2, attn, ALL_LINEAR, 4, 4)
    first = layer_activation_bytes(shape, b, t, 2, attn, ALL_LINEAR, 4, 4, first=True)
    rope = 2 * t * shape.dim_head * 2  # cos and sin, first saved by layer 0 and shared
    assert saved[1] == saved[2] == layer
    assert saved[0] == first + rope
    assert saved["model.norm"] == norm_activation_bytes(shape, b * t, 2, weight_trained=False)
    assert saved["loss"] == b * t * shape.hidden * 2  # chunked CE keeps only grad_hidden


def _measured_lorakit_step(quantize, checkpointing, batch, seq, vocab):
    """(held bytes, allocator peak of the 2nd step, model shape) of a lorakit LoRA/QLoRA training step."""
    model = _lorakit_tiny(quantize, vocab=vocab)
    if checkpointing:
        enable_checkpointing(model)
    optimizer = make_optimizer("adamw", [p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = _token_batch(vocab, batch, seq)

    def step():
        # Under a dispatch mode the loss runs its reference kernels (what a GPU runs), as estimate() models.
        with PeakMemoryTracker():
            _lorakit_loss(model, data).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # creates the optimizer state
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    held = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    return held, allocator_peak_bytes(step), ModelShape.from_hf_config(model.config.to_dict())


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("qlora", True)])
def test_predicted_peak_matches_a_measured_lorakit_step(method, checkpointing):
    held, step_peak, shape = _measured_lorakit_step("nf4" if method == "qlora" else None, checkpointing,
                                                    batch=4, seq=64, vocab=1024)
    est = estimate(shape, StepSettings(method=method, rank=4, batch=4, seq_len=64,
                                       gradient_checkpointing=checkpointing, attention=attention_kind("cpu", 64)))
    assert est.weights + est.adapter + est.optimizer == pytest.approx(held, rel=0.01)
    assert abs((held + step_peak) / est.total - 1) <= 0.15, (held + step_peak, est.total)


def test_cli_estimate_for_the_cpu_uses_plain_attention_and_the_gpu_sdpa(capsys):
    from lorakit.cli import main

    # 1024 tokens (the longest plain attention): the probabilities, 1.4 GB, show at the table's precision
    args = ["estimate", "--model", "smollm2-135m", "--method", "lora", "--batch", "4", "--seq-len", "1024",
            "--gradient-checkpointing"]
    assert main([*args, "--device", "cuda"]) == 0
    gpu = capsys.readouterr().out
    assert main(args) == 0  # the CPU is the default device, as for lorakit train
    cpu = capsys.readouterr().out
    for kind, out in (("plain", cpu), ("sdpa", gpu)):
        step = estimate(SMOLLM2, StepSettings(method="lora", batch=4, seq_len=1024, attention=kind))
        assert f"  {'activations':<22} {step.activations / 1e9:8.3f} GB" in out.splitlines(), kind


@pytest.mark.parametrize("kind,config,rank", [
    ("lora", lk.LoraConfig(r=8, target_modules="all-linear"), 8),
    ("dora", lk.LoraConfig(r=8, target_modules="all-linear", use_dora=True), 8),
    ("vera", lk.VeraConfig(r=16, target_modules="all-linear"), 16),
    ("adalora", lk.AdaLoraConfig(init_r=6, target_r=2, total_step=10, target_modules="all-linear"), 6),
])
def test_adapter_tensors_count_what_each_variant_trains(kind, config, rank):
    """The estimator's trained tensors equal the trainable parameters of the real adapter on the same model."""
    model = tiny_llama()
    shape = ModelShape.from_hf_config(model.config.to_dict())
    lk.add_adapter(model, config)
    adapter = {"dora": "lora"}.get(kind, kind)
    predicted = adapter_tensors(shape, rank, "all-linear", use_dora=kind == "dora", adapter=adapter)
    assert sum(n for _, n in predicted) == lk.trainable_parameters(model)[0]
