"""Post-processing vs nnU-Net v1: determine_postprocessing's decisions and its largest-component removal."""
from __future__ import annotations

import math

import numpy as np

from unetpp_lib.core import io
from unetpp_lib.validate import apply_postprocessing, decide_postprocessing

SHAPE = (12, 30, 30)
GEOM = io.Geometry(SHAPE, (2.0, 0.8, 0.8), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
LIVER = np.s_[2:10, 4:20, 4:20]


def box(*slices) -> np.ndarray:
    """Boolean mask of a box in SHAPE."""
    m = np.zeros(SHAPE, bool)
    m[slices] = True
    return m


def labels(liver: np.ndarray, tumour: np.ndarray | None = None) -> np.ndarray:
    """uint8 label map: 1 where liver, 2 where tumour (over liver)."""
    s = liver.astype(np.uint8)
    if tumour is not None:
        s[tumour] = 2
    return s


def scenarios() -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """{scenario: {case: (prediction, reference)}}."""
    liver, core = box(*LIVER), box(slice(3, 9), slice(7, 15), slice(7, 15))
    island = box(slice(5, 7), slice(24, 26), slice(24, 26))  # a true tumour apart from the liver
    stray = box(slice(2, 10), slice(24, 28), slice(4, 10))  # a false liver island
    ref_a = labels(liver, core | island)
    # the all-foreground step: liver Dice +0.054, tumour -0.010 (island lost): mean up, one class down
    mean_up_one_down = {"liver_0": (labels(liver | stray, core | island), ref_a),
                        "liver_1": (labels(liver), labels(liver))}  # no tumour: NaN, left out of the mean
    tumour = box(slice(4, 8), slice(8, 12), slice(8, 12))
    edge = box(slice(2, 10), slice(20, 24), slice(20, 24))  # meets the liver along an edge only
    corner = box(slice(10, 12), slice(2, 4), slice(2, 4))  # meets it at a corner only
    fp_tumour = box(slice(4, 6), slice(15, 17), slice(15, 17))  # inside the liver, apart from the tumour
    ref_b = labels(liver, tumour)
    diagonal = {"liver_0": (labels(liver | edge | corner, tumour | fp_tumour), ref_b),
                "liver_1": (ref_b, ref_b)}
    return {"mean_up_one_down": mean_up_one_down, "diagonal_neighbours": diagonal}


def label_maps(rng) -> list[np.ndarray]:
    """Maps for the largest-component operation: sparse random labels (diagonal contacts everywhere), and ties."""
    sparse = rng.choice([0, 1, 2], size=(14, 16, 15), p=[0.7, 0.22, 0.08]).astype(np.uint8)
    ties = np.zeros((8, 12, 12), np.uint8)
    ties[1:3, 1:3, 1:3] = 1
    ties[5:7, 8:10, 8:10] = 1  # two equal largest class-1 components: v1 keeps both
    ties[3, 3, 3] = 1  # corner neighbour of the first cube
    ties[1:3, 6:8, 1:3] = 2
    ties[3, 8, 3] = 2  # corner neighbour of the class-2 cube
    ties[6, 2, 10] = 2
    return [sparse, ties]


def test_largest_component_matches_v1_and_decisions_match_determine_postprocessing(run_ref, tmp_path):
    rng = np.random.default_rng(0)
    jobs = {}
    for name, cases in scenarios().items():
        base = tmp_path / name
        for case, (pred, ref) in cases.items():
            io.write_image(base / "validation_raw" / f"{case}.nii.gz", pred, GEOM)
            io.write_image(base / "gt" / f"{case}.nii.gz", ref, GEOM)
            io.write_image(tmp_path / f"raw_{name}" / "labelsTr" / f"{case}.nii.gz", ref, GEOM)
        jobs[name] = {"base": str(base), "gt": str(base / "gt")}
    maps = label_maps(rng)
    for i, m in enumerate(maps):
        np.save(tmp_path / f"map_{i}.npy", m)
    ref = run_ref("ref_postprocess.py", scenarios=jobs,
                  label_maps=[str(tmp_path / f"map_{i}.npy") for i in range(len(maps))])

    for i, m in enumerate(maps):  # the operation itself: 6-connectivity, ties kept
        joint = apply_postprocessing(m, {"lcc_all_foreground": True, "lcc_classes": []})
        per_class = apply_postprocessing(m, {"lcc_all_foreground": False, "lcc_classes": [1, 2]})
        assert np.array_equal(joint, ref.array(f"joint_{i}")), (i, int((joint != ref.array(f"joint_{i}")).sum()))
        assert np.array_equal(per_class, ref.array(f"per_class_{i}")), i
    assert (ref.array("per_class_1") == 1).sum() == 16  # both tied cubes kept, the corner voxel removed

    for name, cases in scenarios().items():
        v1 = ref["decisions"][name]
        ours = decide_postprocessing(tmp_path / name / "validation_raw", tmp_path / f"raw_{name}", list(cases), [1, 2])
        v1_fg = [1, 2] in v1["for_which_classes"]
        v1_classes = [c for c in v1["for_which_classes"] if isinstance(c, int)]
        assert (ours["lcc_all_foreground"], ours["lcc_classes"]) == (v1_fg, v1_classes), (name, ours, v1)
        assert v1["min_valid_object_sizes"] == "None"  # v1's default (not advanced) decides without size limits
        for c in ("1", "2"):
            assert math.isclose(ours["dice_before"][c], v1["dc_per_class_raw"][c], abs_tol=1e-12)
    # the scenarios are the ones where the rules part: the mean rises but v1 keeps the step off ...
    v1 = ref["decisions"]["mean_up_one_down"]
    mean = {k: np.mean([v1[k][c] for c in ("1", "2")]) for k in ("dc_per_class_raw", "dc_per_class_pp_all")}
    assert mean["dc_per_class_pp_all"] > mean["dc_per_class_raw"] and v1["for_which_classes"] == [1]
    # ... and only faces connect: the edge and corner neighbours are islands v1 removes
    assert ref["decisions"]["diagonal_neighbours"]["for_which_classes"] == [[1, 2], 2]
