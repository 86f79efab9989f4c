"""v1's preprocessing for the v2.1 plans (GenericPreprocessor via the planner's run_preprocessing).

args: raw = {name: raw task folder}: the real path of ref_plan.py (crop, analyse, plan) followed
by run_preprocessing; per case the preprocessed image and label, class locations and properties.
resample = [{"image": .npy, "label": .npy, "spacing": [...], "target": [...]}]: v1's
resample_patient alone, called as GenericPreprocessor.resample_and_normalize calls it.
"""
import json

import _ref
import numpy as np
from nnunet.preprocessing.preprocessing import resample_patient
from ref_plan import real_path

a = _ref.args()
result = {name: real_path(a, name, raw, True) for name, raw in a.get("raw", {}).items()}
if a.get("resample"):
    with open(a["resample"]) as f:
        jobs = json.load(f)
    for i, job in enumerate(jobs):
        img = np.load(job["image"]).astype(np.float32)[None]
        lab = np.load(job["label"]).astype(np.float32)[None]
        img, lab = resample_patient(img, lab, np.array(job["spacing"]), np.array(job["target"]), 3, 1,
                                    force_separate_z=None, order_z_data=0, order_z_seg=0)
        _ref.save_array(a, f"rs{i}_image", img[0])
        _ref.save_array(a, f"rs{i}_label", lab[0])
_ref.done(a, result)
