"""v1's class-location sampling: GenericPreprocessor._run_internal on a label map at its own spacing.

args: labels = [.npy uint8 label maps (z, y, x)], classes = [foreground classes]. Each goes through
_run_internal as a cropped case (image of zeros beside it, spacing 1 mm, no resampling), and the
class locations v1 stores in the case's .pkl come back as loc_<k>_<class>.npy.
"""
import os
import pickle
from collections import OrderedDict

import numpy as np
from nnunet.preprocessing.preprocessing import GenericPreprocessor

import _ref

a = _ref.args()
cropped, stage = os.path.join(a["out"], "cropped"), os.path.join(a["out"], "stage")
os.makedirs(cropped, exist_ok=True)
os.makedirs(stage, exist_ok=True)
pre = GenericPreprocessor({0: "nonCT"}, OrderedDict({0: False}), [0, 1, 2], None)
counts = []
for k, path in enumerate(a["labels"]):
    lab = np.load(path).astype(np.float32)
    case = f"case_{k}"
    np.savez_compressed(os.path.join(cropped, case + ".npz"), data=np.stack([np.zeros_like(lab), lab]))
    props = {"original_spacing": np.array([1.0, 1.0, 1.0]), "size_after_cropping": lab.shape,
             "crop_bbox": [[0, s] for s in lab.shape], "classes": np.array([0, *a["classes"]])}
    with open(os.path.join(cropped, case + ".pkl"), "wb") as f:
        pickle.dump(props, f)
    pre._run_internal(np.array([1.0, 1.0, 1.0]), case, stage, cropped, None, a["classes"])
    with open(os.path.join(stage, case + ".pkl"), "rb") as f:
        locs = pickle.load(f)["class_locations"]
    counts.append({str(c): len(locs[c]) for c in a["classes"]})
    for c in a["classes"]:
        _ref.save_array(a, f"loc_{k}_{c}", np.asarray(locs[c], dtype=np.int64).reshape(-1, 3))
_ref.done(a, {"counts": counts})
