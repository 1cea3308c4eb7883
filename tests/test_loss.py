"""Chunked cross-entropy vs naive F.cross_entropy: values, gradients, ignore index, memory shape."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.model.loss import _ChunkedCE, chunked_cross_entropy, chunked_cross_entropy_per_token


def _data(n=37, h=16, v=101, seed=0, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = (0.3 * torch.randn(v, h, generator=g)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_matches_naive_values_and_grads(chunk):
    hidden, weight, targets = _data()
    s, n = chunked_cross_entropy(hidden, weight, targets, chunk)
    assert s.dtype == torch.float32 and int(n) == int((targets != -100).sum())
    (s / n).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="mean")
    ref.backward()
    torch.testing.assert_close(s / n, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, hidden.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, weight.grad, atol=1e-6, rtol=1e-5)
    assert gh[targets == -100].abs().max() == 0  # ignored rows get no gradient


def test_per_token_values_and_weighted_grads():
    hidden, weight, targets = _data(seed=1)
    per = chunked_cross_entropy_per_token(hidden, weight, targets, 7)
    ref = F.cross_entropy(hidden @ weight.t(), targets, ignore_index=-100, reduction="none")
    torch.testing.assert_close(per, ref, atol=1e-6, rtol=1e-6)
    assert (per[targets == -100] == 0).all()
    # Non-uniform upstream gradients (e.g. per-row sums combined with different weights).
    w = torch.linspace(0.1, 2.0, per.shape[0])
    gh, gw = torch.autograd.grad((per * w).sum(), (hidden, weight))
    rh, rw = torch.autograd.grad((ref * w).sum(), (hidden, weight))
    torch.testing.assert_close(gh, rh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-6, rtol=1e-5)


def test_hand_computed_value():
    # logits = [0, ln 3] for one row, target 0: loss = log(1 + 3) - 0.
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [float(torch.log(torch.tensor(3.0)))]])
    s, n = chunked_cross_entropy(hidden, weight, torch.tensor([0]), 4)
    assert int(n) == 1 and abs(s.item() - float(torch.log(torch.tensor(4.0)))) < 1e-6


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, _ = _data()
    targets = torch.full((hidden.shape[0],), -100)
    s, n = chunked_cross_entropy(hidden, weight, targets, 8)
    assert int(n) == 0 and s.item() == 0.0
    s.backward()
    assert weight.grad is not None and weight.grad.abs().sum() == 0
    assert hidden.grad is not None and hidden.grad.abs().sum() == 0


def test_only_weight_or_only_hidden_requires_grad():
    hidden, weight, targets = _data()
    h2 = hidden.detach()
    s, _ = chunked_cross_entropy(h2, weight, targets, 8)
    s.backward()
    assert weight.grad is not None and h2.grad is None


def test_bf16_inputs_give_fp32_loss_and_input_dtype_grads():
    hidden, weight, targets = _data()
    hb = hidden.detach().bfloat16().requires_grad_()
    wb = weight.detach().bfloat16().requires_grad_()
    s, n = chunked_cross_entropy(hb, wb, targets, 8)
    assert s.dtype == torch.float32
    s.backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref = F.cross_entropy(hb.float() @ wb.float().t(), targets, reduction="sum")
    torch.testing.assert_close(s, ref, atol=1e-4, rtol=1e-5)


def test_bad_targets_and_shapes_raise():
    hidden, weight, targets = _data()
    bad = targets.clone()
    bad[0] = weight.shape[0]
    with pytest.raises(ValueError, match="target ids"):
        chunked_cross_entropy(hidden, weight, bad, 8)
    with pytest.raises(ValueError, match="targets"):
        chunked_cross_entropy(hidden, weight, targets[:-1], 8)
    with pytest.raises(ValueError, match="mismatch"):
        chunked_cross_entropy(hidden, weight[:, :-1], targets, 8)


def test_saved_tensors_exclude_full_logits():
    """The autograd graph keeps only inputs and per-row lse, never an [N,V] block."""
    hidden, weight, targets = _data(n=64, v=97, ignore_frac=0.0)
    big = []

    def pack(t):
        if t.dim() == 2 and t.shape[1] == weight.shape[0]:
            big.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _ChunkedCE.apply(hidden, weight, targets, 8).sum().backward()
    assert big == []
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(hidden @ weight.t(), targets).backward()
    assert (64, 97) in big  # the same hook does see the naive logits
