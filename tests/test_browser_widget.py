"""The review's case browser as a widget (no JupyterLab): stepping, modes, the 3D view, lesion jumps, verdicts."""
import pytest

from conftest import review_run
from unetpp_lib.qa import browser, plots, review


@pytest.fixture(scope="module")
def run(synth_task, tmp_path_factory):
    return review_run(tmp_path_factory.mktemp("browser"), synth_task)


def test_browser_widget_steps_jumps_and_records(run):
    pytest.importorskip("ipyniivue")
    root, val = run
    cases = review.cases_of(root, "validation", 0)
    b = browser.Browser(cases, review.case_rows(cases))
    assert len(b.nv.volumes) == 4 and b.nv.volumes[3].opacity == 0.55  # CT, prediction, reference, error map
    assert b.nv.volumes[0].cal_min == plots.WINDOW_HU[0] and b.nv.volumes[0].cal_max == plots.WINDOW_HU[1]
    first = b.current
    b.step(1)
    assert b.current != first
    b.mode.value = "reference"
    assert [v.opacity for v in b.nv.volumes[1:]] == [0.0, 0.55, 0.0]
    b.three_d.value = True
    assert len(b.views.children) == 2 and len(b.nv3d.meshes) >= 1
    if b.spots:
        b.lesion_list.value = 0
        assert b.nv.scene.crosshair_pos != [0.5, 0.5, 0.5]
    b.note.value = "checked"
    b.verdict.value = "fix"
    assert review.read_verdicts(cases[0].folder)[b.current]["note"] == "checked"
    assert "[fix]" in dict((v, k) for k, v in b.list.options)[b.current]
