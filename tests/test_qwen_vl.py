"""Multimodal glue: image slots, validation, zero grads without images, shifted packed loss, generate."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from train.model.config import get_config
from train.model.qwen_vl import QwenVL, shift_targets

# Small ids/vocab and a 4x4 query grid (16 slots) keep the test model and its logits tiny.
IDS = {"eod": 90, "im_start": 91, "im_end": 92, "img_start": 93, "img_end": 94, "img_pad": 95}
Q = 16
V = 100


def _cfg():
    return get_config("micro", llm={"vocab_size": V}, ids=IDS, adapter={"n_queries": Q, "pos_grid": 4})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QwenVL(_cfg()).eval()


def _span(slot_id: int = 95) -> list[int]:
    return [IDS["img_start"]] + [slot_id] * Q + [IDS["img_end"]]


def _text(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 90, (n,), generator=g).tolist()


def _batch():
    """Rows with 0, 2 and 1 images (all length T); images in row-major order."""
    rows = [
        _text(2 * (Q + 2) + 8, 1),
        _text(2, 2) + _span() + _text(3, 3) + _span() + _text(3, 4),
        _text(5, 5) + _span() + _text(Q + 5, 6),
    ]
    assert len({len(r) for r in rows}) == 1
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(7))
    return torch.tensor(rows), px


def _reference_logits(m: QwenVL, ids: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Independent placement: loop over rows/positions and overwrite slot embeddings by hand."""
    feats = m.adapter(m.visual(px))
    emb = m.llm.embed(ids).clone()
    k = 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            if int(ids[b, t]) == IDS["img_start"]:
                emb[b, t + 1 : t + 1 + Q] = feats[k]
                k += 1
    assert k == px.shape[0]
    return m.llm.logits(m.llm(emb))


def test_images_written_into_slots_in_row_major_order(model):
    ids, px = _batch()
    with torch.no_grad():
        out = model(ids, pixel_values=px).logits
        ref = _reference_logits(model, ids, px)
        # Slot token ids do not matter: they are overwritten.
        ids2 = ids.clone()
        ids2[(ids2 == IDS["img_pad"])] = 7
        out2 = model(ids2, pixel_values=px).logits
        # Swapping the two images of row 1 changes row 1 but not rows 0 and 2.
        out3 = model(ids, pixel_values=px[[1, 0, 2]]).logits
    assert out.shape == (3, ids.shape[1], V)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, out2, atol=0, rtol=0)
    assert (out3[1] - out[1]).abs().max() > 1e-4
    torch.testing.assert_close(out3[[0, 2]], out[[0, 2]], atol=0, rtol=0)


@pytest.fixture(scope="module")
def debug_model():
    """The test model with ``debug_checks``: image spans validated in the forward (host syncs)."""
    torch.manual_seed(0)
    cfg = _cfg()
    cfg.debug_checks = True
    return QwenVL(cfg).eval()


def test_image_count_and_span_validation(debug_model):
    model = debug_model
    ids, px = _batch()
    with pytest.raises(ValueError, match="3 <img> tokens .* 2 images"):
        model(ids, pixel_values=px[:2])
    with pytest.raises(ValueError, match="3 <img> tokens .* 0 images"):
        model(ids)
    bad = ids.clone()
    end_pos = 2 + Q + 1  # first </img> of row 1
    assert int(bad[1, end_pos]) == IDS["img_end"]
    bad[1, end_pos] = 5
    bad[0, 0] = IDS["img_end"]  # keep the </img> count equal so the span check is what fires
    with pytest.raises(ValueError, match=r"row 1, position 2"):
        model(bad, pixel_values=px)
    trunc = torch.tensor([_text(3, 9) + _span()[:-3]])
    trunc[0, 0] = IDS["img_end"]
    with pytest.raises(ValueError, match="truncated"):
        model(trunc, pixel_values=px[:1])


class _OpLog(TorchDispatchMode):
    """Records every aten op run under it (to see host syncs: ``_local_scalar_dense`` is what ``int()``,
    ``bool()`` and ``.item()`` run; ``nonzero`` syncs on CUDA to size its output)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


_SYNC_OPS = ("_local_scalar_dense", "nonzero", "item", "masked_select", "unique")


def test_embed_inputs_has_no_host_sync_unless_debug(model, debug_model):
    ids, px = _batch()
    with torch.no_grad(), _OpLog() as log:
        fast = model.embed_inputs(ids, px)
    with torch.no_grad(), _OpLog() as dlog:
        slow = debug_model.embed_inputs(ids, px)
    syncs = [op for op in log.ops if op.split(".")[0] in _SYNC_OPS]
    assert syncs == [], syncs
    assert any(op.split(".")[0] in _SYNC_OPS for op in dlog.ops)  # the probe sees the debug checks' syncs
    torch.testing.assert_close(fast, slow, atol=0, rtol=0)
    assert not torch.equal(fast, model.llm.embed(ids))  # the features did go into the slots


def test_uint8_pixels_are_normalised_on_the_device_like_the_data_pipeline(model):
    from data.images import normalize

    ids, _ = _batch()
    u8 = torch.randint(0, 256, (3, 3, 56, 56), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        a = model(ids, pixel_values=u8).logits
        b = model(ids, pixel_values=normalize(u8)).logits  # float: taken as already normalised
        c = model(ids, pixel_values=u8.float()).logits  # NOT normalised: different
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - c).abs().max() > 1e-3


def test_loss_matches_naive_shifted_cross_entropy(model):
    ids, px = _batch()
    labels = ids.clone()
    labels[ids == IDS["img_pad"]] = -100
    labels[:, :4] = -100
    out = model(ids, labels=labels, pixel_values=px)
    with torch.no_grad():
        logits = _reference_logits(model, ids, px)
    tgt = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    per = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(3, -1)
    n_ref = (tgt != -100).sum(1)
    torch.testing.assert_close(out.row_loss_sum, per.sum(1), atol=1e-4, rtol=1e-5)
    assert out.row_n_tokens.tolist() == n_ref.tolist()
    assert int(out.n_tokens) == int(n_ref.sum())
    torch.testing.assert_close(out.loss, per.sum() / n_ref.sum(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.loss_sum, per.sum(), atol=1e-4, rtol=1e-5)
    assert out.logits is None


def test_shift_targets_ignores_segment_boundaries_and_padding():
    labels = torch.tensor([[10, 11, 12, 20, 21, 0, 0]])
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0]])
    assert shift_targets(labels, seg).tolist() == [[11, 12, -100, 21, -100, -100, -100]]
    assert shift_targets(labels).tolist() == [[11, 12, 20, 21, 0, 0, -100]]


def test_packed_row_loss_equals_separate_rows(model):
    a = torch.tensor([_text(11, 11)])
    b = torch.tensor([_text(7, 12)])
    packed = torch.cat([a, b, torch.full((1, 4), IDS["eod"])], 1)
    seg = torch.tensor([[1] * 11 + [2] * 7 + [0] * 4])
    labels = packed.masked_fill(seg == 0, -100)
    with torch.no_grad():
        p = model(packed, labels=labels, segment_ids=seg)
        oa = model(a, labels=a)
        ob = model(b, labels=b)
    assert int(p.n_tokens) == int(oa.n_tokens) + int(ob.n_tokens) == 10 + 6
    torch.testing.assert_close(p.loss_sum, oa.loss_sum + ob.loss_sum, atol=1e-5, rtol=1e-5)


def test_packed_images_with_segments(model):
    a = torch.tensor([_text(3, 21) + _span() + _text(4, 22)])
    b = torch.tensor([_span() + _text(5, 23)])
    px = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    packed = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * a.shape[1] + [2] * b.shape[1]])
    with torch.no_grad():
        lp = model(packed, pixel_values=px, segment_ids=seg).logits
        la = model(a, pixel_values=px[:1]).logits
        lb = model(b, pixel_values=px[1:]).logits
    torch.testing.assert_close(lp, torch.cat([la, lb], 1), atol=1e-5, rtol=1e-5)


def test_no_image_batch_gives_zero_grads_to_vision_and_adapter():
    torch.manual_seed(1)
    m = QwenVL(_cfg()).train()
    ids = torch.tensor([_text(20, 30)])
    m(ids, labels=ids).loss.backward()
    for name, p in list(m.visual.named_parameters()) + list(m.adapter.named_parameters()):
        if p.requires_grad:
            assert p.grad is not None, name
            assert p.grad.abs().sum() == 0, name
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.llm.h.parameters())


def test_frozen_vision_runs_without_graph_and_adapter_still_trains():
    torch.manual_seed(2)
    m = QwenVL(_cfg()).train()
    m.visual.requires_grad_(False)
    seen = []
    m.visual.register_forward_hook(lambda mod, inp, out: seen.append(out.requires_grad))
    ids, px = _batch()
    m(ids, labels=ids, pixel_values=px).loss.backward()
    assert seen == [False]
    assert all(p.grad is None for p in m.visual.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.adapter.parameters())
    # Nothing trainable on the image side and no image: no dummy image is run at all.
    m.adapter.requires_grad_(False)
    seen.clear()
    m(ids[:1], labels=ids[:1]).loss.backward()
    assert seen == []
    # ...unless the engine asks for it (ZeRO-3: frozen towers are sharded, every rank must run them)
    m.always_run_image_path = True
    m(ids[:1], labels=ids[:1]).loss.backward()
    assert seen == [False]


def test_generate_greedy_matches_full_forward(model):
    ids = torch.tensor([_text(2, 40) + _span() + _text(3, 41)])
    px = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    out = model.generate(ids, pixel_values=px, max_new_tokens=5, eos_id=-1)
    assert out.shape == (1, ids.shape[1] + 5) and torch.equal(out[:, : ids.shape[1]], ids)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            nxt = model(seq, pixel_values=px).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)
    # eos stops generation right after it is produced
    first = int(seq[0, ids.shape[1]])
    stop = model.generate(ids, pixel_values=px, max_new_tokens=5, eos_id=first)
    assert stop.shape[1] == ids.shape[1] + 1


def test_generate_left_padded_batch_matches_single_rows(model):
    a, b = _text(6, 50), _text(3, 51)
    batch = torch.tensor([a, [IDS["eod"]] * 3 + b])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    out = model.generate(batch, max_new_tokens=4, eos_id=-1, attention_mask=mask)
    ra = model.generate(torch.tensor([a]), max_new_tokens=4, eos_id=-1)
    rb = model.generate(torch.tensor([b]), max_new_tokens=4, eos_id=-1)
    assert torch.equal(out[0, 6:], ra[0, 6:]) and torch.equal(out[1, 6:], rb[0, 3:])


def test_full_size_parameter_counts_on_meta():
    with torch.device("meta"):
        m = QwenVL(get_config("qwen_vl_9b6"))
    n = m.num_parameters()
    assert 9.60e9 <= n["total"] <= 9.70e9
    assert abs(n["visual"] / 1.84e9 - 1) < 0.015
    assert 0.07e9 <= n["adapter"] <= 0.10e9  # paper says 0.08B; exact count ~0.093B with pos_embed and proj
    assert abs(n["llm"] / 7.72e9 - 1) < 0.015
    assert n["total"] == n["visual"] + n["adapter"] + n["llm"]
    assert next(m.parameters()).is_meta
