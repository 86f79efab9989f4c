"""v1's DataLoader3D (as nnUNetTrainer builds it) on cases written in v1's format: where its boxes land.

args: cases, each {npz: data+seg stacked (2, X, Y, Z), pkl: properties with class_locations, patch (loaded box),
final (network patch)}; batch_size, batches, seed; oversample_batches: batch sizes for get_do_oversample.
The image channel holds flat index + 1 (0 outside), so each returned box's corner is recoverable.
Saves per case k: data_k (N, B, *patch) image boxes and seg_k (N, B, *patch) label boxes.
"""
import types

import numpy as np

import _ref

a = _ref.args()
from batchgenerators.utilities.file_and_folder_operations import load_pickle  # noqa: E402
from nnunet.training.dataloading.dataset_loading import DataLoader3D  # noqa: E402

np.random.seed(a["seed"])  # v1 draws from numpy's global generator
for k, case in enumerate(a["cases"]):
    # one loader per case: v1 keeps an enlarged need_to_pad once it met a case smaller than the patch
    dataset = {f"case{k}": {"data_file": case["npz"], "properties": load_pickle(case["pkl"])}}
    dl = DataLoader3D(dataset, case["patch"], case["final"], a["batch_size"], False,
                      oversample_foreground_percent=0.33, pad_mode="constant", pad_sides=None, memmap_mode="r")
    batches = [dl.generate_train_batch() for _ in range(a["batches"])]
    # exact as integers: index + 1 <= 2048 and labels -1..2 (kept small for the file round trip)
    _ref.save_array(a, f"data_{k}", np.stack([b["data"][:, 0] for b in batches]).astype(np.int16))
    _ref.save_array(a, f"seg_{k}", np.stack([b["seg"][:, 0] for b in batches]).astype(np.int8))
oversample = {str(b): [bool(DataLoader3D.get_do_oversample(
    types.SimpleNamespace(batch_size=b, oversample_foreground_percent=0.33), j)) for j in range(b)]
    for b in a["oversample_batches"]}
_ref.done(a, {"oversample": oversample})
