"""chunked_cross_entropy against the plain full-logits version and F.cross_entropy, and its memory."""

import pytest
import torch
import torch.nn.functional as F
from helpers import devices

from lorakit.errors import LorakitError
from lorakit.kernels.cross_entropy import chunked_cross_entropy, reference_cross_entropy


def _inputs(batch=3, seq=37, hidden=24, vocab=50, dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen).to(dtype).to(device).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return h, w, labels


def _loss_and_grads(fn, h, w, labels, **kw):
    loss = fn(h, w, labels, **kw)
    grads = torch.autograd.grad(loss, [t for t in (h, w) if t.requires_grad])
    return loss, grads


def test_reference_equals_f_cross_entropy_on_shifted_labels():
    h, w, labels = _inputs()
    labels[0, 3:9] = -100
    expected = F.cross_entropy((h[:, :-1] @ w.t()).reshape(-1, w.shape[0]), labels[:, 1:].reshape(-1))
    got = reference_cross_entropy(h, w, labels)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("chunk_size", [1, 7, 64, 111, 4096])  # 111 = 3 * 37, 4096 > all tokens
def test_chunked_matches_reference_fp32(chunk_size, device):
    h, w, labels = _inputs(device=device)
    labels[0, :10] = -100  # some ignored tokens
    labels[2] = -100  # an all-ignored row
    loss_c, (gh_c, gw_c) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=chunk_size)
    loss_r, (gh_r, gw_r) = _loss_and_grads(reference_cross_entropy, h, w, labels)
    assert abs(loss_c.item() - loss_r.item()) <= 1e-5
    assert (gh_c - gh_r).abs().max().item() <= 1e-5
    assert (gw_c - gw_r).abs().max().item() <= 1e-5
    assert gh_c[2].abs().max().item() == 0.0  # every target of row 2 is ignored


def test_ignored_targets_get_zero_hidden_gradient():
    h, w, labels = _inputs()
    labels[1] = -100
    _, (grad_h, _) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=5)
    assert grad_h[1].abs().max().item() == 0.0
    assert grad_h[0, -1].abs().max().item() == 0.0  # the last position has no next token
    assert grad_h[0, :-1].abs().min().item() > 0.0


def test_no_shift_and_frozen_head():
    h, w, labels = _inputs()
    w.requires_grad_(False)
    loss_c, (gh_c,) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=10, shift=False)
    expected = F.cross_entropy((h @ w.t()).reshape(-1, w.shape[0]), labels.reshape(-1))
    (gh_r,) = torch.autograd.grad(expected, [h])
    assert abs(loss_c.item() - expected.item()) <= 1e-5
    assert (gh_c - gh_r).abs().max().item() <= 1e-5


def test_all_ignored_batch_gives_zero_loss_and_zero_grads():
    h, w, labels = _inputs()
    labels[:] = -100
    loss, (grad_h, grad_w) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=16)
    assert loss.item() == 0.0
    assert grad_h.abs().max().item() == 0.0 and grad_w.abs().max().item() == 0.0
    assert reference_cross_entropy(h, w, labels).item() == 0.0


@pytest.mark.parametrize("device", devices())
def test_bf16_hidden_matches_reference(device):
    h, w, labels = _inputs(dtype=torch.bfloat16, vocab=300, hidden=64, device=device)
    labels[1, 5:20] = -100
    loss_c, (gh_c, gw_c) = _loss_and_grads(chunked_cross_entropy, h, w, labels, chunk_size=13)
    loss_r, (gh_r, gw_r) = _loss_and_grads(reference_cross_entropy, h, w, labels)
    assert gh_c.dtype == torch.bfloat16 and gw_c.dtype == torch.bfloat16
    assert abs(loss_c.item() - loss_r.item()) <= 1e-5 * abs(loss_r.item())  # same bf16 logits, fp32 softmax
    # bf16 gradients: within 2 bf16 ulps of the gradient scale
    assert (gh_c.float() - gh_r.float()).abs().max().item() <= 2 ** -7 * gh_r.float().abs().max().item()
    assert (gw_c.float() - gw_r.float()).abs().max().item() <= 2 ** -7 * gw_r.float().abs().max().item()


def _saved_bytes(fn, h, w, labels, **kw) -> int:
    """Bytes of tensors autograd saves for backward, excluding the inputs (which exist anyway)."""
    inputs = {h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in inputs:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(h, w, labels, **kw)
    return sum(saved.values())


def test_saved_memory_is_per_token_not_per_logit():
    batch, seq, vocab = 4, 256, 2000
    h, w, labels = _inputs(batch=batch, seq=seq, vocab=vocab, hidden=32)
    tokens = batch * seq
    full = _saved_bytes(reference_cross_entropy, h, w, labels)
    chunked = _saved_bytes(chunked_cross_entropy, h, w, labels, chunk_size=128)
    assert full >= tokens * vocab * 4  # the fp32 log-softmax of every token
    # chunked keeps exactly the gradients of its two inputs (formed in the forward), nothing per logit
    assert chunked == (h.numel() + w.numel()) * 4
    w.requires_grad_(False)
    assert _saved_bytes(chunked_cross_entropy, h, w, labels, chunk_size=128) == h.numel() * 4
    with torch.no_grad():
        assert _saved_bytes(chunked_cross_entropy, h, w, labels, chunk_size=128) == 0


def test_scaled_loss_scales_gradients():
    h, w, labels = _inputs()
    (gh_c, gw_c) = torch.autograd.grad(0.3 * chunked_cross_entropy(h, w, labels, chunk_size=16), [h, w])
    (gh_r, gw_r) = torch.autograd.grad(0.3 * reference_cross_entropy(h, w, labels), [h, w])
    assert (gh_c - gh_r).abs().max().item() <= 1e-6
    assert (gw_c - gw_r).abs().max().item() <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunk_kernels_equal_the_references(dtype):
    from lorakit.kernels import cross_entropy as loss_module

    gen = torch.Generator().manual_seed(3)
    for rows in (7, 64):  # two shapes: the compiled kernels are shape-dynamic
        logits = (4 * torch.randn(rows, 1000, generator=gen)).to(dtype)
        targets = torch.randint(0, 1000, (rows,), generator=gen)
        row_scale = torch.rand(rows, generator=gen)
        stats, softmax_grad_ = loss_module._COMPILED
        lse, target = stats(logits, targets)
        lse_r, target_r = loss_module.chunk_stats_reference(logits, targets)
        torch.testing.assert_close(lse, lse_r, rtol=1e-6, atol=1e-6)
        assert torch.equal(target, target_r)
        grad = softmax_grad_(logits.clone(), lse_r, targets, row_scale)
        grad_r = loss_module.softmax_grad_reference_(logits.clone(), lse_r, targets, row_scale)
        assert grad.dtype == dtype
        ulp = 1e-6 if dtype == torch.float32 else 2**-8
        assert (grad.float() - grad_r.float()).abs().max().item() <= ulp * grad_r.float().abs().max().item()


def test_peak_extra_memory_is_about_one_chunk():
    from lorakit.profiling import PeakMemoryTracker

    batch, seq, vocab, hidden, chunk = 4, 256, 2000, 32, 128
    h, w, labels = _inputs(batch=batch, seq=seq, vocab=vocab, hidden=hidden)
    peaks = {}
    for name, fn in (("chunked", chunked_cross_entropy), ("reference", reference_cross_entropy)):
        with PeakMemoryTracker() as tracker:
            loss = fn(h, w, labels, chunk_size=chunk)
            loss.backward()
        peaks[name] = tracker.peak_bytes
    tokens = batch * seq
    chunk_logits = chunk * vocab * 4
    grads = (h.numel() + 2 * w.numel()) * 4  # grad wrt hidden, grad wrt head (+ its fp32 accumulator)
    # a few chunk-sized fp32 buffers (logits, exp, the gradient) plus per-token vectors and the gradients
    assert peaks["chunked"] <= 3 * chunk_logits + grads + tokens * 32
    assert peaks["reference"] >= 2 * tokens * vocab * 4
    assert peaks["reference"] / peaks["chunked"] > 5


def test_bad_inputs_raise_lorakit_error():
    h, w, labels = _inputs()
    with pytest.raises(LorakitError, match="chunk_size"):
        chunked_cross_entropy(h, w, labels, chunk_size=0)
    with pytest.raises(LorakitError, match="lm_head_weight"):
        chunked_cross_entropy(h, w.t(), labels)
    with pytest.raises(LorakitError, match="labels shape"):
        chunked_cross_entropy(h, w, labels[:, 1:])
