"""v1.6.4's own nnUNetTrainerV2.do_split on lists of case ids: the validation ids of each fold."""
import os

import _ref

a = _ref.args()
from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2  # noqa: E402

out = {}
for name, ids in a["datasets"].items():
    folder = os.path.join(a["out"], name)
    os.makedirs(folder)
    trainer = object.__new__(nnUNetTrainerV2)  # do_split needs only these attributes, not a whole trainer
    trainer.dataset_directory, trainer.dataset = folder, {k: None for k in ids}
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.dataset_tr = trainer.dataset_val = None
    folds = []
    for fold in range(5):
        trainer.fold = fold
        trainer.do_split()
        folds.append({"train": sorted(trainer.dataset_tr), "val": sorted(trainer.dataset_val)})
    out[name] = folds
_ref.done(a, out)
