"""Box/quad normalisation, formatting and parsing against hand-computed values.

Rule under test: n = floor(v / size * 999 + 0.5), clamped to [0, 999].
"""

import math

import numpy as np
import pytest

from data.boxes import (
    InvalidBox,
    box_iou,
    box_to_quad,
    denormalize_box,
    denormalize_quad,
    format_box,
    format_quad,
    format_ref,
    normalize_box,
    normalize_quad,
    parse_boxes,
    parse_first_box,
    parse_grounding,
    parse_quads,
    parse_refs,
    xywh_to_xyxy,
)


def test_normalize_box_hand_values():
    assert normalize_box(0, 0, 640, 480, 640, 480) == (0, 0, 999, 999)  # full image
    # 10/100*999 = 99.9 -> 100; 20 -> 199.8 -> 200; 30 -> 299.7 -> 300; 40 -> 399.6 -> 400
    assert normalize_box(10, 20, 30, 40, 100, 100) == (100, 200, 300, 400)
    # 100/640*999 = 156.09 -> 156; 50/480*999 = 104.06 -> 104; 200/640*999 = 312.19 -> 312; 300/480*999 = 624.38 -> 624
    assert normalize_box(100, 50, 200, 300, 640, 480) == (156, 104, 312, 624)
    # 2.5/10*999 = 249.75 -> 250
    assert normalize_box(2.5, 0, 5, 10, 10, 10) == (250, 0, 500, 999)  # 5/10*999 = 499.5 -> half up -> 500
    # the 3-argument form used by the demo corpus gives the same
    assert normalize_box((100, 50, 200, 300), 640, 480) == (156, 104, 312, 624)
    # numeric strings (CSV input) and numpy scalars are accepted
    assert normalize_box("10", np.float32(20), 30, 40, 100, 100) == (100, 200, 300, 400)


def test_normalize_box_clamps_to_image():
    assert normalize_box(-20, -5, 700, 500, 640, 480) == (0, 0, 999, 999)
    # 600/640*999 = 936.56 -> 937; 420/480*999 = 874.125 -> 874; x2, y2 beyond the image clamp to 999
    assert normalize_box(600, 420, 700, 520, 640, 480) == (937, 874, 999, 999)


@pytest.mark.parametrize("args", [
    (700, 10, 800, 20, 640, 480),      # entirely right of the image: clamps to x1 == x2 == 999
    (5, 5, 5, 50, 100, 100),           # zero width
    (10, 10, 10.04, 50, 100, 100),     # thinner than a grid cell: 100.3 and 100.7 both round to 100
    (30, 10, 20, 40, 100, 100),        # inverted x
    (10, 40, 20, 30, 100, 100),        # inverted y
    (float("nan"), 0, 10, 10, 100, 100),
    (0, 0, float("inf"), 10, 100, 100),
    ("abc", 0, 10, 10, 100, 100),
    (0, 0, 10, 10, 0, 100),            # zero-size image
    (0, 0, 10, 10, 100, -5),
])
def test_normalize_box_rejects(args):
    with pytest.raises(InvalidBox):
        normalize_box(*args)


def test_normalize_box_bad_arity():
    with pytest.raises(TypeError):
        normalize_box(1, 2, 3, 4)  # type: ignore[arg-type]
    with pytest.raises(InvalidBox):
        normalize_box((1, 2, 3), 10, 10)


def test_roundtrip_matches_official_denormalisation():
    # official eval: pixel = n / 999 * size; our rule inverts it to within half a grid cell
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = rng.integers(20, 3000, size=2)
        x1, x2 = sorted(rng.uniform(0, w, size=2))
        y1, y2 = sorted(rng.uniform(0, h, size=2))
        try:
            n = normalize_box(x1, y1, x2, y2, w, h)
        except InvalidBox:
            continue
        d = denormalize_box(n, w, h)
        for got, want, size in zip(d, (x1, y1, x2, y2), (w, h, w, h)):
            assert abs(got - want) <= 0.5 * size / 999 + 1e-9
    assert denormalize_box((156, 104, 312, 624), 640, 480) == pytest.approx(
        (156 / 999 * 640, 104 / 999 * 480, 312 / 999 * 640, 624 / 999 * 480))


def test_xywh():
    assert xywh_to_xyxy([10, 20, 30, 40]) == (10, 20, 40, 60)
    with pytest.raises(InvalidBox):
        xywh_to_xyxy([10, 20, -1, 40])
    with pytest.raises(InvalidBox):
        xywh_to_xyxy([10, 20, 30])


def test_quads():
    pts = [(10, 20), (30, 20), (30, 40), (10, 40)]
    want = (100, 200, 300, 200, 300, 400, 100, 400)
    assert normalize_quad(pts, 100, 100) == want
    assert normalize_quad([10, 20, 30, 20, 30, 40, 10, 40], 100, 100) == want  # flat form
    # a rotated quad, partly outside: (-10,50) clamps to x 0; 50/200*999 = 249.75 -> 250
    assert normalize_quad([(50, -10), (110, 50), (50, 110), (-10, 50)], 100, 200) == (
        500, 0, 999, 250, 500, 549, 0, 250)  # 110/200*999 = 549.45 -> 549
    with pytest.raises(InvalidBox):
        normalize_quad([(0, 0), (10, 10), (20, 20), (30, 30)], 100, 100)  # collinear: zero area
    with pytest.raises(InvalidBox):
        normalize_quad([(0, 0), (10, 10), (20, 20)], 100, 100)
    assert box_to_quad((1, 2, 3, 4)) == (1, 2, 3, 2, 3, 4, 1, 4)


def test_format():
    assert format_box([1, 2, 3, 4]) == "<box>(1,2),(3,4)</box>"
    assert format_box((0, 0, 999, 999)) == "<box>(0,0),(999,999)</box>"
    assert format_quad((1, 2, 3, 2, 3, 4, 1, 4)) == "<quad>(1,2),(3,2),(3,4),(1,4)</quad>"
    assert format_ref(" a dog ") == "<ref>a dog</ref>"
    for bad in ([0, 0, 1000, 5], [0, 0, -1, 5], [0.5, 0, 1, 1], [1, 2, 3]):
        with pytest.raises(InvalidBox):
            format_box(bad)
    with pytest.raises(ValueError):
        format_ref("   ")
    with pytest.raises(ValueError):
        format_ref("a <box> inside")


def test_parse():
    text = "<ref>a dog</ref><box>(1,2),(3,4)</box> and <ref>two cats</ref><box>(5,6),(7,8)</box><box>(9,10),(11,12)</box>"
    assert parse_boxes(text) == [(1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12)]
    assert parse_refs(text) == [("a dog", [(1, 2, 3, 4)]), ("two cats", [(5, 6, 7, 8), (9, 10, 11, 12)])]
    # the official RefCOCO parse: the first pair of points, opening <box> already in the prompt
    assert parse_first_box("(12,34),(56,78)</box><|endoftext|>") == (12, 34, 56, 78)
    assert parse_first_box("( 1 , 2 ),( 3 , 4 )") == (1, 2, 3, 4)
    assert parse_first_box("no box here") is None
    assert parse_boxes("<box>(1,2)</box>") == []  # malformed boxes are not invented
    q = format_quad((1, 2, 3, 2, 3, 4, 1, 4))
    assert parse_quads("<ref>x</ref>" + q + q) == [(1, 2, 3, 2, 3, 4, 1, 4)] * 2
    # format -> parse round trip
    assert parse_boxes(format_box([10, 20, 300, 400])) == [(10, 20, 300, 400)]


def test_iou():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
    assert math.isclose(box_iou([0, 0, 0, 0], [0, 0, 0, 0]), 0.0)


def test_parse_grounding_reply():
    text = ("<ref>a dog</ref><box>(1,2),(3,4)</box><box>(5,6),(7,8)</box> and <box>(9,9),(10,10)</box>, "
            "<ref>猫</ref> <box>( 11 , 12 ),( 13 , 14 )</box>"
            "<ref>Hello</ref><quad>(1,2),(3,2),(3,4),(1,4)</quad>"
            "<ref>bad</ref><box>(1,2)</box><quad>(1,2),(3,4)</quad><box>(1200,0),(1500,999)</box>")
    assert parse_grounding(text) == [
        ("a dog", "box", (1, 2, 3, 4)), ("a dog", "box", (5, 6, 7, 8)),  # several boxes after one ref
        (None, "box", (9, 9, 10, 10)),  # text in between: not the dog's
        ("猫", "box", (11, 12, 13, 14)),
        ("Hello", "quad", (1, 2, 3, 2, 3, 4, 1, 4)),
        ("bad", "box", (1200, 0, 1500, 999)),  # malformed ones skipped; out-of-grid kept (caller clamps)
    ]
    assert parse_grounding("plain text") == []
    # a <ref> without a box does not swallow the next one
    assert parse_grounding("<ref>a</ref> text <ref>b</ref><box>(1,2),(3,4)</box>") == [("b", "box", (1, 2, 3, 4))]


def test_denormalize_quad_official_rule():
    q = denormalize_quad((0, 999, 999, 0, 500, 500, 999, 999), 640, 480)
    assert q == pytest.approx((0, 480, 640, 0, 500 / 999 * 640, 500 / 999 * 480, 640, 480))
    # inverse of the normalisation up to half a grid cell
    w, h = 333, 777
    qn = normalize_quad([(10, 20), (300, 25), (310, 700), (12, 690)], w, h)
    back = denormalize_quad(qn, w, h)
    for v, orig, size in zip(back, (10, 20, 300, 25, 310, 700, 12, 690), (w, h) * 4):
        assert abs(v - orig) <= 0.5 * size / 999 + 1e-9
    with pytest.raises(InvalidBox):
        denormalize_quad((1, 2, 3), 10, 10)
