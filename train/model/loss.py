"""Cross-entropy of the output head over a large vocabulary without materialising [N,V] logits.

`linear_cross_entropy(hidden, weight, targets, chunk_tokens, impl)` is the model's loss entry point. It
returns a `HeadLoss`: the sum of CE over valid rows as a differentiable fp32 scalar, and the per-token
losses as a detached side output (per-task logging). Rows whose target is -100 are dropped before any
matmul, so prompt, image-slot and padding tokens cost nothing. Implementations (`model.loss_impl`):

- `fused_fwd_grad` (default): logits GEMM in the compute dtype (bf16 under autocast, else the input
  dtype; no fp32 copy of the weight), log-softmax in fp32, and each chunk's gradients wrt hidden and
  weight computed right away in the forward pass. The loss is a sum, so its upstream gradient is one
  scalar g and backward only scales the stored gradients by g: no logits recomputation. Costs three
  GEMMs per chunk (logits, grad_h, grad_w) instead of four, and one [chunk,V] fp32 block (plus, under
  bf16, one [chunk,V] bf16 block) at a time; the weight gradient ([V,H], in fp32 for fp32 weights)
  is held from forward to backward.
- `chunked`: the previous path (fp32 logits per chunk, lse saved, logits recomputed in backward).
- `naive`: full [n,V] logits and F.cross_entropy (reference; large memory).
- `liger`: Liger-Kernel's fused linear cross-entropy (CUDA + `liger-kernel` installed; no per-token
  losses, so per-task losses are not available with it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_IMPLS = ("fused_fwd_grad", "chunked", "naive", "liger")


class HeadLoss(NamedTuple):
    loss_sum: torch.Tensor  # fp32 scalar, differentiable wrt hidden and weight
    per_token: torch.Tensor | None  # [N] fp32, detached, 0 where target == -100; None if the impl has none


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMMs run in: the autocast dtype when autocast is on for hidden's device,
    else the promoted input dtype (what F.linear would do)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ------------------------------------------------------------------------------ fused forward-gradient
def _softmax_grad(logits: torch.Tensor, targets: torch.Tensor, need_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(dlogits = softmax - onehot in logits' dtype, written over `logits`; per-row CE in fp32).

    One [c,V] fp32 block besides `logits`: the log-softmax runs in place on the fp32 logits (the row-wise
    kernels on CPU and CUDA finish a row's max and sum before writing it, and the write pass is
    elementwise, so input and output may alias; tests/test_loss.py checks the values), then its exp is
    copied back into the compute-dtype buffer."""
    lf = logits if logits.dtype == torch.float32 else logits.float()
    ls = torch.log_softmax(lf, dim=-1, out=lf)
    tgt_ls = ls.gather(1, targets[:, None]).squeeze(1)
    losses = -tgt_ls
    if not need_grad:
        return None, losses
    d = ls.exp_()
    if logits.dtype != torch.float32:  # exp_ then copy_: exp(out=) with a narrower dtype would allocate fp32
        d = logits.copy_(d)
    rows = torch.arange(targets.shape[0], device=targets.device)
    d.index_put_((rows, targets), (tgt_ls.exp() - 1.0).to(d.dtype))  # p_t - 1 in fp32, rounded once
    return d, losses


class _FusedLinearCE(torch.autograd.Function):
    """Sum of CE over rows that all have a valid target; gradients computed in forward.

    Returns (sum fp32 scalar, per-row losses [n] fp32, non-differentiable)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, cdtype, need_h, need_w):  # noqa: ANN001
        dev = hidden.device.type
        with torch.autocast(device_type=dev, enabled=False):
            h, w = hidden.to(cdtype), weight.to(cdtype)  # no copy when already in the compute dtype
            n = h.shape[0]
            losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            # fp32 master weights keep an fp32 accumulator (their grad is fp32 anyway); half-precision
            # weights accumulate in their own dtype, as their gradient is stored in it.
            acc = torch.float32 if weight.dtype == torch.float32 else weight.dtype
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for s in range(0, n, chunk):
                hc, tc = h[s : s + chunk], targets[s : s + chunk]
                d, losses[s : s + chunk] = _softmax_grad(hc @ w.t(), tc, need_h or need_w)
                if need_h:
                    grad_h[s : s + chunk] = d @ w
                if need_w:
                    if grad_w.dtype == d.dtype:
                        grad_w.addmm_(d.t(), hc)
                    else:
                        grad_w.add_(d.t() @ hc)
                del d
        # Plain attributes, not save_for_backward: these are results, not inputs, and backward consumes them.
        ctx.grads = (grad_h, grad_w)
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, _grad_rows):  # noqa: ANN001
        if ctx.grads is None:
            raise RuntimeError("fused linear cross-entropy: backward ran twice (retain_graph is not supported)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # scale in place and hand the buffers over: no second [V,H] copy
        for grad in (grad_h, grad_w):
            if grad is not None:
                grad.mul_(grad_sum)  # a 0-d tensor: no host sync, no dtype promotion of the buffer
        return grad_h, grad_w, None, None, None, None, None


# ------------------------------------------------------------------------------------- chunked (old)
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


# ------------------------------------------------------------------------------------------ entry points
def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear CE: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} mismatch")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear CE: targets {tuple(targets.shape)} != hidden rows {hidden.shape[0]}")
    if chunk_tokens < 1:
        raise ValueError(f"linear CE: chunk_tokens must be >= 1, got {chunk_tokens}")


def _valid_rows(targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of rows with a target, their targets); out-of-range ids are an error."""
    idx = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    tv = targets[idx]
    if tv.numel() and (int(tv.min()) < 0 or int(tv.max()) >= vocab):
        raise ValueError(
            f"linear CE: target ids must be -100 or in [0, {vocab}), got min {int(tv.min())} max {int(tv.max())}"
        )
    return idx, tv


def _liger_sum(hv: torch.Tensor, weight: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    if not hv.is_cuda:
        raise RuntimeError("model.loss_impl=liger needs a CUDA device (Liger's kernels are Triton); "
                           "use model.loss_impl=fused_fwd_grad")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # type: ignore[import-not-found]
    except ImportError as err:
        raise RuntimeError("model.loss_impl=liger needs the liger-kernel package (pip install liger-kernel)") from err
    cd = compute_dtype(hv, weight)
    # Explicit casts (differentiable) so the kernel sees one dtype; the fp32 master weight gets its grad back.
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(weight.to(cd), hv.to(cd), tv)
    return (loss[0] if isinstance(loss, tuple) else loss).float()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_tokens: int = 1024,
    impl: str = "fused_fwd_grad",
) -> HeadLoss:
    """CE of logits = hidden @ weight.T against targets: (differentiable fp32 sum, detached per-token [N]).

    hidden [N,H], weight [V,H], targets [N] Long (-100 = no target). Only rows with a target go through
    the head. Gradients reach hidden and weight through autograd (so ZeRO-3's parameter hooks see them).
    """
    _check(hidden, weight, targets, chunk_tokens)
    if impl not in LOSS_IMPLS:
        raise ValueError(f"model.loss_impl must be one of {', '.join(LOSS_IMPLS)}; got {impl!r}")
    idx, tv = _valid_rows(targets, weight.shape[0])
    hv = hidden[idx]
    if impl == "liger":
        return HeadLoss(_liger_sum(hv, weight, tv), None)
    if impl == "fused_fwd_grad":
        grad_on = torch.is_grad_enabled()
        # An empty selection still runs the Function so hidden/weight get (zero) gradients.
        loss_sum, rows = _FusedLinearCE.apply(hv, weight, tv, int(chunk_tokens), compute_dtype(hidden, weight),
                                              grad_on and hidden.requires_grad, grad_on and weight.requires_grad)
    elif impl == "chunked":
        rows = _ChunkedCE.apply(hv, weight, tv, int(chunk_tokens))
        loss_sum = rows.sum()
    else:  # naive
        rows = F.cross_entropy(F.linear(hv, weight).float(), tv, reduction="none")
        loss_sum = rows.sum()
    per_token = rows.detach().new_zeros(hidden.shape[0]).index_put_((idx,), rows.detach())
    return HeadLoss(loss_sum, per_token)


def chunked_cross_entropy_per_token(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> torch.Tensor:
    """Per-token CE losses [N] in fp32 (0 where target == -100); differentiable wrt hidden and weight
    through the `chunked` path (any per-row upstream weighting)."""
    _check(hidden, weight, targets, chunk_tokens)
    idx, tv = _valid_rows(targets, weight.shape[0])
    # An empty selection still runs the Function so hidden/weight get (zero) gradients.
    losses = _ChunkedCE.apply(hidden[idx], weight, tv, int(chunk_tokens))
    return losses.new_zeros(hidden.shape[0]).index_put((idx,), losses)


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of CE over valid tokens as an fp32 scalar, number of valid tokens as a Long scalar)."""
    losses = chunked_cross_entropy_per_token(hidden, weight, targets, chunk_tokens)
    return losses.sum(), (targets != IGNORE_INDEX).sum()
