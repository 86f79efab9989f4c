"""File and folder names (core/layout.py): nnU-Net v1's rules."""
import pytest

from unetpp_lib.core import layout


def test_file_name_rules_match_nnunet_v1():
    assert layout.case_of_file("./imagesTr/liver_3.nii.gz") == "liver_3"  # v1's [:-7]
    assert layout.case_of_image("/x/imagesTs/liver_3_0000.nii.gz") == "liver_3"
    assert layout.prediction_name("/x/liver_3_0000.nii.gz") == "liver_3.nii.gz"
    assert layout.prediction_name("/x/scan.nii.gz") == "scan.nii.gz"  # a name without the channel is kept
    raw = layout.RunLayout("r").raw
    assert raw.image("liver_3").as_posix() == "r/raw/imagesTr/liver_3_0000.nii.gz"
    assert raw.image("liver_3", test=True).as_posix() == "r/raw/imagesTs/liver_3_0000.nii.gz"
    assert raw.label("liver_3").as_posix() == "r/raw/labelsTr/liver_3.nii.gz"
    fold = layout.RunLayout("r").fold(2)
    assert fold.sidecar("best").as_posix() == "r/fold_2/checkpoint_best.json"
    # the seed's get_dice_result.py reads this file; nnU-Net v1 users find predictions under these names
    assert fold.validation.summary.as_posix() == "r/fold_2/validation/summary.json"
    assert fold.validation.case("liver_3").as_posix() == "r/fold_2/validation/liver_3.nii.gz"
    with pytest.raises(ValueError, match="use one of"):
        fold.checkpoint("last")
    assert layout.dataset_entries(["a"], ["b"]) == {"training": [{"image": "./imagesTr/a.nii.gz",
                                                                  "label": "./labelsTr/a.nii.gz"}],
                                                    "test": ["./imagesTs/b.nii.gz"]}
