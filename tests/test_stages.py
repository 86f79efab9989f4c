"""The stage table (unetpp_lib/core/stages.py): run order, and a new stage added with one row and one notebook."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from unetpp_lib.core import params as P
from unetpp_lib.core.stages import STAGE, TABLE, run_order

ROOT = Path(__file__).resolve().parents[1]


def test_the_table_is_what_params_and_the_notebooks_have():
    assert P.STAGES == tuple(s.name for s in TABLE) == tuple(STAGE)
    assert {p.name for p in (ROOT / "notebooks").glob("*.ipynb")} == {s.notebook for s in TABLE}
    for key in P.SCHEMA.values():
        assert set(key.stages) <= set(STAGE)
    for s in TABLE:  # a stage reads only stages before it (a fold stage: the same fold's)
        earlier = [t.name for t in TABLE[:TABLE.index(s)]]
        assert all(r.split("_fold")[0] in earlier for r in s.reads), s.name


def test_run_order_puts_fold_stages_fold_after_fold():
    everything = [s.name for s in TABLE]
    assert run_order(everything, [0, 1]) == [
        ("01_convert", None), ("02_plan", None), ("03_preprocess", None), ("04_train", 0), ("05_validate", 0),
        ("04_train", 1), ("05_validate", 1), ("06_benchmark", None)]
    assert run_order(["06_benchmark", "02_plan"], [3]) == [("02_plan", None), ("06_benchmark", None)]
    assert run_order(["05_validate"], [2, 0]) == [("05_validate", 2), ("05_validate", 0)]


def dummy_notebook(path: Path, stage: str) -> None:
    """A stage notebook as the real ones are: a tagged parameters cell, then a cell that calls the library."""
    cells = [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "execution_count": None, "outputs": [],
              "source": ['run_dir: str = "../runs/demo"  # folder the run lives in\n']},
             {"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
              "source": ["from pathlib import Path\n", "from unetpp_lib.core import params\n",
                         f'p = params.resolve("{stage}", globals())\n',
                         'Path(p.run_dir, "hello.txt").write_text("hello from a new stage")\n']}]
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}}}
    path.write_text(json.dumps(nb, indent=1))


def test_a_new_stage_is_one_row_and_one_notebook(tmp_path):
    """In a copy of the kit: one row appended to the table and one notebook; run_all runs it, stamps it, skips it
    when current and --force redoes it (removing what the row says)."""
    kit = tmp_path / "kit"
    shutil.copytree(ROOT / "unetpp_lib", kit / "unetpp_lib", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "run_all.py", kit)
    shutil.copytree(ROOT / "params", kit / "params")
    (kit / "notebooks").mkdir()
    table = kit / "unetpp_lib" / "core" / "stages.py"
    row = ('    Stage("07_hello", False, (), lambda run, _: [run.root / "hello.txt"], '
           'lambda run, _: [run.root / "hello.txt"]),\n)\nSTAGE = ')
    text = table.read_text()
    assert text.count(")\nSTAGE = ") == 1
    table.write_text(text.replace(")\nSTAGE = ", row))
    dummy_notebook(kit / "notebooks" / "07_hello.ipynb", "07_hello")
    env = {**os.environ, "PYTHONPATH": str(kit)}

    def run_all(*args):
        return subprocess.run([sys.executable, "run_all.py", "--stages", "hello", "--set", "run_dir=run", *args],
                              cwd=kit, env=env, capture_output=True, text=True, timeout=300)

    first = run_all()
    assert first.returncode == 0, first.stdout + first.stderr
    run = kit / "run"
    assert (run / "hello.txt").read_text() == "hello from a new stage"
    assert json.loads((run / "stages" / "07_hello.json").read_text())["stage"] == "07_hello"
    assert (run / "notebooks" / "07_hello.ipynb").is_file()
    again = run_all()
    assert again.returncode == 0 and "07_hello is complete and current" in again.stdout
    forced = run_all("--force")
    assert forced.returncode == 0 and f"--force: removed {run / 'hello.txt'}" in forced.stdout.replace("\\", "/")
    assert (run / "hello.txt").is_file()
