"""A fold folder is a model on its own: copied alone it predicts; its plans are checked against its checkpoint."""
import json
import shutil

import numpy as np
import pytest

from conftest import prepared_run
from unetpp_lib.core import io, layout
from unetpp_lib.nn import checkpoint, infer
from unetpp_lib.train import TrainConfig, train


@pytest.fixture(scope="module")
def trained(synth_task, tmp_path_factory):
    run = prepared_run(tmp_path_factory.mktemp("layout"), synth_task, {"patch_size": [16, 32, 32],
                                                                        "base_num_features": 4})
    train(TrainConfig(str(run), fold=0, num_epochs=1, iterations_per_epoch=2, val_iterations=1,
                      num_workers=0, device="cpu"))
    return run


def test_a_fold_folder_copied_alone_predicts(trained, tmp_path):
    run = layout.RunLayout(trained)
    alone = tmp_path / "elsewhere" / "my_model"
    shutil.copytree(run.fold(0).root, alone)  # nothing else of the run comes along
    assert json.loads(layout.FoldLayout(alone).plans.read_text()) == json.loads(run.pre.plans.read_text())
    image = run.raw.test_images()[0]
    settings = infer.InferenceSettings(device="cpu", mirror_axes=())
    copied = infer.predict([image], [alone], tmp_path / "copied", settings)
    original = infer.predict([image], [run.fold(0).root], tmp_path / "original", settings)
    a, geom = io.read_image(copied[0]["prediction"])
    assert io.same_geometry(geom, io.read_image(image)[1])
    assert np.array_equal(a, io.read_image(original[0]["prediction"])[0])


def test_load_model_refuses_plans_of_another_preprocessing(trained, tmp_path):
    alone = shutil.copytree(layout.RunLayout(trained).fold(0).root, tmp_path / "fold")
    plans_path = layout.FoldLayout(alone).plans
    plans = json.loads(plans_path.read_text())
    plans["preprocessing_hash"] = "0" * 16
    plans_path.write_text(json.dumps(plans))
    with pytest.raises(ValueError, match="trained for plans"):
        infer.load_model(alone, "final", "cpu")
    plans_path.unlink()
    with pytest.raises(FileNotFoundError, match="plans.json"):
        infer.load_model(alone, "final", "cpu")


def test_a_fold_trained_before_folds_held_plans_adopts_the_runs(trained, tmp_path):
    run = layout.RunLayout(shutil.copytree(trained, tmp_path / "old_run"))
    run.fold(0).plans.unlink()  # as a fold trained by an earlier version
    checkpoint.adopt_run_plans(run, 0)
    assert json.loads(run.fold(0).plans.read_text()) == json.loads(run.pre.plans.read_text())
    run.fold(0).plans.unlink()
    plans = json.loads(run.pre.plans.read_text())
    run.pre.plans.write_text(json.dumps({**plans, "preprocessing_hash": "f" * 16}))  # the run was re-planned since
    checkpoint.adopt_run_plans(run, 0)
    assert not run.fold(0).plans.is_file()  # its checkpoints are of other plans: nothing adopted
