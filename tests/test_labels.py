"""Label names in one place (core/labels.py): MSD's dataset.json keeps "cancer", the kit shows "tumour"."""
from unetpp_lib.core.io import write_json
from unetpp_lib.core.labels import MSD_LABELS, shown_name
from unetpp_lib.core.layout import RunLayout
from unetpp_lib.launch import class_names, epoch_line


def test_task03_labels_are_shown_as_the_kit_words():
    assert [shown_name(k, MSD_LABELS[k]) for k in ("1", "2")] == ["liver", "tumour"]
    assert shown_name(2) == "tumour" and shown_name(3) == "class 3"
    assert shown_name(2, "lesion") == "lesion"  # another dataset in the same layout keeps its own words


def test_the_epoch_line_says_tumour(tmp_path):
    run = RunLayout(tmp_path)
    write_json(run.raw.dataset_json, {"labels": MSD_LABELS})
    names = class_names(str(tmp_path), 2)
    line = epoch_line({"epoch": 0, "train_loss": 0.5, "val_loss": 0.4, "pseudo_dice": [0.9, 0.5]}, 10, names, 7.0, 63.0)
    assert names == ["liver", "tumour"] and "liver 0.900  tumour 0.500" in line and "cancer" not in line
