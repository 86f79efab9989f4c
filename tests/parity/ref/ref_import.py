"""A fold of the v1 UNet++ fork written by v1's own code, then predicted as v1's `predict_cases` predicts.

args: cases = [[spacing (z, y, x), shape], ...] (a dataset for v1's ExperimentPlanner3D_v21, no images),
intensity = {mean, sd, percentile_00_5, percentile_99_5}, base (base_num_features), seed, epochs,
image (a raw CT .nii.gz to predict).
Writes `<out>/results/Task500_Liver/nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1/` as v1 leaves it: plans.pkl
beside fold_0/ with model_final_checkpoint.model + .model.pkl (NetworkTrainer/nnUNetTrainer.save_checkpoint,
so every byte of the three files is v1's). Then, as predict_cases: restore the trainer from the .pkl,
load the checkpoint, preprocess the image (preprocess_patient) and predict it (mirroring on the trainer's
axes, sliding window, step 0.5, Gaussian, all_in_gpu False, fp32).
Result: fold, plans (the stage's values), stage; arrays data.npy (preprocessed image), softmax.npy, seg.npy.
"""
import os
import pickle
import shutil
from collections import OrderedDict

import _ref

a = _ref.args()
_ref.cpu_only()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import load_pickle  # noqa: E402
from fork_unetpp import ForkUNetPlusPlus  # noqa: E402
from nnunet.experiment_planning.experiment_planner_baseline_3DUNet_v21 import ExperimentPlanner3D_v21  # noqa: E402
from nnunet.paths import nnUNet_cropped_data, preprocessing_output_dir  # noqa: E402
from nnunet.training.network_training.nnUNetTrainer import nnUNetTrainer  # noqa: E402

TASK = "Task500_Liver"
FORK_MODULE = "nnunet.training.network_training.nnUNetPlusPlusTrainerV2"  # where the fork keeps its trainer


class nnUNetPlusPlusTrainerV2(nnUNetTrainer):
    """The fork's trainer as far as saving and predicting go: its network (ForkUNetPlusPlus), SGD 0.99 Nesterov."""

    def initialize_network(self):
        """Generic_UNetPlusPlus as the fork's initialize_network builds it (3D)."""
        self.network = ForkUNetPlusPlus(self.num_input_channels, self.base_num_features, self.num_classes,
                                        self.net_num_pool_op_kernel_sizes, self.net_conv_kernel_sizes,
                                        convs=self.conv_per_stage)

    def initialize_optimizer_and_scheduler(self):
        """The fork's SGD (no scheduler: poly lr is set per epoch)."""
        self.optimizer = torch.optim.SGD(self.network.parameters(), 1e-2, weight_decay=self.weight_decay,
                                         momentum=0.99, nesterov=True)
        self.lr_scheduler = None


nnUNetPlusPlusTrainerV2.__module__ = FORK_MODULE  # str(class) in the .pkl reads as the fork's


def plan(cases: list, intensity: dict, base: int) -> str:
    """v1's planner on a dataset described by spacings and shapes (the analyzer's types); the plans file."""
    cropped = os.path.join(nnUNet_cropped_data, TASK)
    os.makedirs(cropped)
    names = [f"liver_{i}" for i in range(len(cases))]
    for n in names:  # the planner counts the .npz files and rewrites each case's .pkl
        open(os.path.join(cropped, f"{n}.npz"), "wb").close()
        with open(os.path.join(cropped, f"{n}.pkl"), "wb") as f:
            pickle.dump(OrderedDict(), f)
    stats = OrderedDict((k, np.float64(intensity[k])) for k in ("median", "mean", "sd", "mn", "mx",
                                                                 "percentile_99_5", "percentile_00_5"))
    stats["local_props"] = OrderedDict((n, OrderedDict(stats)) for n in names)
    props = {"all_sizes": [tuple(int(s) for s in shape) for _, shape in cases],
             "all_spacings": [np.array(sp, dtype=np.float64) for sp, _ in cases],
             "all_classes": [1, 2], "modalities": {0: "CT"},
             "intensityproperties": OrderedDict([(0, stats)]),
             "size_reductions": OrderedDict((n, np.float64(1.0)) for n in names)}
    with open(os.path.join(cropped, "dataset_properties.pkl"), "wb") as f:
        pickle.dump(props, f)
    pre = os.path.join(preprocessing_output_dir, TASK)
    os.makedirs(pre)
    planner = ExperimentPlanner3D_v21(cropped, pre)
    planner.unet_base_num_features = base  # a small network: the planner writes it into the plans
    planner.plan_experiment()
    return planner.plans_fname


def write_fold(plans_file: str, seed: int, epochs: int) -> tuple[str, int]:
    """Train-free fold: the fork's network with perturbed weights and one SGD step, saved by v1's trainer."""
    stages = load_pickle(plans_file)["plans_per_stage"]
    stage = max(stages)  # 3d_fullres: the last stage
    base = os.path.join(os.environ["RESULTS_FOLDER"], TASK, "nnUNetPlusPlusTrainerV2__nnUNetPlansv2.1")
    tr = nnUNetPlusPlusTrainerV2(plans_file, 0, base, os.path.dirname(plans_file), True, stage, True, True, True)
    fold = tr.output_folder  # <base>/fold_0, as update_fold makes it
    tr.initialize(False)
    torch.manual_seed(seed)
    with torch.no_grad():  # non-trivial norms and biases: a wrong mapping of any of them shows
        for name, p in tr.network.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "instnorm" in name else 0.05) * (p.abs().mean() + 0.1))
    x = torch.randn(1, tr.num_input_channels, *tr.patch_size.tolist())
    tr.network(x).square().mean().backward()
    tr.optimizer.step()  # momentum buffers in the optimizer state, as a real checkpoint has
    tr.optimizer.zero_grad()
    tr.epoch = epochs - 1
    tr.all_tr_losses = [np.float64(1 - 0.01 * e) for e in range(epochs)]
    tr.all_val_losses = [np.float64(1 - 0.009 * e) for e in range(epochs)]
    tr.all_val_eval_metrics = [np.float64(0.01 * e) for e in range(epochs)]
    tr.amp_grad_scaler = torch.amp.GradScaler("cpu")  # trained with fp16 (v1's default): its scaler is saved
    tr.save_checkpoint(os.path.join(fold, "model_final_checkpoint.model"))
    shutil.copy(plans_file, os.path.join(base, "plans.pkl"))  # as run_training does
    return fold, stage


def predict(fold: str, image: str) -> nnUNetTrainer:
    """v1's predict_cases for one image and this fold: restore_model, load the checkpoint, preprocess, predict;
    saves the preprocessed image, softmax and segmentation, returns the restored trainer."""
    info = load_pickle(os.path.join(fold, "model_final_checkpoint.model.pkl"))
    tr = nnUNetPlusPlusTrainerV2(*info["init"])
    tr.fp16 = False  # restore_model(fp16=mixed_precision) as predict_cases calls it, fp32 here
    tr.process_plans(info["plans"])
    tr.output_folder = tr.output_folder_base = os.path.dirname(fold)
    tr.initialize(False)
    # v1 calls torch.load without weights_only, which torch >= 2.6 turns on; loading the file just written here
    ckpt = torch.load(os.path.join(fold, "model_final_checkpoint.model"), map_location="cpu", weights_only=False)
    tr.load_checkpoint_ram(ckpt, False)
    data, _, _ = tr.preprocess_patient([image])
    seg, softmax = tr.predict_preprocessed_data_return_seg_and_softmax(
        data, do_mirroring=True, mirror_axes=tr.data_aug_params["mirror_axes"], use_sliding_window=True,
        step_size=0.5, use_gaussian=True, all_in_gpu=False, verbose=False, mixed_precision=False)
    _ref.save_array(a, "data", data)
    _ref.save_array(a, "softmax", softmax)
    _ref.save_array(a, "seg", seg)
    return tr


torch.set_num_threads(1)
plans_file = plan(a["cases"], a["intensity"], a["base"])
fold, stage = write_fold(plans_file, a["seed"], a["epochs"])
tr = predict(fold, a["image"])
s = load_pickle(plans_file)["plans_per_stage"][stage]
_ref.done(a, {"fold": fold, "stage": stage, "mirror_axes": tr.data_aug_params["mirror_axes"],
              "plans": {k: s[k] for k in ("patch_size", "current_spacing", "pool_op_kernel_sizes",
                                          "conv_kernel_sizes", "batch_size", "num_pool_per_axis")},
              "transpose_forward": tr.transpose_forward, "num_classes": tr.num_classes})
