import ast
import json
from pathlib import Path

import pytest

from unetpp_lib.core import params as P

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
        assert value == P.SCHEMA[name].default, f"{nb.name}: {name} = {value!r}, the schema's default is " \
                                                 f"{P.SCHEMA[name].default!r} (core/params.py declares it once)"
    # the cell declares exactly what the schema lists for the stage, and the next cell resolves them in one call
    assert sorted(node.target.id for node in tree.body) == sorted(P.stage_keys(nb.stem))
    assert f'p = params.resolve("{nb.stem}", globals())' in "".join(cells[1]["source"])
    later = "".join("".join(c["source"]) for c in cells[1:])
    assert "params.check" not in later  # no second list of the parameters


# library defaults that differ from the notebook's on purpose: the pruned mode's level for library and CLI callers
LIBRARY_DEFAULTS = {("InferenceSettings", "pruned_level"): None,  # None: the deepest level
                    ("InferenceSettings", "save_uncertainty"): False}  # library and predict: asked for; 05: on


@pytest.mark.parametrize("cls", ["train.TrainConfig", "nn.infer.InferenceSettings", "benchmark.BenchSettings"])
def test_settings_take_their_defaults_from_the_schema(cls):
    """Every field named like a parameter defaults to the schema's value (a fresh copy of a list each time)."""
    import dataclasses
    import importlib

    module, name = cls.rsplit(".", 1)
    settings = getattr(importlib.import_module(f"unetpp_lib.{module}"), name)
    shared = [f for f in dataclasses.fields(settings) if f.name in P.SCHEMA and f.name != "run_dir"]
    assert len(shared) >= 8
    made, again = settings(**({"run_dir": "r"} if name == "TrainConfig" else {})), None
    for f in shared:
        want = LIBRARY_DEFAULTS.get((name, f.name), P.SCHEMA[f.name].default)
        got = getattr(made, f.name)
        assert (list(got) if isinstance(got, tuple) else got) == want, f"{name}.{f.name}: {got!r} != {want!r}"
    again = settings(**({"run_dir": "r"} if name == "TrainConfig" else {}))
    assert all(getattr(again, f.name) is not getattr(made, f.name) for f in shared
               if isinstance(getattr(made, f.name), list))


def _namespace(stage: str, **changes) -> dict:
    """A notebook's namespace after its parameters cell (the cell's own defaults), plus other globals."""
    cell = next(c for c in json.loads((ROOT / "notebooks" / f"{stage}.ipynb").read_text())["cells"]
                if c["cell_type"] == "code")
    ns = {"__name__": "__main__", "pd": object(), "In": []}
    exec("".join(cell["source"]), ns)
    return {**ns, **changes}


def test_resolve_picks_the_stage_parameters_and_builds_dataclasses(tmp_path):
    from unetpp_lib import benchmark, train
    from unetpp_lib.nn import infer

    p = P.resolve("04_train", _namespace("04_train", run_dir=str(tmp_path / "r"), num_epochs=3))
    assert set(vars(p)) == set(P.stage_keys("04_train")) and p.num_epochs == 3 and p.run_dir == str(tmp_path / "r")
    cfg = P.build(train.TrainConfig, p)
    assert cfg.num_epochs == 3 and cfg.run_dir == p.run_dir and cfg.ddp_dice == "global"  # not a parameter: default
    s = P.build(infer.InferenceSettings, P.resolve("05_validate", _namespace(
        "05_validate", mirror_axes=[2], head_mode="pruned", pruned_level=2, step_size=0.25)))
    assert (s.mirror_axes, s.head_mode, s.pruned_level, s.step_size) == ((2,), "pruned", 2, 0.25)
    assert s.key() == {"checkpoint": "final", "step": 0.25, "mirror_axes": [2], "mode": "pruned", "level": 2}
    assert P.build(infer.InferenceSettings, P.resolve("05_validate", _namespace("05_validate"))).key()["level"] is None
    b = P.build(benchmark.BenchSettings, P.resolve("06_benchmark", _namespace("06_benchmark", bench_steps=7)))
    assert b.bench_steps == 7 and b.bench_head_modes == ["deepest", "average", "pruned"] and b.preprocess


def test_resolve_rejects_missing_stray_and_wrong_parameters():
    with pytest.raises(P.ParamsError, match="02_plan parameters: 'planner' must be one of"):
        P.resolve("02_plan", _namespace("02_plan", planner="nnunet"))
    with pytest.raises(P.ParamsError, match=r"'splits_file' not set; the schema declares them for 02_plan"):
        ns = _namespace("02_plan")
        del ns["splits_file"]
        P.resolve("02_plan", ns)
    with pytest.raises(P.ParamsError, match="'fold' is not a parameter of 02_plan"):
        P.resolve("02_plan", _namespace("02_plan", fold=1))
    with pytest.raises(P.ParamsError, match="unknown stage"):
        P.stage_keys("07_deploy")


def test_resolve_paths_includes_the_splits_file(tmp_path):
    out = P.resolve_paths({"splits_file": "my_splits.json"}, tmp_path)
    assert out["splits_file"] == str(tmp_path / "my_splits.json")


def test_device_may_name_an_index():
    assert P.check({"device": "cuda:1"}, source="t")["device"] == "cuda:1"
    assert P.check({"device": "npu:3"}, source="t")["device"] == "npu:3"
    for bad in ("cuda:x", "gpu", "cuda:"):
        with pytest.raises(P.ParamsError, match="'device' must be one of"):
            P.check({"device": bad}, source="t")
