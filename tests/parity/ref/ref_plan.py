"""v1's ExperimentPlanner3D_v21 on raw tasks (its real path) and on bare fingerprints.

args: raw = {name: raw task folder in v1's layout}, fingerprints = path of a JSON {name: our
fingerprint}, preprocess = [names of raw tasks to preprocess with v1's GenericPreprocessor too].
Real path, as nnUNet_plan_and_preprocess: crop -> DatasetAnalyzer -> plan_experiment (-> run_preprocessing).
Result per name: the 3d_fullres stage (the last), transpose, intensity properties, per-case crop data.
"""
import json
import os
import pickle
import shutil
import time

import _ref
import numpy as np
from nnunet.experiment_planning.DatasetAnalyzer import DatasetAnalyzer
from nnunet.experiment_planning.experiment_planner_baseline_3DUNet_v21 import ExperimentPlanner3D_v21
from nnunet.experiment_planning.utils import crop
from nnunet.paths import nnUNet_cropped_data, nnUNet_raw_data, preprocessing_output_dir

KEYS = ("batch_size", "num_pool_per_axis", "patch_size", "median_patient_size_in_voxels", "current_spacing",
        "do_dummy_2D_data_aug", "pool_op_kernel_sizes", "conv_kernel_sizes")


def fullres(planner) -> dict:
    """The 3d_fullres stage of a planner's plans, and what is common to the stages."""
    stages = planner.plans["plans_per_stage"]
    stage = stages[max(stages)]
    out = {k: stage[k] for k in KEYS}
    out.update(num_stages=len(stages), transpose_forward=planner.plans["transpose_forward"],
               base_num_features=planner.plans["base_num_features"], num_classes=planner.plans["num_classes"])
    return out


def real_path(a: dict, name: str, raw: str, preprocess: bool) -> dict:
    """Raw task -> v1 cropping, dataset analysis, v2.1 plans (and preprocessing)."""
    task = f"Task5{len(os.listdir(nnUNet_raw_data)):02d}_{name}"
    os.makedirs(os.path.join(nnUNet_raw_data, task))
    for part in ("imagesTr", "labelsTr", "dataset.json"):
        os.symlink(os.path.join(raw, part), os.path.join(nnUNet_raw_data, task, part))
    t0 = time.perf_counter()
    crop(task, False, 1)
    cropped = os.path.join(nnUNet_cropped_data, task)
    props = DatasetAnalyzer(cropped, overwrite=False, num_processes=1).analyze_dataset(True)
    pre = os.path.join(preprocessing_output_dir, task)
    os.makedirs(pre)
    shutil.copy(os.path.join(cropped, "dataset_properties.pkl"), pre)
    planner = ExperimentPlanner3D_v21(cropped, pre)
    planner.plan_experiment()
    out = fullres(planner)
    ip = props["intensityproperties"][0]
    out["intensity"] = {k: float(ip[k]) for k in ("mean", "sd", "percentile_00_5", "percentile_99_5")}
    out["cases"] = {}
    for c in sorted(props["size_reductions"]):
        with open(os.path.join(cropped, f"{c}.pkl"), "rb") as f:
            p = pickle.load(f)
        out["cases"][c] = {"crop_bbox": p["crop_bbox"], "size_after_cropping": list(p["size_after_cropping"]),
                           "original_spacing": list(p["original_spacing"])}
    out["plan_seconds"] = time.perf_counter() - t0
    if preprocess:
        t0 = time.perf_counter()
        planner.run_preprocessing(1)
        out["preprocess_seconds"] = time.perf_counter() - t0
        folder = os.path.join(pre, f"{planner.data_identifier}_stage{out['num_stages'] - 1}")
        for c in out["cases"]:
            data = np.load(os.path.join(folder, f"{c}.npz"))["data"]
            with open(os.path.join(folder, f"{c}.pkl"), "rb") as f:
                p = pickle.load(f)
            _ref.save_array(a, f"{name}__{c}__image", data[0])
            _ref.save_array(a, f"{name}__{c}__label", data[-1])
            for cls, locs in p["class_locations"].items():
                _ref.save_array(a, f"{name}__{c}__locs{cls}", np.asarray(locs, dtype=np.int64).reshape(-1, 3))
            out["cases"][c]["size_after_resampling"] = list(p["size_after_resampling"])
            out["cases"][c]["classes"] = sorted(int(k) for k in p["class_locations"])
    return out


def fingerprint_path(name: str, fp: dict) -> dict:
    """v1's planner on a dataset_properties built from our fingerprint (no images: dummy case files)."""
    folder = os.path.join(nnUNet_cropped_data, f"fp_{name}")
    os.makedirs(folder)
    cases = sorted(fp["cases"])
    for c in cases:  # the planner counts the .npz files and rewrites each case's .pkl
        open(os.path.join(folder, f"{c}.npz"), "wb").close()
        with open(os.path.join(folder, f"{c}.pkl"), "wb") as f:
            pickle.dump({}, f)
    st = fp["foreground_intensity"]
    props = {"all_sizes": [tuple(fp["cases"][c]["shape"]) for c in cases],
             "all_spacings": [np.array(fp["cases"][c]["spacing"]) for c in cases],
             "all_classes": [int(k) for k in fp["labels"] if int(k) > 0],
             "modalities": {int(k): v for k, v in fp["modality"].items()},
             "intensityproperties": {0: {"mean": st["mean"], "sd": st["std"], "percentile_00_5": st["percentile_00_5"],
                                         "percentile_99_5": st["percentile_99_5"]}},
             "size_reductions": {c: 1.0 for c in cases}}
    with open(os.path.join(folder, "dataset_properties.pkl"), "wb") as f:
        pickle.dump(props, f)
    pre = os.path.join(preprocessing_output_dir, f"fp_{name}")
    os.makedirs(pre)
    planner = ExperimentPlanner3D_v21(folder, pre)
    planner.plan_experiment()
    return fullres(planner)


def main() -> None:
    """Plan every raw task and fingerprint named in the arguments."""
    a = _ref.args()
    result = {}
    for name, raw in a.get("raw", {}).items():
        result[name] = real_path(a, name, raw, name in a.get("preprocess", []))
    if a.get("fingerprints"):
        with open(a["fingerprints"]) as f:
            for name, fp in json.load(f).items():
                result[name] = fingerprint_path(name, fp)
    _ref.done(a, result)


if __name__ == "__main__":
    main()
