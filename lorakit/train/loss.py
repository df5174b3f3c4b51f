"""Causal-LM cross-entropy computed chunk by chunk, so the full [tokens, vocab] fp32 logits never exist.

With a 128k vocabulary, B*T = 16k tokens give 8 GB of fp32 logits plus as much again for their
log-softmax saved for backward; this is often the largest single allocation of a LoRA run.
`chunked_cross_entropy` takes the last hidden states and the head weight instead of logits: the
forward computes logits for `chunk_size` tokens at a time and keeps only each token's
log-sum-exp, and the backward recomputes each chunk's logits to form its gradient. The peak extra
memory is one chunk's logits (a few of them while the softmax gradient is formed), not B*T*V.

Both functions return the mean over supervised tokens (labels != ignore_index), like
`F.cross_entropy`, except that a batch with no supervised token gives 0 (and zero gradients)
instead of NaN, so one fully masked batch does not poison a run.
"""

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError


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


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of token losses over [N, H] hidden states; saves only inputs and per-token log-sum-exp."""

    @staticmethod
    def forward(ctx, hidden2d, weight, targets, chunk_size, ignore_index, n_valid):
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        logsumexp = torch.empty(hidden2d.shape[0], dtype=torch.float32, device=hidden2d.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden2d.device)
        for start in range(0, hidden2d.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            # The matmul runs in the input dtype (as the model's lm_head would); softmax math in fp32.
            logits = (hidden2d[rows] @ weight.t()).float()
            logsumexp[rows] = torch.logsumexp(logits, dim=-1)
            target_logit = logits.gather(1, safe_targets[rows, None]).squeeze(1)
            total += ((logsumexp[rows] - target_logit) * valid[rows]).sum()
        ctx.save_for_backward(hidden2d, weight, safe_targets, valid, logsumexp)
        ctx.chunk_size = chunk_size
        ctx.n_valid = n_valid
        return total / max(n_valid, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden2d, weight, safe_targets, valid, logsumexp = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        scale = grad_loss.float() / max(ctx.n_valid, 1)
        grad_hidden = torch.empty_like(hidden2d) if need_hidden else None
        # fp32 accumulation across chunks: a bf16 running sum would round at every chunk.
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden2d.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            hidden_chunk = hidden2d[rows]
            logits = (hidden_chunk @ weight.t()).float()
            # d(lse - logit_y)/dlogits = softmax - onehot(y); ignored rows get zero.
            grad_logits = torch.exp_(logits.sub_(logsumexp[rows, None]))
            grad_logits.scatter_add_(1, safe_targets[rows, None],
                                     torch.full_like(logsumexp[rows, None], -1.0))
            grad_logits.mul_((valid[rows] * scale)[:, None])
            grad_logits = grad_logits.to(hidden2d.dtype)
            if need_hidden:
                grad_hidden[rows] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ hidden_chunk).float()
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          chunk_size: int = 1024, ignore_index: int = -100,
                          shift: bool = True) -> torch.Tensor:
    """Mean causal-LM cross-entropy of hidden @ lm_head_weight.T vs labels, chunk_size tokens at a time."""
    _check_inputs(hidden, lm_head_weight, labels, chunk_size)
    targets = _flat_targets(labels, shift, ignore_index)
    n_valid = int((targets != ignore_index).sum())
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedCrossEntropy.apply(hidden2d, lm_head_weight, targets, chunk_size, ignore_index, n_valid)
