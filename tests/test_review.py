"""The review: sources, the case table and its sorting, verdicts in qa_review.csv, the headless report."""
import csv
import json
import os
import time

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import review_run
from unetpp_lib.core import io
from unetpp_lib.qa import browser, plots, review


@pytest.fixture(scope="module")
def run(synth_task, tmp_path_factory):
    return review_run(tmp_path_factory.mktemp("review"), synth_task)


def test_case_table_sorting_and_sources(run):
    root, val = run
    cases = review.cases_of(root, "auto", 0, [])
    assert [c.case for c in cases] == val and all(c.reference for c in cases)
    assert review.cases_of(root, "auto", 0, [0]) == cases  # with folds listed: their validation cases pooled
    rows = review.case_rows(cases)
    by = {r["case"]: r for r in rows}
    assert by[val[0]]["tumour_dice"] == 1.0 and by[val[0]]["missed"] == 0 and by[val[0]]["volume_error"] == 0.0
    worst = review.sort_rows(rows, "tumour Dice, worst first")
    assert [r["tumour_dice"] for r in worst] == sorted(r["tumour_dice"] for r in rows)
    assert worst[-1]["case"] == val[0]
    assert [r["case"] for r in review.sort_rows(rows, "case")] == sorted(val)
    nan_row = {**rows[0], "case": "zz", "liver_dice": float("nan")}
    assert review.sort_rows(rows + [nan_row], "liver Dice, worst first")[-1]["case"] == "zz"  # NaN last
    summary = json.loads((root / "fold_0" / "validation" / "summary.json").read_text())
    assert [c["case"] for c in summary["lesions"]["per_case"]] == val
    with pytest.raises(ValueError, match="review source 'nope'"):
        review.cases_of(root, "nope")


def test_verdicts_round_trip_and_survive(run, tmp_path):
    root, val = run
    folder = root / "fold_0" / "validation"
    review.write_verdict(folder, val[1], "fix", "tumour shifted, ")
    review.write_verdict(folder, val[0], "accept")
    review.write_verdict(folder, val[1], "reject", "worse than I thought")  # replaces the first
    rows = list(csv.DictReader(open(folder / "qa_review.csv")))
    assert [(r["case"], r["verdict"], r["note"]) for r in rows] == [(val[0], "accept", ""),
                                                                    (val[1], "reject", "worse than I thought")]
    assert not list(folder.glob("*.partial*"))
    cases = review.cases_of(root, "validation", 0)
    assert {r["case"]: r["verdict"] for r in review.case_rows(cases)}[val[1]] == "reject"
    counts = {s["verdict"]: s["cases"] for s in review.verdict_summary(cases)}
    assert counts == {"accept": 1, "fix": 0, "reject": 1, "not reviewed": 1}
    with pytest.raises(ValueError, match="verdict 'maybe'"):
        review.write_verdict(folder, val[2], "maybe")
    # a prediction newer than its verdict (predicted again) keeps the verdict, marked as made before it
    assert not any(r["stale"] for r in review.case_rows(cases))
    pred = folder / f"{val[0]}.nii.gz"
    os.utime(pred, (pred.stat().st_atime, time.time() + 60))
    row = {r["case"]: r for r in review.case_rows(cases)}[val[0]]
    assert row["stale"] and review.case_label(row).endswith("[accept, made before this prediction]")


def test_headless_report_writes_pictures_and_lesion_table(run, capsys):
    root, val = run
    folder = root / "fold_0" / "validation"
    assert browser.open_review(root, "validation", 0, headless=True) is None
    assert (folder / "gallery.png").is_file() and all((folder / "qa" / f"{c}.png").is_file() for c in val)
    table = list(csv.DictReader(open(folder / "lesions.csv")))
    assert {r["case"] for r in table} <= set(val) and {"lesion", "volume_ml", "finding", "dice"} <= set(table[0])
    # the error-map picture of the shifted case shows all four palette colours
    pixels = imread(folder / "qa" / f"{val[2]}.png")[..., :3]
    for name, rgb in plots.PALETTE.items():
        blended = 0.55 * np.array(rgb)  # over a CT grey g: 0.55 rgb + 0.45 g; the differences between channels stay
        diff = pixels - pixels.mean(-1, keepdims=True)
        near = np.abs(diff - (blended - blended.mean())).max(-1) < 0.06
        assert near.sum() > 3, name


def test_test_predictions_without_ground_truth(run):
    root, val = run
    out = root / "test_ensemble"
    images = sorted((root / "raw" / "imagesTs").glob("*_0000.nii.gz"))
    for im in images:
        ct, geom = io.read_image(im)
        io.write_image(out / im.name.replace("_0000", ""), (ct > ct.mean()).astype(np.uint8) * 2, geom)
    cases = review.cases_of(root, "test_ensemble")
    assert len(cases) == len(images) and all(c.reference is None for c in cases)
    rows = review.case_rows(cases)
    assert all(np.isnan(r["liver_dice"]) and r["predicted"] >= 1 for r in rows)
    review.write_static(cases, rows)
    assert (out / "gallery.png").is_file() and (out / "lesions.csv").is_file()
