"""The review where predictions carry uncertainty maps: the doubt column and its sort, lesion confidences in the
case findings and lesions.csv, and the heat-map row of the error-map pictures."""
import csv
import json
import shutil

import numpy as np
import pytest
from matplotlib.image import imread

from conftest import review_run
from unetpp_lib.core import io
from unetpp_lib.core.layout import PredLayout
from unetpp_lib.evaluation import uncertainty
from unetpp_lib.qa import browser, plots, review

NAN = float("nan")


@pytest.fixture(scope="module")
def run(synth_task, tmp_path_factory):
    return review_run(tmp_path_factory.mktemp("review_uncertainty"), synth_task)


def boxes(shape: tuple) -> dict[str, tuple]:
    """Where the hand-made prediction and maps put things (the test scans differ in size): liver, a small tumour
    (P1), a larger one (P2), and the doubtful block around P2."""
    z, y, x = shape
    zc = z // 2
    return {"liver": np.s_[max(0, zc - 2):zc + 3, y // 5:4 * y // 5, x // 5:4 * x // 5],
            "p1": np.s_[zc - 1:zc + 1, y // 4:y // 4 + 4, x // 4:x // 4 + 4],
            "p2": np.s_[zc - 1:zc + 2, y // 2 + 2:y // 2 + 7, x // 2 + 2:x // 2 + 7],
            "doubt": np.s_[max(0, zc - 2):zc + 3, y // 2:y // 2 + 9, x // 2:x // 2 + 9]}


def two_lesions(shape: tuple) -> np.ndarray:
    """A prediction: a liver block with a small tumour (P1) and a larger one (P2) in it."""
    pred = np.zeros(shape, np.uint8)
    b = boxes(shape)
    pred[b["liver"]] = 1
    pred[b["p1"]] = 2
    pred[b["p2"]] = 2
    return pred


def write_maps(folder, case: str, pred: np.ndarray, geom, doubt: int) -> dict:
    """Uncertainty maps by hand: a little entropy (5 %) on the prediction, `doubt` % on and around the larger
    tumour; the small tumour confident (95 %), the larger one less so (55 %)."""
    b = boxes(pred.shape)
    entropy = np.where(pred > 0, 5, 0).astype(np.uint8)
    entropy[b["doubt"]] = doubt
    confidence = np.where(pred > 0, 90, 70).astype(np.uint8)
    confidence[b["p1"]] = 95
    confidence[b["p2"]] = 55
    maps = {"entropy": entropy, "spread": entropy // 2, "confidence": confidence}
    for kind, arr in maps.items():
        io.write_image(PredLayout(folder).uncertainty(case, kind), arr, geom)
    return maps


def test_doubt_sort_puts_the_most_doubtful_first_and_nan_last():
    rows = [{"case": c, "doubt": d, "lesions": NAN} for c, d in (("a", 0.2), ("b", NAN), ("c", 0.9), ("d", 0.5))]
    assert [r["case"] for r in review.sort_rows(rows, review.DOUBT)] == ["c", "d", "a", "b"]
    assert review.default_sort(rows) == next(iter(review.SORTS))  # one case without maps: the usual order
    every = [r for r in rows if r["case"] != "b"]
    assert review.default_sort(every) == review.DOUBT  # no ground truth, every case doubted
    assert [r["case"] for r in review.report_order(every)] == ["c", "d", "a"]
    labelled = [{**r, "lesions": 2} for r in every]
    assert review.default_sort(labelled) == next(iter(review.SORTS))  # with ground truth: Dice first


@pytest.fixture
def test_set(run):
    """The run's test ensemble predicted by hand (two lesions a case) with uncertainty maps, the second case
    the more doubtful; (run, folder, {case: (maps, prediction, geometry)})."""
    root, _ = run
    out = root / "test_ensemble"
    images = sorted((root / "raw" / "imagesTs").glob("*_0000.nii.gz"))
    maps = {}
    for im, doubt in zip(images, (30, 90)):
        case = im.name.replace("_0000.nii.gz", "")
        geom = io.read_image(im)[1]
        pred = two_lesions(geom.shape)
        io.write_image(out / f"{case}.nii.gz", pred, geom)
        maps[case] = (write_maps(out, case, pred, geom, doubt), pred, geom)
    return root, out, maps


def test_test_folder_rows_doubt_lesion_confidence_and_pictures_from_maps(test_set):
    root, out, maps = test_set
    images = sorted((root / "raw" / "imagesTs").glob("*_0000.nii.gz"))
    assert not (out / "summary.json").exists()
    cases = review.cases_of(root, "test_ensemble")
    rows = review.case_rows(cases)
    for r in rows:
        m, pred, geom = maps[r["case"]]
        assert r["doubt"] == pytest.approx(uncertainty.case_score(m["entropy"], pred, geom.spacing))
        p1, p2 = r["findings"]["predicted"]
        assert p1["probability"] == pytest.approx(0.95) and p2["probability"] == pytest.approx(0.55)
        assert p2["uncertainty"] > p1["uncertainty"]
        assert f"doubt {r['doubt']:.3f}" in review.case_label(r)
    doubtful = max(maps, key=lambda c: maps[c][0]["entropy"].max())
    assert review.default_sort(rows) == review.DOUBT
    assert review.sort_rows(rows, review.DOUBT)[0]["case"] == doubtful
    table = review.lesion_table([r["findings"] for r in rows])
    assert {r["probability"] for r in table} == {0.95, 0.55}
    assert browser.lesion_label(table[0]).endswith("tumour probability 95 %, uncertainty 5 %")
    review.write_static(cases, rows)
    written = list(csv.DictReader(open(out / "lesions.csv")))
    assert {"probability", "uncertainty"} <= set(written[0]) and len(written) == 2 * len(images)
    # the error-map picture gains a heat-map row; without maps it stays as it was
    case = doubtful
    with_maps = imread(out / "qa" / f"{case}.png")
    shutil.rmtree(out / "uncertainty")
    plots.error_png(root / "raw" / "imagesTs" / f"{case}_0000.nii.gz", None, out / f"{case}.nii.gz",
                    out / "plain.png")
    plain = imread(out / "plain.png")
    assert with_maps.shape[0] > 1.5 * plain.shape[0] and with_maps.shape[1] == plain.shape[1]
    heat = 0.55 * plots.heat_rgb(90)  # over a CT grey g: 0.55 heat + 0.45 g; the channel differences stay
    diff = with_maps[..., :3] - with_maps[..., :3].mean(-1, keepdims=True)
    assert (np.abs(diff - (heat - heat.mean())).max(-1) < 0.05).sum() > 20
    rows = review.case_rows(cases)  # maps gone: no doubt, no confidences, the usual order
    assert all(np.isnan(r["doubt"]) for r in rows) and review.default_sort(rows) == next(iter(review.SORTS))
    assert "probability" not in review.lesion_table([r["findings"] for r in rows])[0]


def test_scored_folder_takes_doubt_and_confidence_from_summary_else_from_maps(run, tmp_path):
    root, val = run
    folder = tmp_path / "validation"
    shutil.copytree(root / "fold_0" / "validation", folder)
    cases = [review.Case(c.case, c.image, folder / c.prediction.name, c.reference, folder)
             for c in review.cases_of(root, "validation", 0)]
    assert all(np.isnan(r["doubt"]) for r in review.case_rows(cases))  # scored, no maps
    pred, geom = io.read_image(cases[2].prediction)
    m = write_maps(folder, val[2], pred.astype(np.uint8), geom, 80)
    rows = {r["case"]: r for r in review.case_rows(cases)}
    assert rows[val[2]]["doubt"] == pytest.approx(uncertainty.case_score(m["entropy"], pred, geom.spacing))
    assert np.isnan(rows[val[0]]["doubt"]) and review.default_sort(list(rows.values())) == next(iter(review.SORTS))
    found = rows[val[2]]["findings"]["predicted"]
    assert found and all("probability" in p for p in found)
    table = [r for r in review.lesion_table([r["findings"] for r in rows.values()]) if r["case"] == val[2]]
    assert all(np.isfinite(r["probability"]) for r in table if r["finding"] != "missed")
    # summary.json's uncertainty section (and its lesions' confidences) win over the maps
    summary = json.loads((folder / "summary.json").read_text())
    summary["uncertainty"] = {"per_case": [{"case": val[2], "score": 0.777, "score_by_label": {}, "predicted_ml": 1}]}
    for c in summary["lesions"]["per_case"]:
        for p in c["predicted"]:
            p.update(probability=0.123, uncertainty=0.456)
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = {r["case"]: r for r in review.case_rows(cases)}
    assert rows[val[2]]["doubt"] == 0.777 and np.isnan(rows[val[1]]["doubt"])
    assert {p["probability"] for p in rows[val[1]]["findings"]["predicted"]} == {0.123}


def test_browser_widget_heat_map_mode_most_uncertain_jump_and_lesion_confidence(test_set):
    pytest.importorskip("ipyniivue")
    from unetpp_lib.qa import viz

    root, out, maps = test_set
    cases = review.cases_of(root, "test_ensemble")
    b = browser.Browser(cases, review.case_rows(cases))
    doubtful = max(maps, key=lambda c: maps[c][0]["entropy"].max())
    assert b.sort.value == review.DOUBT and b.current == doubtful  # no ground truth: the most doubtful first
    assert [v for _, v in b.mode.options] == ["prediction", "uncertainty"] and not b.uncertain.disabled
    heat = b.nv.volumes[2]  # CT, prediction, uncertainty
    assert (heat.colormap, heat.cal_min, heat.cal_max, heat.opacity) == (plots.HEAT_COLORMAP, plots.HEAT_FLOOR,
                                                                         100.0, 0.0)
    b.mode.value = "uncertainty"
    assert [v.opacity for v in b.nv.volumes[1:]] == [0.0, 0.55] and "% of ln C" in b.legend.value
    point = uncertainty.most_uncertain_point(maps[doubtful][0]["entropy"])
    b.uncertain.click()
    assert b.nv.scene.crosshair_pos == viz.crosshair_frac(point, maps[doubtful][2])
    assert f"({point[0]}, {point[1]}, {point[2]}), uncertainty 90 %" in b.where.value
    assert [label.split("  ")[-1] for label, _ in b.lesion_list.options] == [
        "tumour probability 95 %, uncertainty 5 %", "tumour probability 55 %, uncertainty 90 %"]
    b.three_d.value = True
    assert {m.name for m in b.nv3d.meshes} == {"predicted_liver.mz3", "uncertain.mz3"}
    # a case without maps offers no heat map; the mode falls back to the prediction
    other = next(c for c in maps if c != doubtful)
    for kind in ("entropy", "spread", "confidence"):
        PredLayout(out).uncertainty(other, kind).unlink()
    b.show(other)
    assert b.mode.value == "prediction" and [v for _, v in b.mode.options] == ["prediction"] and b.uncertain.disabled
    assert len(b.nv.volumes) == 2 and "uncertainty" not in b.where.value
