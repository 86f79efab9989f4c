"""Export (probabilities -> labels in the original image's space) vs v1's save_segmentation_nifti_from_softmax."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from unetpp_lib.core import io
from unetpp_lib.nn.infer import export

TILT = math.radians(7)
OBLIQUE = np.diag([-1.0, -1.0, 1.0]) @ np.array([[1, 0, 0], [0, math.cos(TILT), -math.sin(TILT)],
                                                 [0, math.sin(TILT), math.cos(TILT)]])
# spacing (z, y, x) mm; target spacing in the transposed frame; crop box in the original frame
CASES = {
    "linear": {"shape": (30, 34, 28), "spacing": (1.0, 0.8, 0.8), "target": (1.2, 1.0, 1.0),
               "transpose": [0, 1, 2], "box": [[2, 27], [3, 31], [1, 26]], "direction": np.eye(3)},
    # 5 mm slices: in-plane linear per slice, nearest between slices
    "anisotropic_flipped": {"shape": (14, 40, 38), "spacing": (5.0, 0.8, 0.8), "target": (3.0, 1.0, 1.0),
                            "transpose": [0, 1, 2], "box": [[1, 13], [0, 40], [2, 38]],
                            "direction": np.diag([-1.0, -1.0, 1.0])},
    # coarse x axis, moved first by the plans' transpose; oblique direction
    "transposed_oblique": {"shape": (30, 26, 11), "spacing": (0.8, 0.9, 4.0), "target": (3.0, 1.0, 1.0),
                           "transpose": [2, 0, 1], "box": [[0, 28], [2, 26], [1, 10]], "direction": OBLIQUE},
    # only the network's spacing is anisotropic: v1's second rule
    "target_anisotropic": {"shape": (16, 30, 30), "spacing": (2.0, 1.0, 1.0), "target": (3.5, 1.0, 1.1),
                           "transpose": [0, 1, 2], "box": [[0, 16], [0, 30], [0, 30]], "direction": np.eye(3)},
}


def probabilities(shape, rng) -> np.ndarray:
    """Smooth random softmax over 3 classes, (3, *shape) float32: blobs, not salt and pepper."""
    logits = np.stack([ndimage.gaussian_filter(rng.normal(size=shape), 1.5) * 8 for _ in range(3)])
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).astype(np.float32)


def setup_case(name: str, c: dict, tmp_path, rng) -> tuple[dict, dict, np.ndarray]:
    """Our properties, v1's properties dict built from them, and probabilities at the network's spacing."""
    geom = io.Geometry(c["shape"], c["spacing"], (-120.5, 80.25, -300.0), tuple(c["direction"].ravel()))
    order = c["transpose"]
    crop = [b - a for a, b in c["box"]]
    crop_t = [crop[i] for i in order]
    sp_t = [c["spacing"][i] for i in order]
    net_shape = [int(round(s * n / t)) for s, n, t in zip(sp_t, crop_t, c["target"])]
    ours = {"geometry": geom, "crop_box": c["box"], "transpose_forward": order, "shape_after_crop": crop_t,
            "spacing_transposed": sp_t, "target_spacing": list(c["target"])}
    # what v1's cropping and preprocessing store; spacing_after_resampling is in the transposed frame there too
    v1 = {"original_size_of_raw_data": list(c["shape"]), "size_after_cropping": crop, "crop_bbox": c["box"],
          "original_spacing": list(c["spacing"]), "spacing_after_resampling": list(c["target"]),
          "itk_spacing": list(reversed(c["spacing"])), "itk_origin": list(geom.origin),
          "itk_direction": list(geom.direction)}
    return ours, v1, probabilities(net_shape, rng)


def test_export_matches_v1(run_ref, tmp_path):
    rng = np.random.default_rng(0)
    setups, jobs = {}, []
    for name, c in CASES.items():
        ours, v1, probs = setup_case(name, c, tmp_path, rng)
        setups[name] = (ours, probs)
        back = np.argsort(c["transpose"])  # v1's validation hands the export probabilities in the original frame
        np.save(tmp_path / f"{name}_probs.npy", probs.transpose([0] + [1 + int(i) for i in back]))
        jobs.append({"probs": str(tmp_path / f"{name}_probs.npy"), "properties": v1,
                     "out": str(tmp_path / "v1" / f"{name}.nii.gz")})
    (tmp_path / "v1").mkdir()
    run_ref("ref_export.py", cases=jobs)
    for name, (props, probs) in setups.items():
        path = export(torch.from_numpy(probs), props, tmp_path / "ours" / f"{name}.nii.gz", save_probabilities=True)
        seg, geom = io.read_image(path)
        ref_seg, ref_geom = io.read_image(tmp_path / "v1" / f"{name}.nii.gz")
        assert geom == ref_geom, name  # spacing, origin, direction: the same values written
        assert seg.shape == ref_seg.shape == CASES[name]["shape"]
        assert int((seg != ref_seg).sum()) == 0, (name, int((seg != ref_seg).sum()))
        assert len(np.unique(seg)) == 3, name  # all classes present: the comparison is not vacuous
        ours_p = np.load(tmp_path / "ours" / f"{name}.npz")["probabilities"].astype(np.float32)
        ref_p = np.load(tmp_path / "v1" / f"{name}.npz")["softmax"].astype(np.float32)
        assert np.abs(ours_p - ref_p).max() <= 1e-3, (name, float(np.abs(ours_p - ref_p).max()))  # float16 files
