"""Chunked cross-entropy over a large vocabulary without materialising [N,V] fp32 logits.

A custom autograd Function computes logits for `chunk_tokens` rows at a time in fp32, keeps only
the per-row log-sum-exp, and recomputes each chunk's logits in backward. Peak extra memory is
one [chunk,V] fp32 block (plus an fp32 copy of the weight and its fp32 gradient accumulator when
the weight is half precision) instead of [N,V]. Rows whose target is -100 are dropped before
the matmul, so prompt and padding tokens cost nothing.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _ChunkedCE(torch.autograd.Function):
    """Per-row CE for rows that all have a valid target. Returns fp32 losses [n]."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):  # noqa: ANN001
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.float()
            n = hidden.shape[0]
            losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            for s in range(0, n, chunk):
                logits = hidden[s : s + chunk].float() @ w.t()
                lse_c = torch.logsumexp(logits, dim=-1)
                tgt = logits.gather(1, targets[s : s + chunk, None]).squeeze(1)
                lse[s : s + chunk] = lse_c
                losses[s : s + chunk] = lse_c - tgt
                del logits
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk = chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):  # noqa: ANN001
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk = ctx.chunk
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.float()
            g = grad_losses.float()
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].float()
                # d(lse - logit_t)/dlogits = softmax - onehot(t), scaled by the upstream grad.
                dlogits = (h @ w.t()).sub_(lse[s : s + chunk, None]).exp_()
                gc = g[s : s + chunk]
                dlogits.mul_(gc[:, None])
                dlogits.scatter_add_(1, targets[s : s + chunk, None], -gc[:, None])
                if need_h:
                    grad_h[s : s + chunk] = (dlogits @ w).to(hidden.dtype)
                if need_w:
                    grad_w.addmm_(dlogits.t(), h)
                del dlogits
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def chunked_cross_entropy_per_token(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Per-token CE losses [N] in fp32 (0 where target == -100); differentiable wrt hidden and weight.

    hidden [N,H], weight [V,H] (logits = hidden @ weight.T), targets [N] Long.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked CE: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} mismatch")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked CE: targets {tuple(targets.shape)} != hidden rows {hidden.shape[0]}")
    if chunk_tokens < 1:
        raise ValueError(f"chunked CE: chunk_tokens must be >= 1, got {chunk_tokens}")
    valid = targets != IGNORE_INDEX
    idx = valid.nonzero().squeeze(1)
    tv = targets[idx]
    if tv.numel() and (int(tv.min()) < 0 or int(tv.max()) >= weight.shape[0]):
        raise ValueError(
            f"chunked CE: target ids must be -100 or in [0, {weight.shape[0]}), got "
            f"min {int(tv.min())} max {int(tv.max())}"
        )
    # An empty selection still runs the Function so hidden/weight get (zero) gradients.
    losses = _ChunkedCE.apply(hidden[idx], weight, tv, int(chunk_tokens))
    return losses.new_zeros(hidden.shape[0]).index_put((idx,), losses)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over valid tokens as an fp32 scalar, number of valid tokens as a Long scalar)."""
    losses = chunked_cross_entropy_per_token(hidden, weight, targets, chunk_tokens)
    return losses.sum(), (targets != IGNORE_INDEX).sum()
