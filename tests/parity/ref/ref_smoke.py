"""Smoke check: the reference imports every module the parity suite uses."""
import _ref

a = _ref.args()
import batchgenerators  # noqa: E402
import nnunet  # noqa: E402
from nnunet.evaluation.evaluator import aggregate_scores  # noqa: E402,F401
from nnunet.experiment_planning.experiment_planner_baseline_3DUNet_v21 import ExperimentPlanner3D_v21  # noqa: E402,F401
from nnunet.postprocessing.connected_components import determine_postprocessing  # noqa: E402,F401
from nnunet.training.dataloading.dataset_loading import DataLoader3D  # noqa: E402,F401
from nnunet.training.network_training.nnUNetTrainerV2_DDP import nnUNetTrainerV2_DDP  # noqa: E402,F401

_ref.save_array(a, "echo", [1, 2, 3])
_ref.done(a, {"nnunet": getattr(nnunet, "__version__", "1.6.4"), "batchgenerators_file": batchgenerators.__file__})
