import ast
import json
from pathlib import Path

import pytest

from unetpp_lib import params as P

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["demo.yaml", "task03_fullres.yaml"])
def test_shipped_params_files_load(name):
    values = P.load(ROOT / "params" / name)
    assert values["run_dir"] and values["device"] in ("cpu", "auto")


def test_unknown_key_names_key_file_and_suggests(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("run_dir: runs/x\nnum_wokers: 4\n")
    with pytest.raises(P.ParamsError) as err:
        P.load(f)
    msg = str(err.value)
    assert str(f) in msg and "'num_wokers'" in msg and "did you mean 'num_workers'" in msg


@pytest.mark.parametrize("text, words", [
    ("fold: '0'", "'fold' must be int"),
    ("fold: true", "'fold' must be int"),  # a bool is not an int
    ("synth_quirks: 1", "'synth_quirks' must be bool"),
    ("synth_shape: [16, 32, 32]", None),
    ("synth_shape: [16, 32]", "'synth_shape' must hold 3 values"),
    ("synth_shape: [16, x, 32]", r"'synth_shape' must be list\[int\]"),
    ("device: gpu", "'device' must be one of"),
    ("num_workers: -1", "'num_workers' must be >= 0"),
])
def test_wrong_types_and_values(tmp_path, text, words):
    f = tmp_path / "p.yaml"
    f.write_text(text + "\n")
    if words is None:
        P.load(f)
        return
    with pytest.raises(P.ParamsError, match=words) as err:
        P.load(f)
    assert str(f) in str(err.value)


def test_all_problems_in_one_message():
    with pytest.raises(P.ParamsError) as err:
        P.check({"fold": "a", "bogus": 1, "device": "tpu"}, source="x.yaml")
    msg = str(err.value)
    assert msg.count("x.yaml") >= 1 and "'fold'" in msg and "'bogus'" in msg and "'device'" in msg


def test_bad_yaml_and_missing_file(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("run_dir: [unclosed\n")
    with pytest.raises(P.ParamsError, match="not valid YAML"):
        P.load(f)
    f.write_text("- a\n- b\n")
    with pytest.raises(P.ParamsError, match="mapping"):
        P.load(f)
    with pytest.raises(P.ParamsError, match="not found"):
        P.load(tmp_path / "none.yaml")


def test_parse_set_reads_yaml_values():
    assert P.parse_set(["fold=2", "synth_shape=[8, 16, 16]", "msd_dir=", "synth_quirks=false"]) == {
        "fold": 2, "synth_shape": [8, 16, 16], "msd_dir": "", "synth_quirks": False}
    with pytest.raises(P.ParamsError, match="expected key=value"):
        P.parse_set(["fold"])
    with pytest.raises(P.ParamsError, match="--set"):
        P.parse_set(["fold=one"])


def test_resolve_paths(tmp_path):
    out = P.resolve_paths({"run_dir": "runs/a", "msd_dir": "", "fold": 1}, tmp_path)
    assert out == {"run_dir": str(tmp_path / "runs" / "a"), "msd_dir": "", "fold": 1}


@pytest.mark.parametrize("nb", sorted((ROOT / "notebooks").glob("0*.ipynb")), ids=lambda p: p.name)
def test_notebook_parameters_follow_the_contract(nb):
    """First code cell tagged `parameters`: annotated literals whose names and types the schema knows."""
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    assert "parameters" in cells[0]["metadata"].get("tags", [])
    assert all(not c.get("outputs") for c in cells)  # sources are committed without outputs
    tree = ast.parse("".join(cells[0]["source"]))
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), ast.unparse(node)
        name, annotation = node.target.id, ast.unparse(node.annotation)
        assert name in P.SCHEMA and P.SCHEMA[name].type == annotation, name
        value = ast.literal_eval(node.value)
        P.check({name: value}, source=nb.name)
    assert f"source=\"{nb.stem} parameters\"" in "".join(cells[1]["source"])


def test_resolve_paths_includes_the_splits_file(tmp_path):
    out = P.resolve_paths({"splits_file": "my_splits.json"}, tmp_path)
    assert out["splits_file"] == str(tmp_path / "my_splits.json")


def test_device_may_name_an_index():
    assert P.check({"device": "cuda:1"}, source="t")["device"] == "cuda:1"
    assert P.check({"device": "npu:3"}, source="t")["device"] == "npu:3"
    for bad in ("cuda:x", "gpu", "cuda:"):
        with pytest.raises(P.ParamsError, match="'device' must be one of"):
            P.check({"device": bad}, source="t")
