"""Uncertainty QA on hand-made arrays; the expected numbers are worked out by hand in the comments."""
import json
import math

import numpy as np
import pytest
from scipy import stats

from unetpp_lib.core.io import Geometry, write_image
from unetpp_lib.core.layout import PredLayout
from unetpp_lib.evaluation import lesions
from unetpp_lib.evaluation import uncertainty as uq
from unetpp_lib.qa.plots import uncertainty_png


def test_case_score_on_a_cube_with_anisotropic_margin():
    # spacing (3, 1, 1) mm, margin 2 mm: no growth along z (3 mm > 2), 2 voxels in y and x, without the corner
    # offsets (1, 2), (2, 1), (2, 2) (sqrt 5, sqrt 5, sqrt 8 > 2): per slice 8 * 8 - 4 * 3 = 52, two slices 104
    seg = np.zeros((10, 12, 12), np.uint8)
    seg[4:6, 4:8, 4:8] = 1  # 2 * 4 * 4 = 32 voxels
    entropy = np.full(seg.shape, 50, np.uint8)
    entropy[seg > 0] = 20
    # (32 * 0.2 + (104 - 32) * 0.5) / 32 = 42.4 / 32
    assert uq.case_score(entropy, seg, (3.0, 1.0, 1.0), margin_mm=2.0) == pytest.approx(42.4 / 32)
    # spacing read in the wrong order (x, y, z) would grow along z instead: a different value
    assert uq.case_score(entropy, seg, (1.0, 1.0, 3.0), margin_mm=2.0) != pytest.approx(42.4 / 32)
    assert uq.case_score(entropy, seg, (3.0, 1.0, 1.0), label=1, margin_mm=2.0) == pytest.approx(42.4 / 32)
    assert math.isnan(uq.case_score(entropy, seg, (3.0, 1.0, 1.0), label=2))
    # one tumour voxel at (4, 5, 5) grown in-plane by 2 mm: 5 * 5 - 12 corners = 13 voxels, of which (5, 3) and
    # (3, 5) lie outside the cube (0.5 each) and 11 inside it (0.2 each); per 1 predicted voxel
    seg[4, 5, 5] = 2
    assert uq.case_score(entropy, seg, (3.0, 1.0, 1.0), label=2, margin_mm=2.0) == pytest.approx(11 * 0.2 + 2 * 0.5)


def test_case_score_against_brute_force_distances():
    rng = np.random.default_rng(3)
    seg = np.zeros((12, 16, 18), np.uint8)
    seg[3:8, 5:11, 4:12] = (rng.random((5, 6, 8)) > 0.3).astype(np.uint8) * rng.integers(1, 3, (5, 6, 8))
    entropy = rng.integers(0, 101, seg.shape).astype(np.uint8)
    spacing = (2.5, 0.8, 1.2)
    for label in (None, 1, 2):
        mask = seg > 0 if label is None else seg == label
        grid = np.stack(np.indices(seg.shape), -1).reshape(-1, 3) * np.array(spacing)
        inside = grid[mask.ravel()]
        d = np.sqrt(((grid[:, None, :] - inside[None, :, :]) ** 2).sum(-1)).min(1)  # mm to the nearest voxel
        want = entropy.ravel()[d <= 5.0].sum() / 100.0 / mask.sum()
        assert uq.case_score(entropy, seg, spacing, label=label) == pytest.approx(want)


def test_lesion_confidence_lines_up_with_lesion_matching():
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[1:3, 1:3, 1:3] = 2  # first in raster order: id 1
    seg[3, 2, 2] = 1
    seg[4, 5, 5] = 2  # id 2 ...
    seg[5, 6, 5] = 2  # ... and id 3: it touches id 2 only along an edge, so it is another 6-connected lesion
    conf = np.zeros(seg.shape, np.uint8)
    ent = np.zeros(seg.shape, np.uint8)
    conf[1:3, 1:3, 1:3], conf[4, 5, 5], conf[5, 6, 5] = 90, 60, 30
    ent[1, 1:3, 1:3], ent[2, 1:3, 1:3] = 10, 20  # half at 10 %, half at 20 %: mean 0.15
    ent[4, 5, 5], ent[5, 6, 5] = 100, 1
    out = uq.lesion_confidence(seg, conf, ent)
    assert out == [{"id": 1, "probability": 0.9, "uncertainty": 0.15},
                   {"id": 2, "probability": 0.6, "uncertainty": 1.0},
                   {"id": 3, "probability": 0.3, "uncertainty": 0.01}]
    ref = np.zeros_like(seg)
    ref[4, 5, 5] = 2  # only the middle lesion is real
    found = lesions.match(ref == 2, seg == 2, 0.001)["predicted"]
    assert [p["id"] for p in found] == [o["id"] for o in out]
    assert [p["matched"] for p in found] == [False, True, False]
    conf[1, 1, 1] = 0  # a mean that needs rounding: (7 * 90 + 0) / 8 = 78.75 % -> 0.7875; 1/3 -> 0.3333
    ent[4, 5, 5] = 33
    ent[5, 6, 5] = 34
    out = uq.lesion_confidence(seg, conf, ent)
    assert out[0]["probability"] == 0.7875 and out[1]["uncertainty"] == 0.33
    seg2 = seg.copy()
    seg2[seg2 == 2] = 1
    assert uq.lesion_confidence(seg2, conf, ent) == []


def test_most_uncertain_point_finds_a_hot_block():
    ent = np.zeros((20, 30, 30), np.uint8)
    ent[10:17, 3:10, 20:27] = 80  # a 7^3 block: 5^3 windows wholly inside it centre on z 12-14, y 5-7, x 22-24
    ent[2, 2, 2] = 100  # a lone hot voxel: its window mean is 100 / 125 = 0.8, far below 80
    assert uq.most_uncertain_point(ent) == (13, 6, 23)
    assert uq.most_uncertain_point(np.zeros((7, 9, 11), np.uint8)) == (3, 4, 5)


def _detection_case() -> tuple[np.ndarray, ...]:
    """A 10^3 case: the z = 0 slab is air (outside the body); 30 wrong body voxels and 1 wrong voxel in the air."""
    image = np.full((10, 10, 10), 40.0, np.float32)
    image[0] = -1000.0  # 900 body voxels
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    seg = ref.copy()
    seg[2:8, 2:7, 7] = 0  # 30 liver voxels missed
    seg[0, 0, 0] = 1  # a wrong voxel in the air: not counted
    return image, seg, ref


def test_detection_when_the_wrong_voxels_are_the_most_uncertain():
    image, seg, ref = _detection_case()
    ent = np.where(seg != ref, 100, 0).astype(np.uint8)
    h = uq.detection_histograms(ent, seg, ref, image, (1.0, 1.0, 1.0))
    assert h["uncertainty"]["body"][100] == 30 and h["uncertainty"]["body"][0] == 870
    assert h["uncertainty"]["wrong"][100] == 30 and sum(h["uncertainty"]["wrong"]) == 30
    assert all(type(v) is int for part in h.values() for counts in part.values() for v in counts)
    f = uq.detection_figures(h)
    # curve (0, 0) -> (30/900, 1) -> (1, 1): at 1 % flagged 0.01 / (1/30) = 0.3 caught, at 5 % and 10 % all
    share = 30 / 900
    assert f["uncertainty"]["at_1pct"] == pytest.approx(0.01 / share)
    assert f["uncertainty"]["at_5pct"] == pytest.approx(1.0) and f["uncertainty"]["at_10pct"] == pytest.approx(1.0)
    assert f["uncertainty"]["auc"] == pytest.approx(1 - share / 2)  # triangle share/2 plus the rectangle 1 - share
    assert f["random"] == {"at_1pct": 0.01, "at_5pct": 0.05, "at_10pct": 0.10, "auc": 0.5}
    assert f["body_voxels"] == 900 and f["wrong_voxels"] == 30
    assert f["beats_baseline"] is True and f["boundary"]["auc"] < f["uncertainty"]["auc"]
    # a map with one value everywhere ties every voxel: the diagonal
    tie = uq.detection_figures(uq.detection_histograms(np.full(seg.shape, 37, np.uint8), seg, ref, image,
                                                       (1.0, 1.0, 1.0)))
    assert tie["uncertainty"]["at_1pct"] == pytest.approx(0.01) and tie["uncertainty"]["auc"] == pytest.approx(0.5)
    x, y = uq.detection_curve([0] * 37 + [900] + [0] * 63, [0] * 37 + [30] + [0] * 63)
    assert x.tolist() == [0.0, 1.0] and y.tolist() == [0.0, 1.0]


def test_detection_curve_ranks_and_no_wrong_voxels():
    body, wrong = [0] * 101, [0] * 101
    body[0], body[100], wrong[0] = 50, 50, 50
    x, y = uq.detection_curve(body, wrong, highest_first=True)  # the certain half first: it holds no error
    assert x.tolist() == [0.0, 0.5, 1.0] and y.tolist() == [0.0, 0.0, 1.0]
    x, y = uq.detection_curve(body, wrong, highest_first=False)
    assert x.tolist() == [0.0, 0.5, 1.0] and y.tolist() == [0.0, 1.0, 1.0]
    f = uq.detection_figures({"uncertainty": {"body": body, "wrong": [0] * 101},
                              "boundary": {"body": body, "wrong": [0] * 101}})
    assert all(math.isnan(v) for k in ("uncertainty", "boundary", "random") for v in f[k].values())
    assert f["wrong_voxels"] == 0 and f["beats_baseline"] is False


def test_boundary_baseline_histogram():
    # two labels meeting between x = 4 and x = 5; x spacing 0.75 mm: x = 3 and 6 at 0.75 mm (bin 1), 2 and 7 at
    # 1.5 mm (bin 3), 1 and 8 at 2.25 mm (bin 4), 0 and 9 at 3 mm (bin 6); 100 voxels per x column
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[:, :, :5] = 1
    image = np.zeros(seg.shape, np.float32)
    h = uq.detection_histograms(np.zeros(seg.shape, np.uint8), seg, seg, image, (2.0, 1.0, 0.75))
    want = [0] * 101
    for b in (0, 1, 3, 4, 6):
        want[b] = 200
    assert h["boundary"]["body"] == want and sum(h["boundary"]["wrong"]) == 0
    # no boundary at all: every voxel in the last bin
    h = uq.detection_histograms(np.zeros(seg.shape, np.uint8), seg * 0, seg, image, (2.0, 1.0, 0.75))
    assert h["boundary"]["body"][100] == 1000 and sum(h["boundary"]["body"]) == 1000
    # far voxels clipped into the last bin, also beyond the cropped box: x spacing 0.5 mm, boundary at x = 0, 1
    seg = np.zeros((4, 4, 200), np.uint8)
    seg[..., 0] = 2
    image = np.zeros(seg.shape, np.float32)
    image[0] = -900.0  # 3 * 4 = 12 body voxels per x column
    ref = seg.copy()
    ref[1:, :, 150] = 1  # 12 wrong body voxels, 149 * 0.5 = 74.5 mm from the boundary
    h = uq.detection_histograms(np.zeros(seg.shape, np.uint8), seg, ref, image, (1.0, 1.0, 0.5))
    x = np.arange(200)
    want = (np.bincount(np.minimum(np.maximum(x - 1, 0), 100), minlength=101) * 12).tolist()
    assert h["boundary"]["body"] == want and sum(h["boundary"]["body"]) == 12 * 200
    assert h["boundary"]["wrong"][100] == 12 and sum(h["boundary"]["wrong"]) == 12
    assert sum(h["uncertainty"]["body"]) == 12 * 200


def test_pool_sums_histograms():
    image, seg, ref = _detection_case()
    ent = np.random.default_rng(0).integers(0, 101, seg.shape).astype(np.uint8)
    h = uq.detection_histograms(ent, seg, ref, image, (1.0, 1.0, 1.0))
    two = uq.pool([h, h])
    assert two["uncertainty"]["body"] == [2 * v for v in h["uncertainty"]["body"]]
    assert two["boundary"]["wrong"] == [2 * v for v in h["boundary"]["wrong"]]
    assert uq.pool([])["boundary"]["body"] == [0] * 101
    assert uq.detection_figures(two)["uncertainty"] == pytest.approx(uq.detection_figures(h)["uncertainty"])


def test_spearman_and_ranking():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 6, 40).astype(float), rng.random(40)  # ties in a
    assert uq.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0])
    a[[3, 7]], b[11] = np.nan, np.inf  # pairs with a non-finite side left out
    ok = np.isfinite(a) & np.isfinite(b)
    assert uq.spearman(a, b) == pytest.approx(stats.spearmanr(a[ok], b[ok])[0])
    assert math.isnan(uq.spearman([1.0, 2.0], [2.0, 1.0]))
    assert math.isnan(uq.spearman([1.0, 2.0, np.nan, 4.0], [1.0, 2.0, 3.0, np.nan]))
    assert math.isnan(uq.spearman([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]))
    dice = [0.9, 0.8, 0.95, 0.5, float("nan")]
    scores = [0.1, 0.2, 0.05, 0.6, 0.3]  # more doubt, lower Dice: rho -1
    volumes = [1500.0, 1400.0, 1300.0, 1600.0, 1450.0]  # ranks 3 2 1 4 vs Dice's 3 2 4 1: 1 - 6 * 18 / 60 = -0.8
    r = uq.ranking(scores, dice, volumes)
    assert r["cases"] == 4 and r["score_vs_dice"] == pytest.approx(-1.0)
    assert r["volume_vs_dice"] == pytest.approx(-0.8) and r["beats_baseline"] is True
    r = uq.ranking([0.1, float("nan"), 0.2, float("nan")], dice[:4], volumes[:4])
    assert math.isnan(r["score_vs_dice"]) and r["beats_baseline"] is False


def hand_lesions() -> list[dict]:
    """Two labelled cases and one unlabelled (skipped): 4 reference lesions, 6 predicted ones."""
    def p(i, matched, prob, vol):
        return {"id": i, "matched": matched, "probability": prob, "uncertainty": 1 - prob, "volume_ml": vol}
    return [{"case": "a", "reference": [{"id": 1, "predicted": [1]}, {"id": 2, "predicted": [2, 3]},
                                        {"id": 3, "predicted": []}],
             "predicted": [p(1, True, 0.95, 5.0), p(2, True, 0.65, 1.0), p(3, True, 0.55, 0.5),
                           p(4, False, 0.85, 10.0)]},
            {"case": "b", "reference": [{"id": 1, "predicted": [1]}],
             "predicted": [p(1, True, 0.75, 2.0), p(2, False, 0.4, 3.0)]},
            {"case": "c", "reference": None, "predicted": [p(1, None, 0.99, 50.0)]}]


def test_lesion_thresholds_by_hand():
    out = uq.lesion_thresholds(hand_lesions(), (0.5, 0.6, 0.7, 0.8, 0.9))
    rows = [v for r in out["confidence"] for v in (r["threshold"], r["kept"], r["matched"], r["precision"], r["recall"])]
    # t 0.5 keeps a1 a2 a3 a4 b1 (4 matched; a-G1, a-G2, b-G1 found); 0.6 drops a3; 0.7 drops a2 (a-G2 lost);
    # 0.8 drops b1; 0.9 drops a4
    assert rows == pytest.approx([0.5, 5, 4, 0.8, 0.75, 0.6, 4, 3, 0.75, 0.75, 0.7, 3, 2, 2 / 3, 0.5,
                                  0.8, 2, 1, 0.5, 0.25, 0.9, 1, 1, 1.0, 0.25])
    # largest first: a4 10 (false), a1 5, b2 3 (false), b1 2, a2 1, a3 0.5; kept as many as the rows above
    vol = [v for r in out["volume"] for v in (r["threshold"], r["kept"], r["matched"], r["precision"], r["recall"])]
    assert vol == pytest.approx([1.0, 5, 3, 0.6, 0.75, 2.0, 4, 2, 0.5, 0.5, 3.0, 3, 1, 1 / 3, 0.25,
                                 5.0, 2, 1, 0.5, 0.25, 10.0, 1, 0, 0.0, 0.0])
    # average precision: confidence 0.25 * 1 (0.95) + 0.25 * 2/3 (0.75) + 0.25 * 3/4 (0.65) = 29/48;
    # volume 0.25 * 1/2 (5 ml) + 0.25 * 2/4 (2 ml) + 0.25 * 3/5 (1 ml) = 0.4
    assert out["pr_auc"]["confidence"] == pytest.approx(29 / 48) and out["pr_auc"]["volume"] == pytest.approx(0.4)
    assert out["beats_baseline"] is True
    # nothing kept: precision NaN, recall 0
    high = uq.lesion_thresholds(hand_lesions(), thresholds=(0.97,))
    assert high["confidence"][0]["kept"] == 0 and math.isnan(high["confidence"][0]["precision"])
    assert high["volume"][0]["kept"] == 0 and high["confidence"][0]["recall"] == 0.0
    # maps not saved: no probability on a predicted lesion of a labelled case -> NaN figures
    cases = hand_lesions()
    del cases[1]["predicted"][0]["probability"]
    out = uq.lesion_thresholds(cases)
    assert all(math.isnan(r["precision"]) for r in out["confidence"] + out["volume"])
    assert math.isnan(out["pr_auc"]["confidence"]) and out["beats_baseline"] is False


def _case(seed: int, wrong: int) -> tuple[np.ndarray, ...]:
    """A small case: liver cube, one tumour, `wrong` liver voxels missed, entropy high on them."""
    rng = np.random.default_rng(seed)
    ref = np.zeros((12, 16, 16), np.uint8)
    ref[2:10, 3:13, 3:13] = 1
    ref[4:7, 5:8, 5:8] = 2
    seg = ref.copy()
    seg[2, 3, 3:3 + wrong] = 0
    seg[8, 10:12, 10:12] = 2  # an invented tumour
    ent = rng.integers(0, 20, ref.shape).astype(np.uint8)
    ent[seg != ref] = 90
    conf = (100 - ent).astype(np.uint8)
    image = np.full(ref.shape, 50.0, np.float32)
    image[:, :, 0] = -1000.0
    return seg, ref, image, {"entropy": ent, "spread": ent // 2, "confidence": conf}


def test_section_is_json_and_the_png_draws(tmp_path):
    spacing = (2.0, 0.8, 0.8)
    cases, per_case, dice, found = [], [], [], []
    for i, w in enumerate((1, 4, 8)):
        seg, ref, image, maps = _case(i, w)
        d = uq.case_uncertainty(seg, ref, image, maps, spacing)
        assert d["predicted_ml"] == pytest.approx(np.count_nonzero(seg) * 1.28 / 1000)
        assert [p["id"] for p in d["lesions"]] == [1, 2] and d["histograms"] is not None
        les = lesions.case_lesions(seg, ref, spacing)
        for lesion, conf in zip(les["predicted"], d["lesions"]):
            lesion.update(probability=conf["probability"], uncertainty=conf["uncertainty"])
        cases.append(f"c{i}")
        per_case.append(d)
        dice.append(1.0 - 0.05 * w)
        found.append({"case": f"c{i}", **les})
    seg, _, image, maps = _case(9, 2)  # an unlabelled case without a confidence map
    del maps["confidence"]
    d = uq.case_uncertainty(seg, None, image, maps, spacing)
    assert d["histograms"] is None and d["lesions"] == [] and set(d["score_by_label"]) == {"1", "2"}
    cases.append("u")
    per_case.append(d)
    dice.append(float("nan"))
    sec = uq.section(cases, per_case, dice, found)
    text = json.dumps(sec, allow_nan=True)
    back = json.loads(text)
    assert [r["case"] for r in back["per_case"]] == cases
    err = back["error_detection"]
    assert err["wrong_voxels"] == sum(np.count_nonzero((s != r) & (im > -500)) for s, r, im, _ in
                                      (_case(i, w) for i, w in enumerate((1, 4, 8))))
    curve = err["curve"]["uncertainty"]
    assert 45 <= len(curve) <= 55 and curve[0] == [0.0, 0.0] and curve[-1] == [1.0, 1.0]
    assert [0.05, pytest.approx(err["uncertainty"]["at_5pct"], abs=1e-6)] in curve
    assert back["ranking"]["cases"] == 3 and back["lesion_thresholds"]["confidence"][0]["kept"] == 3
    png = uncertainty_png(sec, tmp_path / "u.png")
    from matplotlib.image import imread

    assert imread(str(png)).shape[:2] == (460, 1500)
    # nothing to show: empty and all-NaN sections still draw, saying so
    empty = uq.section([], [], [], None)
    json.dumps(empty, allow_nan=True)
    assert empty["error_detection"]["curve"] == {"uncertainty": [], "boundary": []}
    assert imread(str(uncertainty_png(empty, tmp_path / "e.png"))).shape[:2] == (460, 1500)
    unl = uq.section(["u"], [d], [float("nan")], [{"case": "u", "reference": None, "predicted": []}])
    assert imread(str(uncertainty_png(unl, tmp_path / "n.png"))).shape[:2] == (460, 1500)


def test_read_maps(tmp_path):
    geom = Geometry((3, 4, 5), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    layout = PredLayout(tmp_path)
    assert uq.read_maps(tmp_path, "c") is None
    write_image(layout.uncertainty("c", "entropy"), np.full((3, 4, 5), 7, np.uint8), geom)
    write_image(layout.uncertainty("c", "confidence"), np.full((3, 4, 5), 93, np.uint8), geom)
    maps = uq.read_maps(tmp_path, "c")
    assert set(maps) == {"entropy", "confidence"} and maps["entropy"].shape == (3, 4, 5)
    assert int(maps["confidence"][0, 0, 0]) == 93
