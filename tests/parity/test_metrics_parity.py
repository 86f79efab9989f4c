"""summary.json (score_folder) vs nnU-Net v1's aggregate_scores on the same prediction and reference files."""
from __future__ import annotations

import math

import numpy as np

from unetpp_lib.core import io
from unetpp_lib.evaluation.metrics import METRICS
from unetpp_lib.validate import score_folder

SHAPE = (10, 18, 16)
GEOM = io.Geometry(SHAPE, (2.5, 0.7, 0.7), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
EXTRA = {"Hausdorff Distance 95", "Surface Dice", "Invented Volume ml", "Invented Volume %"}  # ours only


def blob(centre, radii) -> np.ndarray:
    """Boolean ellipsoid in SHAPE."""
    zz, yy, xx = np.mgrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    return sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii)) < 1


def cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) pairs covering every NaN rule of v1's metrics."""
    liver, liver_shifted = blob((5, 9, 8), (4, 7, 6)), blob((5, 10, 8), (4, 7, 5))
    tumour, tumour_shifted = blob((5, 8, 8), (2, 3, 2)), blob((5, 9, 9), (2, 2, 2))

    def seg(lv, tm=None):
        s = lv.astype(np.uint8)
        if tm is not None:
            s[tm] = 2
        return s

    return {
        "liver_0": (seg(liver_shifted, tumour_shifted), seg(liver, tumour)),  # ordinary overlap
        "liver_1": (seg(liver_shifted), seg(liver)),  # no tumour anywhere: Dice, Precision, Recall NaN
        "liver_2": (seg(liver), seg(liver, tumour)),  # tumour missed: Dice 0, Precision NaN
        "liver_3": (seg(liver, tumour), seg(liver)),  # tumour invented: Recall NaN
        "liver_4": (np.zeros(SHAPE, np.uint8), seg(liver, tumour)),  # empty prediction: background test full
        "liver_5": (np.ones(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)),  # background reference empty
    }


def same(a: float, b: float) -> bool:
    """Equal to 1e-6, NaN where the other is NaN."""
    return (math.isnan(a) and math.isnan(b)) or (not math.isnan(a) and not math.isnan(b) and abs(a - b) <= 1e-6)


def test_summary_matches_v1_aggregate_scores(run_ref, tmp_path):
    raw, pairs = tmp_path / "raw", []
    for name, (pred, ref) in cases().items():
        io.write_image(tmp_path / "pred" / f"{name}.nii.gz", pred, GEOM)
        io.write_image(raw / "labelsTr" / f"{name}.nii.gz", ref, GEOM)
        pairs.append([str(tmp_path / "pred" / f"{name}.nii.gz"), str(raw / "labelsTr" / f"{name}.nii.gz")])
    label_sets = [[0, 1, 2], [1, 2]]
    ref = run_ref("ref_metrics.py", pairs=pairs, label_sets=label_sets)
    names = list(cases())
    nans = 0
    for i, labels in enumerate(label_sets):
        v1 = ref[str(i)]
        ours = score_folder(tmp_path / "pred", raw, names, labels, "parity")
        assert set(ours) == set(v1)  # author, description, id, name, results, task, timestamp
        assert set(ours["results"]) == set(v1["results"]) == {"all", "mean"}
        both = zip(ours["results"]["all"] + [ours["results"]["mean"]], v1["results"]["all"] + [v1["results"]["mean"]])
        for o, r in both:
            assert set(o) == set(r), (set(o), set(r))  # "0".."2" (+ "reference", "test" per case)
            for lab in map(str, labels):
                assert set(r[lab]) == set(METRICS) and set(o[lab]) == set(METRICS) | EXTRA
                bad = {m: (o[lab][m], r[lab][m]) for m in METRICS if not same(float(o[lab][m]), float(r[lab][m]))}
                assert not bad, (lab, bad)
                nans += sum(math.isnan(float(r[lab][m])) for m in METRICS)
        for o, r in zip(ours["results"]["all"], v1["results"]["all"]):
            assert (o["test"], o["reference"]) == (r["test"], r["reference"])
    assert nans > 20  # the NaN rules were exercised
