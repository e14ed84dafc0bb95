"""The training loss's output head, fused and chunked: tied-embedding logits, their
log-sum-exp and cross-entropy, and the gradients, a few thousand tokens at a time.

Why: with GPT-2's vocabulary the head is most of the model's FLOPs and nearly all of
its activation memory. The plain path (``F.cross_entropy(F.linear(h, W))``) keeps
the (tokens x vocab) logits for backward, makes an fp32 copy of them for the softmax,
and its gradient is another tensor of that size: at batch 64 x 256 that is 16,384 x
50,304 values per tensor, gigabytes moved per step for a few megabytes of result.
Here each chunk's logits live only while that chunk is processed. Because the loss
is the last thing the forward pass computes, the gradients with respect to the
hidden states, the weight and the logit bias are already known when the chunk's
softmax is, so they are computed in the forward pass (as Liger Kernel's fused linear
cross-entropy does) and backward only scales them by the incoming gradient.

Numerics match the plain path under bf16 autocast: the matmuls run in the autocast
dtype, the log-sum-exp, softmax and loss in fp32, and the weight and bias gradients
are summed over chunks in fp32. The logits are computed against the whole padded
weight (a vocabulary padded to a multiple of 64 keeps the matmuls' shapes aligned
for tensor cores); the padding columns are left out of the log-sum-exp and their
gradient is zero, so they can never be predicted, exactly as if they did not exist.
"""

from __future__ import annotations

import torch

from tga.schema import LOSS_CHUNK_TOKENS

IGNORE_INDEX = -100  # targets with this value are not scored, as in F.cross_entropy


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmuls run in: autocast's, when it is on for the tensor's
    device, as it would be for ``F.linear`` in the plain path."""
    device_type = tensor.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tensor.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T (+ bias)`` over the first
    ``vocab_size`` columns, targets == IGNORE_INDEX not counted; see the module doc.

    hidden (N, d), weight (V_padded, d), bias (V_padded,) or None, targets (N,) long.
    With no target counted the loss is NaN (0/0) and the gradients are zero, as with
    F.cross_entropy's mean.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, vocab_size: int, chunk_tokens: int) -> torch.Tensor:
        dtype = _compute_dtype(hidden)
        accumulate = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        h, w = hidden.to(dtype), weight.to(dtype)
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_bias = bias is not None and ctx.needs_input_grad[2]
        counted = targets != IGNORE_INDEX
        # 1/count, inf when nothing is counted: the loss (0 * inf) is then NaN, as
        # F.cross_entropy's mean over no targets is; rows not counted weigh 0, not 0 * inf.
        inverse_count = 1.0 / counted.sum().to(accumulate)
        row_weight = torch.where(counted, inverse_count, torch.zeros_like(inverse_count))
        loss_sum = torch.zeros((), dtype=accumulate, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if want_bias else None
        for start in range(0, hidden.size(0), chunk_tokens):
            stop = start + chunk_tokens
            h_chunk, t_chunk, c_chunk = h[start:stop], targets[start:stop], counted[start:stop]
            logits = (h_chunk @ w.T).to(accumulate)  # a fresh tensor this loop may overwrite
            if bias is not None:
                logits += bias.to(accumulate)
            real = logits[:, :vocab_size]
            lse = torch.logsumexp(real, dim=-1)
            safe_targets = torch.where(c_chunk, t_chunk, torch.zeros_like(t_chunk))[:, None]
            target_logit = real.gather(1, safe_targets).squeeze(1)
            loss_sum = loss_sum + torch.where(c_chunk, lse - target_logit, torch.zeros_like(lse)).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # d loss / d logits = (softmax - onehot(target)) / count on counted rows, 0 elsewhere;
            # computed in place over the logits, so a chunk holds one (chunk x vocab) fp32 buffer.
            grad_logits = logits.sub_(lse[:, None]).exp_()
            grad_logits[:, vocab_size:] = 0.0
            grad_logits.scatter_add_(1, safe_targets, torch.full_like(lse, -1.0)[:, None])
            grad_logits.mul_(row_weight[start:stop, None])
            g = grad_logits.to(dtype)
            if want_hidden:
                grad_hidden[start:stop] = g @ w
            if want_weight:
                grad_weight += (g.T @ h_chunk).to(accumulate)
            if want_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss_sum * inverse_count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
            None if grad_bias is None else (grad_bias * scale).to(ctx.bias_dtype),
            None, None, None,
        )


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, vocab_size: int,
                          chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight[:vocab_size], bias[:vocab_size]),
    targets, ignore_index=-100)`` without materialising the logits: hidden (..., d),
    targets (...)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.size(-1)), weight, bias, targets.reshape(-1),
                                           vocab_size, chunk_tokens)
