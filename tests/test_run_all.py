"""run_all.py as a user meets it: strict --set, live progress, the closing summary, no kernel warning, no orphans."""
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import run_all_until
from unetpp_lib.core import params as P
from unetpp_lib.core.terminal import TerminalEcho
from unetpp_lib.core.stamps import TAG

ROOT = Path(__file__).resolve().parents[1]
TINY = {"synth_num_training": 4, "synth_num_test": 1, "synth_shape": [12, 32, 32], "num_workers": 1,
        "plan_overrides": {"batch_size": 2, "base_num_features": 4}, "iterations_per_epoch": 2, "val_iterations": 1,
        "mirror_axes": [], "predict_test": False}
STAGES = ["--stages", "convert", "plan", "preprocess", "train", "validate"]


def load_run_all():
    """run_all.py as a module (it is a script, not part of the package)."""
    if "run_all" not in sys.modules:
        spec = importlib.util.spec_from_file_location("run_all", ROOT / "run_all.py")
        sys.modules["run_all"] = importlib.util.module_from_spec(spec)  # before running it: its dataclass looks it up
        spec.loader.exec_module(sys.modules["run_all"])
    return sys.modules["run_all"]


def run_all(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run_all.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def tiny_params(folder: Path, **extra) -> Path:
    """A params file with the tiny settings (keys for every stage: a file may hold keys of stages not run)."""
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **extra}))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Fold 0 converted, planned, preprocessed, trained for 2 epochs and validated; --set given twice."""
    root = tmp_path_factory.mktemp("run_all")
    res = run_all(*STAGES, "--params", str(tiny_params(root)), "--set", "run_dir=run", "num_epochs=5",
                  "--set", "num_epochs=2", cwd=root)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return root / "run", res


def test_repeated_set_accumulates_and_the_later_value_wins():
    ra = load_run_all()
    args = ra.parse_args(["--set", "msd_dir=/data/Task03_Liver", "fold=1", "--set", "run_dir=runs/x", "fold=2"])
    assert P.parse_set(args.set) == {"msd_dir": "/data/Task03_Liver", "fold": 2, "run_dir": "runs/x"}


def test_a_set_key_no_chosen_stage_declares_stops_the_run(tmp_path):
    res = run_all("--stages", "convert", "plan", "--set", "run_dir=run", "num_epochs=3", "mirror_axes=[]",
                  "--set", "planner=unetpp", cwd=tmp_path)
    assert res.returncode == 2
    assert "'num_epochs' is not a parameter of 01_convert, 02_plan (declared by 04_train)" in res.stderr
    assert "'mirror_axes'" in res.stderr and "declared by 05_validate" in res.stderr
    assert "planner" not in res.stderr  # 02_plan declares it
    assert not (tmp_path / "run").exists()  # nothing started


def test_every_declared_parameter_reaches_its_notebook():
    """Each key a notebook declares, whatever its annotation (`channels_last: bool | str`, which papermill's own
    inspector drops), is taken from the layers and injected."""
    ra = load_run_all()
    for stage in ra.available_stages():
        assert sorted(ra.notebook_defaults(stage)) == sorted(P.stage_keys(stage)), stage
    merged = ra.stage_params("04_train", [{"channels_last": False, "precision": "fp32"}])
    assert merged["channels_last"] is False and merged["precision"] == "fp32"
    assert ra.stage_params("05_validate", [{"channels_last": True}])["channels_last"] is True


def test_keys_of_a_params_file_may_serve_other_stages(tmp_path):
    ra = load_run_all()
    args = ra.parse_args(["--params", str(tiny_params(tmp_path)), "--set", "seed=3"])
    layers = ra.load_layers(args, ["01_convert"])  # the file's training keys are allowed, seed is convert's
    assert layers[1]["iterations_per_epoch"] == 2 and layers[2] == {"seed": 3}


@pytest.mark.notebooks
def test_progress_lines_in_the_terminal_and_the_notebook(tiny_run):
    run, res = tiny_run
    lines = [ln.strip() for ln in res.stdout.splitlines()]
    epochs = [ln for ln in lines if ln.startswith("epoch ") and ": step " not in ln]
    assert [ln.split()[1] for ln in epochs] == ["1/2", "2/2"]
    # before the first epoch line: the measured precision and layout, then the first epoch's steps as they go
    first = lines.index(epochs[0])
    assert any(ln.startswith("precision and layout: train: ") and "s/step" in ln for ln in lines[:first])
    steps = [ln for ln in lines[:first] if ln.startswith("epoch 1/2: step ")]
    assert steps[0].startswith("epoch 1/2: step 1/2, ") and "s/step -> epoch ~" in steps[0] and "training ~" in steps[0]
    for line in epochs:
        assert all(word in line for word in ("train loss", "val loss", "pseudo-Dice", "s/epoch", "time left"))
    assert any("preprocess" in ln and "4/4" in ln for ln in res.stdout.splitlines())  # the per-case bar's end
    assert "\r" not in res.stdout  # not a terminal: no redraws, only the lines
    params = yaml.safe_load((run / "params.yaml").read_text())["params"]
    assert params["num_epochs"] == 2 and params["synth_num_training"] == 4  # both --set and the file
    executed = json.loads((run / "notebooks" / "04_train_fold0.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    assert all(line in text for line in epochs)  # the notebook keeps the same record


@pytest.mark.notebooks
def test_no_unencrypted_tcp_kernel_warning(tiny_run):
    _, res = tiny_run
    assert "without encryption" not in res.stdout + res.stderr and "IPKernelApp" not in res.stderr


@pytest.mark.notebooks
def test_closing_summary_statuses_dice_and_where_things_are(tiny_run):
    run, res = tiny_run
    summary = res.stdout[res.stdout.index("== summary of run"):]
    for name in ("01_convert", "02_plan", "03_preprocess", "04_train_fold0", "05_validate_fold0"):
        assert any(ln.split()[:2] == [name, "ran"] for ln in summary.splitlines()), name
    mean = json.loads((run / "fold_0" / "validation" / "summary.json").read_text())["results"]["mean"]
    row = next(ln.split() for ln in summary.splitlines() if ln.split()[:1] == ["0"])
    assert row[1:] == [f"{mean['1']['Dice']:.4f}", f"{mean['2']['Dice']:.4f}", "run/fold_0/validation/summary.json"]
    assert "executed notebooks: run/notebooks" in summary and "run/fold_0/progress.png" in summary
    assert "run/fold_0/validation/gallery.png" in summary
    assert "open them: " in summary and "jupyter lab run/notebooks" in summary
    again = run_all(*STAGES, "--params", str(run.parent / "tiny.yaml"), "--set", "run_dir=run", "num_epochs=2",
                    cwd=run.parent)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout[again.stdout.index("== summary"):].splitlines()
    assert sum(ln.split()[1:3] == ["skipped", "(current)"] for ln in lines if ln.split()) == 5
    assert any(ln.split()[:2] == ["0", f"{mean['1']['Dice']:.4f}"] for ln in lines)


def test_summary_of_a_failing_stage_names_it_and_its_notebook(tmp_path):
    res = run_all("--stages", "convert", "plan", "--set", "run_dir=run", f"msd_dir={tmp_path / 'nowhere'}",
                  cwd=tmp_path)
    assert res.returncode == 1 and "stage 01_convert failed" in res.stderr
    lines = res.stdout[res.stdout.index("== summary"):].splitlines()
    assert any(ln.split()[:2] == ["01_convert", "failed"] for ln in lines)
    assert any(ln.split()[:3] == ["02_plan", "not", "run"] for ln in lines)
    assert any("01_convert failed" in ln and "run/notebooks/01_convert.ipynb" in ln for ln in lines)


@pytest.mark.notebooks
@pytest.mark.slow
def sigint(disposition):
    """preexec_fn giving the child this SIGINT disposition: default as a terminal's foreground job, or ignored as a
    job started with `&` by a script (which then must still stop on SIGTERM)."""
    return lambda: signal.signal(signal.SIGINT, disposition)


@pytest.mark.parametrize("signum, disposition", [(signal.SIGINT, signal.SIG_DFL), (signal.SIGTERM, signal.SIG_DFL),
                                                 (signal.SIGTERM, signal.SIG_IGN)], ids=["int", "term", "term-bg"])
def test_a_stop_during_training_starts_no_later_stage(tmp_path, signum, disposition):
    args = [*STAGES, "benchmark", "--params", str(tiny_params(tmp_path, bench_precisions=["fp32"], bench_steps=1,
                                                                bench_warmup=0, bench_profile_steps=0)),
            "--set", "run_dir=run", "num_epochs=500"]
    log = tmp_path / "run" / "fold_0" / "train_log.json"
    with open(tmp_path / "out.txt", "w") as out:  # as a terminal would show it: both streams, in order
        proc = subprocess.Popen([sys.executable, str(ROOT / "run_all.py"), *args], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=sigint(disposition))
        deadline = time.time() + 300
        while not log.is_file() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        try:
            assert log.is_file(), "training did not start"
            time.sleep(1)
            proc.send_signal(signum)
            code = proc.wait(timeout=120)
        finally:  # a run that ignored the signal must not train on behind the suite's back
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = (tmp_path / "out.txt").read_text()
    assert code == 128 + signum, text[-3000:]
    lines = text[text.index("== summary"):].splitlines()
    assert any(ln.split()[:2] == ["04_train_fold0", "interrupted"] for ln in lines), text[-2000:]
    for later in ("05_validate_fold0", "06_benchmark"):
        assert any(ln.split()[:3] == [later, "not", "run"] for ln in lines), later
    notebooks = sorted(p.name for p in (tmp_path / "run" / "notebooks").glob("*.ipynb"))
    assert notebooks == ["01_convert.ipynb", "02_plan.ipynb", "03_preprocess.ipynb", "04_train_fold0.ipynb"]
    assert "Traceback" not in text and "never retrieved" not in text and "-> " not in text.split("stopped by")[1]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def feed(term: TerminalEcho) -> None:
    """A kernel's output: a progress bar on stderr redrawn around lines on stdout."""
    err, std = term.stream("stderr"), term.stream("stdout")
    err.write("\rcases:   0%|  | 0/3")
    std.write("note: one\nnote: ")
    err.write("\rcases:  33%|# | 1/3 [00:01<00:02]\rcases:  67%|##| 2/3 [00:02<00:01]")
    std.write("two\n")
    err.write("\rcases: 100%|##| 3/3 [00:03<00:00]\n")
    term.close()


def test_terminal_shows_lines_and_collapses_progress_redraws():
    log = io.StringIO()
    feed(TerminalEcho(log, every=3600))
    assert log.getvalue().splitlines() == ["   note: one", "   note: two", "   cases: 100%|##| 3/3 [00:03<00:00]"]
    tty = Tty()
    feed(TerminalEcho(tty))
    assert "\r\x1b[K   cases:  67%|##| 2/3 [00:02<00:01]" in tty.getvalue()  # redrawn in place
    assert tty.getvalue().endswith("\r\x1b[K   note: two\n   cases: 100%|##| 3/3 [00:03<00:00]\n")
    assert "note: \r" not in tty.getvalue()  # a line still being written is not drawn as a bar


def our_processes(root: Path, marks: tuple[str, ...] = ()) -> list[psutil.Process]:
    """Processes of the run under `root`: its tag in their environment, or `root` or a mark on their command line."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            if proc.pid != os.getpid() and (str(root) in proc.environ().get(TAG, "")
                                            or any(m in cmd for m in (str(root), *marks))):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or another user's
            continue
    return found


@pytest.mark.notebooks
@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_during_training_leaves_no_process(tmp_path, nproc):
    args = [*STAGES[:5], "--params", str(tiny_params(tmp_path)), "--set", "run_dir=run", "num_epochs=500",
            "--nproc", str(nproc)]
    log = tmp_path / "run" / "fold_0" / "train_log.json"
    proc = run_all_until(args, tmp_path, log)
    assert log.is_file(), "training did not start"
    family = our_processes(tmp_path)
    kernels = [p.cmdline() for p in family if "ipykernel_launcher" in p.cmdline()]
    assert kernels  # in a session of its own: SIGKILL of run_all's group does not reach it
    connection = kernels[0][kernels[0].index("-f") + 1]
    assert nproc == 1 or sum("unetpp_lib.launch" in " ".join(p.cmdline()) for p in family) >= nproc + 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    t0 = time.time()
    while our_processes(tmp_path, (connection,)) and time.time() - t0 < 10:
        time.sleep(0.1)
    left = [" ".join(p.cmdline())[:120] for p in our_processes(tmp_path, (connection,))]
    assert not left, f"alive {time.time() - t0:.1f} s after SIGKILL: {left}"
