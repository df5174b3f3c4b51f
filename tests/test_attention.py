"""lorakit's CPU attention against transformers' eager and sdpa attention on a real (tiny) Llama."""

import pytest
import torch
from conftest import tiny_llama
from test_models import save_tiny

from lorakit import attention
from lorakit.attention import NAME, use_fast_cpu_attention


def _pair(dtype, reference="eager"):
    ref = tiny_llama().to(dtype)
    ref.set_attn_implementation(reference)
    ours = tiny_llama().to(dtype)
    assert use_fast_cpu_attention(ours) and ours.config._attn_implementation == NAME
    return ref, ours


def _batch():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding, as lorakit's tokenizer pads
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_equals_transformers_eager_bit_for_bit(dtype):
    ref, ours = _pair(dtype)
    ids, mask = _batch()
    assert torch.equal(ref(ids).logits, ours(ids).logits)
    assert torch.equal(ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits)


def test_gradients_equal_eager_fp32_and_close_in_bf16():
    for dtype, tol in ((torch.float32, 0.0), (torch.bfloat16, 2**-7)):
        ref, ours = _pair(dtype)
        ids, mask = _batch()
        # No loss through padded query rows: there eager lets gradient into masked scores (it adds the mask),
        # lorakit's masked_fill does not; both give the same outputs.
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 5] = -100  # predicted from the last padded position
        for model in (ref, ours):
            model.train()
            model(ids, attention_mask=mask, labels=labels).loss.backward()
        for (name, p_ref), p_ours in zip(ref.named_parameters(), ours.parameters()):
            scale = p_ref.grad.float().abs().max().item()
            # bf16: eager keeps its softmax output in fp32 for backward, lorakit in bf16
            assert (p_ref.grad.float() - p_ours.grad.float()).abs().max().item() <= tol * scale, name


def test_long_sequences_fall_back_to_sdpa(monkeypatch):
    ref, ours = _pair(torch.float32, reference="sdpa")
    ids, _ = _batch()
    monkeypatch.setattr(attention, "MAX_SCORES", 15 * 15)  # 16 x 16 scores no longer qualify
    assert torch.equal(ref(ids).logits, ours(ids).logits)


def test_generation_with_cache_matches_eager():
    ref, ours = _pair(torch.float32)
    ids, mask = _batch()
    out_ref = ref.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    out_ours = ours.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(out_ref, out_ours)


def test_saves_bf16_probabilities_not_fp32():
    # Under autocast eager would keep an fp32 softmax; the plain path stores scores in the input dtype.
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = attention.plain_attention(q, k, v, None, 0.25)
    assert out.dtype == torch.bfloat16
    assert all(t.dtype != torch.float32 for t in saved)
    assert any(t.shape == (1, 4, 8, 8) and t.dtype == torch.bfloat16 for t in saved)


def test_only_sdpa_models_switch(tmp_path):
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not use_fast_cpu_attention(model)
    assert model.config._attn_implementation == "eager"


def test_load_model_uses_it(tmp_path):
    from lorakit.models import load_model

    save_tiny(tmp_path)
    model, _ = load_model(str(tmp_path))
    assert model.config._attn_implementation == NAME


def test_load_model_attn_implementation_choice(tmp_path):
    from lorakit.errors import LorakitError
    from lorakit.models import load_model

    save_tiny(tmp_path)
    assert load_model(str(tmp_path), attn_implementation="sdpa")[0].config._attn_implementation == "sdpa"
    assert load_model(str(tmp_path), attn_implementation="eager")[0].config._attn_implementation == "eager"
    with pytest.raises(LorakitError, match="attn_implementation='flash'.*auto"):
        load_model(str(tmp_path), attn_implementation="flash")
