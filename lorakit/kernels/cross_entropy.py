"""Causal-LM cross-entropy computed chunk by chunk, so the full [tokens, vocab] fp32 logits never exist.

With a 128k vocabulary, B*T = 16k tokens give 8 GB of fp32 logits plus as much again for their
log-softmax saved for backward; this is often the largest single allocation of a LoRA run.
`chunked_cross_entropy` takes the last hidden states and the head weight instead of logits: the
forward computes logits for `chunk_size` tokens at a time into one reused buffer, turns them into
their gradient in place and keeps only the gradients of its inputs (the size of the inputs). The
peak extra memory is one chunk's logits, not B*T*V, and the head matmul is never recomputed.

Implementations: `compiled_chunks` (CPU: each chunk's statistics and gradient in one compiled loop),
`chunks` (the same chunking in eager PyTorch, any device) and `reference` (full logits).

All return the mean over supervised tokens (labels != ignore_index), like
`F.cross_entropy`, except that a batch with no supervised token gives 0 (and zero gradients)
instead of NaN, so one fully masked batch does not poison a run.
"""

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.kernels.compile import compile_machine_check, compiled, dispatch_mode_check
from lorakit.kernels.dispatch import Kernel, call, register

OP = "cross_entropy"


def _check_inputs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                  chunk_size: int) -> None:
    if hidden.dim() != 3:
        raise LorakitError(f"chunked_cross_entropy: hidden must be [batch, seq, hidden], got shape "
                           f"{tuple(hidden.shape)}; pass the last hidden states, not logits")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[2]:
        raise LorakitError(f"chunked_cross_entropy: lm_head_weight must be [vocab, {hidden.shape[2]}], got "
                           f"{tuple(lm_head_weight.shape)}; pass model.lm_head.weight")
    if labels.shape != hidden.shape[:2]:
        raise LorakitError(f"chunked_cross_entropy: labels shape {tuple(labels.shape)} must equal hidden's "
                           f"[batch, seq] {tuple(hidden.shape[:2])}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise LorakitError(f"chunked_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")


def _flat_targets(labels: torch.Tensor, shift: bool, ignore_index: int) -> torch.Tensor:
    """Targets per position, [B*T]; with shift, position t predicts labels[t+1] and the last is ignored."""
    if shift:
        # Shifting the labels (not the hidden states) keeps hidden a free reshape instead of a copy.
        pad = labels.new_full((labels.shape[0], 1), ignore_index)
        labels = torch.cat([labels[:, 1:], pad], dim=1)
    return labels.reshape(-1)


def reference_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                            chunk_size: int = 1024, ignore_index: int = -100,
                            shift: bool = True) -> torch.Tensor:
    """Plain version: full logits, fp32 log-softmax; chunk_size is accepted and ignored."""
    _check_inputs(hidden, lm_head_weight, labels, chunk_size)
    targets = _flat_targets(labels, shift, ignore_index)
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ lm_head_weight.t()).float()
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def chunk_stats_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: fp32 log-sum-exp of the logits and the target's logit."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1), logits.gather(1, targets[:, None]).squeeze(1)


def softmax_grad_reference_(logits: torch.Tensor, logsumexp: torch.Tensor, targets: torch.Tensor,
                            row_scale: torch.Tensor) -> torch.Tensor:
    """Overwrite logits with d(sum of row_scale * (lse - logit_y))/dlogits = (softmax - onehot(y)) * row_scale."""
    grad = torch.exp_(logits.float().sub_(logsumexp[:, None]))
    grad.scatter_add_(1, targets[:, None], torch.full_like(logsumexp[:, None], -1.0))
    return logits.copy_(grad.mul_(row_scale[:, None]))


def _softmax_grad_fused_(logits, logsumexp, targets, row_scale):
    grad = torch.exp(logits.float() - logsumexp[:, None])
    vocab = torch.arange(logits.shape[1], device=logits.device)
    grad = grad - (vocab[None, :] == targets[:, None]).float()
    return logits.copy_(grad * row_scale[:, None])


# One read of the bf16 logits per pass, fp32 math in registers: eager PyTorch instead writes the
# chunk out in fp32 three times, and on the CPU those passes cost more than the head matmul.
_COMPILED = (compiled(chunk_stats_reference), compiled(_softmax_grad_fused_))
_EAGER = (chunk_stats_reference, softmax_grad_reference_)


def _chunk_pass(kernels, hidden2d, weight, safe_targets, valid, row_scale, chunk_size,
                want_hidden, want_weight):
    stats, softmax_grad_ = kernels
    n_rows, vocab = hidden2d.shape[0], weight.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=hidden2d.device)
    grad_hidden = torch.empty_like(hidden2d) if want_hidden else None
    # fp32 accumulation across chunks: a bf16 running sum would round at every chunk.
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    # One logits buffer reused by every chunk: a fresh chunk-sized allocation per chunk costs page
    # faults on the CPU comparable to the matmul that fills it.
    buffer = hidden2d.new_empty(min(chunk_size, n_rows), vocab)
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, start + chunk_size)
        hidden_chunk = hidden2d[rows]
        logits = torch.mm(hidden_chunk, weight.t(), out=buffer[: hidden_chunk.shape[0]])
        logsumexp, target_logit = stats(logits, safe_targets[rows])
        total += ((logsumexp - target_logit) * valid[rows]).sum()
        if not (want_hidden or want_weight):
            continue
        grad_logits = softmax_grad_(logits, logsumexp, safe_targets[rows], row_scale[rows])
        if want_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[rows])
        if want_weight:
            grad_weight += (grad_logits.t() @ hidden_chunk).float()
    return total, grad_hidden, grad_weight


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token losses over [N, H] hidden states; gradients are formed during the forward.

    The loss is the end of the graph, so d(loss)/d(logits) is known as soon as a chunk's
    log-sum-exp is: the forward turns each chunk's logits into their gradient in place and keeps
    only d(loss)/d(hidden) ([N, H], the size of the input) and d(loss)/d(head). Backward scales
    them by the incoming gradient; the head matmul runs once instead of being recomputed.
    """

    @staticmethod
    def forward(ctx, hidden2d, weight, targets, chunk_size, ignore_index, n_valid, want_grads, kernels):
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        row_scale = valid.float() / max(n_valid, 1)
        want_hidden = want_grads and ctx.needs_input_grad[0]
        want_weight = want_grads and ctx.needs_input_grad[1]
        total, grad_hidden, grad_weight = _chunk_pass(
            kernels, hidden2d, weight, safe_targets, valid, row_scale, chunk_size,
            want_hidden, want_weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / max(n_valid, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        one = bool(grad_loss == 1)  # the usual case: skip a rounding pass over bf16 gradients
        if grad_hidden is not None and not one:
            grad_hidden = (grad_hidden.float() * grad_loss).to(grad_hidden.dtype)
        if grad_weight is not None and not one:
            grad_weight = (grad_weight.float() * grad_loss).to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _chunked(kernels):
    def run(hidden, lm_head_weight, labels, chunk_size=1024, ignore_index=-100, shift=True):
        _check_inputs(hidden, lm_head_weight, labels, chunk_size)
        targets = _flat_targets(labels, shift, ignore_index)
        n_valid = int((targets != ignore_index).sum())
        hidden2d = hidden.reshape(-1, hidden.shape[-1])
        want_grads = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
        return _ChunkedCrossEntropy.apply(hidden2d, lm_head_weight, targets, chunk_size, ignore_index, n_valid,
                                          want_grads, kernels)
    return run


def _cpu_only(hidden: torch.Tensor, *args) -> str | None:
    return "not a CPU tensor" if hidden.device.type != "cpu" else dispatch_mode_check()


register(OP, [
    Kernel("compiled_chunks", _chunked(_COMPILED), compile_machine_check, _cpu_only),
    Kernel("chunks", _chunked(_EAGER)),
    Kernel("reference", reference_cross_entropy),
])


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = -100,
                          shift: bool = True) -> torch.Tensor:
    """Mean causal-LM cross-entropy of hidden @ lm_head_weight.T vs labels, chunk_size tokens at a time."""
    return call(OP, hidden, lm_head_weight, labels, chunk_size, ignore_index, shift)
