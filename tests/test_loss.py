"""Output-head cross-entropy vs naive F.cross_entropy: values, gradients (incl. a scaled upstream grad),
ignore index, bf16 autocast, the fused path's forward-time gradients (no GEMM in backward, no [N,V] block,
no fp32 weight copy), and the QwenVL loss with each `model.loss_impl`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from train.model.loss import (
    _ChunkedCE,
    chunked_cross_entropy,
    chunked_cross_entropy_per_token,
    compute_dtype,
    linear_cross_entropy,
)

IMPLS = ["fused_fwd_grad", "chunked", "naive"]


def _data(n=37, h=16, v=101, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


class _OpLog(TorchDispatchMode):
    """Records (op name, output shape, output dtype) of every aten op run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple, torch.dtype | None]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        t = out[0] if isinstance(out, (tuple, list)) and out else out
        if isinstance(t, torch.Tensor):
            self.ops.append((func.__name__, tuple(t.shape), t.dtype))
        return out


# ----------------------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_sum_matches_naive_values_and_grads_with_scaled_upstream(impl, chunk):
    hidden, weight, targets = _data()
    out = linear_cross_entropy(hidden, weight, targets, chunk, impl)
    assert out.loss_sum.dtype == torch.float32 and out.loss_sum.dim() == 0
    (out.loss_sum * 0.37).backward()  # the token-weighted loss scales the sum by a scalar
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="sum")
    (ref * 0.37).backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, weight.grad, atol=1e-6, rtol=1e-5)
    assert gh[targets == -100].abs().max() == 0  # ignored rows get no gradient


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_side_output_is_detached_and_exact(impl):
    hidden, weight, targets = _data(seed=1)
    out = linear_cross_entropy(hidden, weight, targets, 7, impl)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="none")
    assert not out.per_token.requires_grad and out.per_token.dtype == torch.float32
    torch.testing.assert_close(out.per_token, ref.detach(), atol=1e-6, rtol=1e-6)
    assert (out.per_token[targets == -100] == 0).all()
    torch.testing.assert_close(out.per_token.sum(), out.loss_sum.detach(), atol=1e-5, rtol=1e-6)


def test_fused_grads_accumulate_over_two_calls():
    hidden, weight, targets = _data(seed=2)
    for k in (1.0, 0.5):
        (linear_cross_entropy(hidden, weight, targets, 8).loss_sum * k).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (F.cross_entropy(hidden @ weight.t(), targets, reduction="sum") * 1.5).backward()
    torch.testing.assert_close(gh, hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, weight.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_only_weight_or_only_hidden_requires_grad(impl):
    hidden, weight, targets = _data()
    ref_w = torch.autograd.grad(F.cross_entropy(hidden @ weight.t(), targets, reduction="sum"), weight)[0]
    h2 = hidden.detach()
    linear_cross_entropy(h2, weight, targets, 8, impl).loss_sum.backward()
    assert h2.grad is None
    torch.testing.assert_close(weight.grad, ref_w, atol=1e-6, rtol=1e-5)
    w2 = weight.detach()
    linear_cross_entropy(hidden, w2, targets, 8, impl).loss_sum.backward()
    assert w2.grad is None and hidden.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_gives_zero_loss_and_zero_grads(impl):
    hidden, weight, _ = _data()
    targets = torch.full((hidden.shape[0],), -100)
    out = linear_cross_entropy(hidden, weight, targets, 8, impl)
    assert out.loss_sum.item() == 0.0
    out.loss_sum.backward()
    assert weight.grad is not None and weight.grad.abs().sum() == 0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_hand_computed_value():
    # logits = [0, ln 3], target 0: loss = log(1 + 3); p = [1/4, 3/4]; dL/dh = (p - onehot) . w = 3/4 ln 3.
    hidden = torch.tensor([[1.0]], requires_grad=True)
    weight = torch.tensor([[0.0], [float(torch.log(torch.tensor(3.0)))]], requires_grad=True)
    out = linear_cross_entropy(hidden, weight, torch.tensor([0]), 4)
    assert abs(out.loss_sum.item() - float(torch.log(torch.tensor(4.0)))) < 1e-6
    out.loss_sum.backward()
    assert abs(hidden.grad.item() - 0.75 * float(torch.log(torch.tensor(3.0)))) < 1e-6
    torch.testing.assert_close(weight.grad, torch.tensor([[-0.75], [0.75]]))  # (p - onehot) h


# --------------------------------------------------------------------------------------- bf16 autocast
def test_compute_dtype_follows_autocast_then_inputs():
    h, w = torch.zeros(2, 4), torch.zeros(3, 4)
    assert compute_dtype(h, w) == torch.float32
    assert compute_dtype(h.bfloat16(), w.bfloat16()) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(h, w) == torch.bfloat16


@pytest.mark.parametrize("impl", ["fused_fwd_grad", "naive"])
def test_bf16_autocast_close_to_fp32_reference(impl):
    """Tolerance: the logits are rounded to bf16 (relative 2^-9, |logit| ~ 1-3 here, so ~0.5% per-token
    error, averaging out in the sum) and the gradient GEMMs take bf16 operands (relative error ~2^-8
    of each term, accumulated in fp32): 1e-3 relative on the sum, 2% relative norm on the gradients.
    The same bounds hold for the naive autocast path, which is the behaviour being matched."""
    hidden, weight, targets = _data(n=64, h=32, v=211, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(hidden, weight, targets, 16, impl)
    assert out.loss_sum.dtype == torch.float32
    (out.loss_sum * 0.37).backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (ref * 0.37).backward()
    assert abs(out.loss_sum.item() - ref.item()) < 1e-3 * ref.item()
    assert _rel(gh, hidden.grad) < 2e-2 and _rel(gw, weight.grad) < 2e-2
    assert float((out.loss_sum - ref).detach().abs()) > 0  # it really ran in bf16 (fp32 would agree to ~1e-6)


def test_bf16_weights_give_fp32_loss_and_input_dtype_grads():
    hidden, weight, targets = _data()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    out = linear_cross_entropy(hb, wb, targets, 8)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = F.cross_entropy((hb @ wb.t()).float(), targets, reduction="sum")
    assert abs(out.loss_sum.item() - ref.item()) < 1e-3 * ref.item()


# --------------------------------------------------------------------------- what the fused path does
def test_fused_backward_runs_no_gemm_and_forward_no_full_logits_or_fp32_weight():
    n, v, chunk = 64, 97, 16
    hidden, weight, targets = _data(n=n, v=v, ignore_frac=0.0)
    hb, wb = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    fwd = _OpLog()
    with fwd:
        s = linear_cross_entropy(hb, wb, targets, chunk).loss_sum
    bwd = _OpLog()
    with bwd:
        (s * 0.37).backward()
    gemms = ("mm", "addmm", "addmm_", "bmm", "matmul")
    assert sum(op.split(".")[0] in gemms for op, _, _ in fwd.ops) == 3 * (n // chunk)  # logits, grad_h, grad_w
    assert not [op for op, _, _ in bwd.ops if op.split(".")[0] in gemms]  # backward only scales
    assert not [o for o in fwd.ops if len(o[1]) == 2 and o[1][1] == v and o[1][0] > chunk]  # no [N,V]
    assert not [o for o in fwd.ops if o[1] == (v, hidden.shape[1]) and o[2] == torch.float32]  # no fp32 W


def test_fused_under_no_grad_skips_gradient_gemms():
    hidden, weight, targets = _data(n=32, ignore_frac=0.0)
    log = _OpLog()
    with torch.no_grad(), log:
        out = linear_cross_entropy(hidden, weight, targets, 8)
    assert sum(op.split(".")[0] in ("mm", "addmm", "addmm_") for op, _, _ in log.ops) == 4  # logits only
    ref = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-5, rtol=1e-6)


def test_fused_backward_twice_is_a_clear_error():
    hidden, weight, targets = _data()
    s = linear_cross_entropy(hidden, weight, targets, 8).loss_sum
    s.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        s.backward()


def test_saved_tensors_exclude_full_logits():
    """The chunked path keeps only inputs and per-row lse; the fused path saves nothing for backward."""
    hidden, weight, targets = _data(n=64, v=97, ignore_frac=0.0)
    big, saved = [], []

    def pack(t):
        saved.append(tuple(t.shape))
        if t.dim() == 2 and t.shape[1] == weight.shape[0]:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ChunkedCE.apply(hidden, weight, targets, 8).sum().backward()
    assert big == []
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(hidden, weight, targets, 8).loss_sum.backward()
    assert big == [] and all(s[0] == 64 or len(s) < 2 for s in saved), saved  # at most the row index
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(hidden @ weight.t(), targets).backward()
    assert (64, 97) in big  # the same hook does see the naive logits


# --------------------------------------------------------------------------------- errors, old API, liger
def test_bad_targets_shapes_and_impl_raise():
    hidden, weight, targets = _data()
    bad = targets.clone()
    bad[0] = weight.shape[0]
    with pytest.raises(ValueError, match="target ids"):
        linear_cross_entropy(hidden, weight, bad, 8)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1], 8)
    with pytest.raises(ValueError, match="mismatch"):
        linear_cross_entropy(hidden, weight[:, :-1], targets, 8)
    with pytest.raises(ValueError, match="model.loss_impl"):
        linear_cross_entropy(hidden, weight, targets, 8, "fast")


def test_chunked_per_token_api_keeps_per_row_weighted_grads():
    hidden, weight, targets = _data(seed=1)
    per = chunked_cross_entropy_per_token(hidden, weight, targets, 7)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="none")
    w = torch.linspace(0.1, 2.0, per.shape[0])
    gh, gw = torch.autograd.grad((per * w).sum(), (hidden, weight))
    rh, rw = torch.autograd.grad((ref * w).sum(), (hidden, weight))
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)
    s, n = chunked_cross_entropy(hidden, weight, targets, 5)
    assert int(n) == int((targets != -100).sum())
    torch.testing.assert_close(s, ref.sum(), atol=1e-5, rtol=1e-6)


def test_liger_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the liger path is exercised by test_liger_matches_naive_on_cuda")
    hidden, weight, targets = _data()
    with pytest.raises(RuntimeError, match="loss_impl=liger needs a CUDA device"):
        linear_cross_entropy(hidden, weight, targets, 8, "liger")


@pytest.mark.gpu
def test_liger_matches_naive_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (Liger's kernels are Triton)")
    pytest.importorskip("liger_kernel")
    hidden, weight, targets = (t.cuda() for t in _data(n=256, h=64, v=1031))
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    out = linear_cross_entropy(hidden, weight, targets, 64, "liger")
    assert out.per_token is None
    (out.loss_sum * 0.37).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = linear_cross_entropy(hidden, weight, targets, 64, "naive").loss_sum
    (ref * 0.37).backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-3, rtol=1e-4)
    assert _rel(gh, hidden.grad) < 1e-3 and _rel(gw, weight.grad) < 1e-3


# ------------------------------------------------------------------------------------------- the model
def _micro_model(impl: str):
    from train.model.config import micro
    from train.model.qwen_vl import QwenVL

    cfg = micro()
    cfg.loss_impl, cfg.loss_chunk_tokens = impl, 8
    torch.manual_seed(0)
    return QwenVL(cfg)


def test_qwen_vl_loss_and_grads_match_across_impls():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    seg = torch.ones_like(ids)
    seg[1, 12:] = 2
    outs = {}
    for impl in IMPLS:
        model = _micro_model(impl)
        out = model(ids, labels=labels, segment_ids=seg)
        (out.loss_sum * 0.37).backward()
        outs[impl] = (out, model.llm.lm_head.weight.grad.clone(), model.llm.wte.weight.grad.clone())
    ref, ref_head, ref_wte = outs["naive"]
    assert int(ref.n_tokens) == int(ref.row_n_tokens.sum()) == (23 - 4) + (23 - 1)  # shift, prompt, boundary
    for impl in ("fused_fwd_grad", "chunked"):
        out, head, wte = outs[impl]
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.row_loss_sum, ref.row_loss_sum, atol=1e-5, rtol=1e-6)
        assert not out.row_loss_sum.requires_grad
        assert _rel(head, ref_head) < 1e-5 and _rel(wte, ref_wte) < 1e-5, impl  # fp32 through 2 blocks
