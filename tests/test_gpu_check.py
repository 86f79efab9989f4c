"""The GPU check's CPU dry run: the real script end to end on tiny sizes, every section measured or skipped with a reason."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from parity.reference_env import ensure
from unetpp_lib import gpu_check
from unetpp_lib.nn.model import build_model
from unetpp_lib.perf import candidates, gpu_sections, vs_original

ROOT = Path(__file__).resolve().parents[1]
DRY = {  # shrinks everything: a 16^3 patch, 2-8 channels, 1-2 steps, a 20 x 24 x 24 case, an eager "compile"
    "device": "cpu", "budget_s": 150, "matmul_n": 128, "precisions": ["bf16"], "channels_last": [True],
    "plan_overrides": {"patch_size": [16, 16, 16], "base_num_features": 2, "max_num_features": 8},
    "compile_backend": "eager", "compile_config_cap_s": 60, "warmup": 1, "steps": 2,
    "inference_shape": [20, 24, 24], "pipeline_cases": 2, "pipeline_case_shape": [40, 48, 48],
    "pipeline_batches": 3, "pipeline_workers": 2, "fed_steps": 2, "profile_steps": 1,
    "profile_infer_shape": [20, 20, 20], "profile_rows": 10, "pytest_args": ["-m", "gpu", "-q", "tests/test_train.py"],
    "original_workers": 2, "original_warmup": 1, "original_steps": 2}


@pytest.fixture(scope="module")
def v1_python() -> str:
    """nnU-Net v1.6.4's interpreter (the parity suite's venv, built on first use)."""
    return str(ensure())


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, v1_python):
    """Run `python -m unetpp_lib.gpu_check` as the device command does, with the dry-run settings."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    (tmp / "scratch").mkdir()
    (tmp / "dry.yaml").write_text(yaml.safe_dump({**DRY, "original_python": v1_python, "scratch_dir": str(tmp / "scratch")}))
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "unetpp_lib.gpu_check", "--out", str(out), "--params",
                           str(tmp / "dry.yaml"), "--set", "budget_s=160", "--set", "steps=2"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_every_section_has_figures_or_a_reason(dry_run):
    out, stdout = dry_run
    res = json.loads((out / "gpu_check.json").read_text())
    sec = res["sections"]
    assert list(sec) == list(gpu_check.ORDER) and res["device"] == "cpu"
    assert res["settings"]["budget_s"] == 160  # the first of two --set options counts too
    assert all(s["status"] == "ok" for k, s in sec.items() if k != "candidates"), {k: s.get("reason") for k, s in sec.items()}
    assert sec["candidates"]["reason"] == "not in `sections`"  # a run of its own (test below)
    assert {p: v["measured_tflops"] > 0 for p, v in sec["facts"]["peaks"].items()} == {"bf16": True, "fp16": True, "fp32": True}
    eager, compiled = sec["training"]["configs"], sec["training_compile"]["configs"]
    assert [(r["precision"], r["compile"]) for r in eager + compiled] == [("bf16", False), ("bf16", True)]
    for r in eager + compiled:
        assert r["samples_per_s"] > 0 and r["step_s_p10"] <= r["step_s_p50"] <= r["step_s_p90"] and r["mfu_measured_peak"] > 0
    assert all(r["compile_s"] is not None and r["child_wall_s"] > 0 for r in compiled)
    inf = sec["inference"]
    case, probes = inf["case"], inf["probes"]
    assert case["mirrorings"] == 8 and case["tiles"] == 8 * 8 and case["network"] > 0 and case["shape"] == [20, 24, 24]
    assert list(probes) == ["eager", "compiled"] and inf["tile_passes"] == 64  # eager first, compiled in a child
    assert all(p["per_tile_ms"] > 0 and p["estimate_s"] > p["first_call_s"] and p["tiles"] == 16 for p in probes.values())
    assert probes["eager"]["warmup_s"] is not None and not probes["eager"]["compile"]
    assert probes["compiled"]["compile_s"] is not None and probes["compiled"]["child_wall_s"] > 0
    assert probes["compiled"]["compile"] and "output_tail" not in probes["compiled"]
    assert inf["chosen"] == min(probes, key=lambda k: probes[k]["per_tile_ms"]) and case["compile"] == (inf["chosen"] == "compiled")
    dp = sec["data_pipeline"]
    assert len(dp["store"]["cases"]) == 2 and 0 < dp["store"]["bytes_per_voxel"] < 4
    assert dp["loader"]["samples_per_s"] > 0 and dp["loader"]["loader_workers"] == 2
    assert dp["fed_training"]["steps"] == 2 and 0 <= dp["fed_training"]["gpu_waits_on_data_fraction"] < 1
    assert len(sec["profile"]["train"]["top_operators"]) == 10 and sec["profile"]["inference"]["top_operators"]
    assert sec["pytest_gpu"]["exit_code"] == 0 and "skipped" in sec["pytest_gpu"]["summary"]
    assert "== training_compile" in stdout and "left]" in stdout  # progress with the budget as it goes
    assert not list((out.parent / "scratch").iterdir())  # the store and v1's folders are gone


def test_the_original_runs_beside_the_kit(dry_run):
    """v1.6.4's trainer and predict_3D ran in their own interpreter on the same plan, and the report puts
    both sides and their ratio first."""
    out, _ = dry_run
    res = json.loads((out / "gpu_check.json").read_text())
    tr, inf = res["sections"]["original_training"]["v1"], res["sections"]["original_inference"]["v1"]
    assert tr["nnunet"] == "1.6.4" and tr["batchgenerators"] == "0.21" and tr["numpy"].startswith("1.")
    assert tr["steps"] == 2 and tr["workers"] == 2 and tr["patch_size"] == [16, 16, 16] and tr["batch_size"] == 2
    assert tr["samples_per_s"] > 0 and 0 <= tr["data_wait_fraction"] < 1 and not tr["fp16"]  # v1's AMP: CUDA only
    # the same network: the fork's UNet++ from v1's blocks has the kit's parameter count on the same plan
    kit_params = sum(p.numel() for p in build_model(gpu_check.check_plans(
        gpu_check.CheckSettings(**DRY))).parameters())
    assert tr["parameters"] == inf["parameters"] == kit_params
    assert inf["tile_passes"] == res["sections"]["inference"]["tile_passes"] == 64 and inf["mirrorings"] == 8
    assert inf["outputs"] == [[20, 24, 24], [3, 20, 24, 24]] and inf["predict_3d_s"] > 0
    vs = res["comparison"]
    kit_case = res["sections"]["inference"]["case"]
    assert vs["training"]["original_samples_per_s"] == tr["samples_per_s"]
    assert vs["training"]["ratio"] == pytest.approx(vs["training"]["kit_samples_per_s"] / tr["samples_per_s"], abs=0.01)
    assert vs["inference"]["kit_case_s"] == pytest.approx(kit_case["predict_total"] + kit_case["export_write"], abs=0.01)
    kit_s = kit_case["predict_total"] + kit_case["export_write"]  # unrounded: kit_case_s has 2 decimals, the ratio 3
    assert vs["inference"]["ratio"] == pytest.approx(kit_s / inf["predict_3d_s"], rel=0.02, abs=0.002)
    md = (out / "gpu_check.md").read_text()
    assert md.index("## Kit vs original") < md.index("| section | status |") and "## Original: predict_3D" in md


def test_files_are_few_and_scratch_is_gone(dry_run):
    out, _ = dry_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(gpu_check.FILES.values())  # 7 files, no scratch store, no trace
    assert "aten::" in (out / "profile_train.txt").read_text() and "aten::" in (out / "profile_infer.txt").read_text()
    assert "1 skipped" in (out / "pytest_gpu.log").read_text()
    md = (out / "gpu_check.md").read_text()
    assert md.startswith("# GPU check: cpu") and "## Training step" in md and "## Data pipeline" in md
    assert "## Inference probe" in md and "| compiled |" in md and "## Inference, one median case" in md


def test_comparison_puts_both_sides_and_the_targets_together():
    sections = {"training": {"configs": [{"precision": "bf16", "channels_last": False, "compile": False, "samples_per_s": 9.0},
                                         {"precision": "fp16", "channels_last": False, "compile": False, "samples_per_s": 8.0}]},
                "training_compile": {"configs": [{"precision": "fp16", "channels_last": False, "compile": True,
                                                  "samples_per_s": 10.0}]},
                "original_training": {"v1": {"samples_per_s": 4.0, "workers": 12, "data_wait_fraction": 0.3}},
                "inference": {"chosen": "compiled", "case": {"predict_total": 80.0, "export_argmax": 2.0, "tile_batch": 2}},
                "original_inference": {"v1": {"predict_3d_s": 200.0, "all_in_gpu": False}}}
    vs = vs_original.comparison(sections)
    assert vs["training"]["kit_samples_per_s"] == 10.0 and "compiled" in vs["training"]["kit_config"]  # Task03's config
    assert vs["training"]["ratio"] == 2.5 and vs["training"]["meets_target"] and vs["training"]["moonshot_distance"] == 2.0
    assert vs["inference"]["kit_case_s"] == 82.0 and vs["inference"]["ratio"] == 0.41 and vs["inference"]["meets_target"]
    assert vs["inference"]["moonshot_distance"] == pytest.approx(82 / 60, abs=0.01)
    sections["original_inference"]["v1"]["predict_3d_s"] = 100.0
    assert not vs_original.comparison(sections)["inference"]["meets_target"]  # 0.82 > 0.5
    del sections["original_training"]
    assert list(vs_original.comparison(sections)) == ["inference"]  # a side not measured: no row
    assert vs_original.comparison({}) == {}


def test_v1_runs_without_simpleitk_behind_a_stand_in_that_raises(v1_python, tmp_path):
    """On a GPU machine without SimpleITK (a 53 MB wheel), v1's modules import and any SimpleITK call fails loudly."""
    code = ("import importlib.util, sys; find = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'SimpleITK' else find(n, *a)\n"
            "import v1_side; assert v1_side.stand_in_for_simpleitk()\n"
            "from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2\n"
            "import SimpleITK\n"
            "try:\n    SimpleITK.ReadImage('x.nii.gz')\nexcept RuntimeError as e:\n    print('RAISED', e)\n")
    env = {**vs_original.child_env(gpu_check.CheckSettings()), "nnUNet_preprocessed": str(tmp_path),
           "RESULTS_FOLDER": str(tmp_path), "nnUNet_raw_data_base": str(tmp_path)}
    proc = subprocess.run([v1_python, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "RAISED SimpleITK.ReadImage: SimpleITK is not installed" in proc.stdout, proc.stderr[-2000:]


def test_v1_wheels_are_the_parity_suites_pins():
    """The wheels the docs tell a GPU machine to carry are the versions the parity suite checks against."""
    from parity.reference_env import PINS
    assert {w for w in vs_original.V1_WHEELS if w.split("==")[0] in ("nnunet", "batchgenerators")} <= set(PINS)


def test_a_section_that_does_not_fit_is_skipped_with_its_reason(tmp_path):
    s = gpu_check.CheckSettings(budget_s=3)
    c = gpu_check.Check(tmp_path, s)
    c.section("inference", lambda *_: pytest.fail("must not run"))
    c.section("facts", lambda *_: {"x": 1 / 0})
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sec["inference"]["status"] == "skipped" and "budget spent" in sec["inference"]["reason"]
    assert sec["facts"]["status"] == "skipped"  # saved after every section, so a kill keeps what was there


def test_failing_section_is_recorded_and_the_rest_go_on(tmp_path):
    c = gpu_check.Check(tmp_path, gpu_check.CheckSettings(budget_s=60))
    c.section("facts", lambda c, deadline, rec: rec.update(measured=[1.5]) or {"x": 1 / 0})
    c.section("training", lambda *_: {"configs": []})
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sec["facts"]["status"] == "error" and "ZeroDivisionError" in sec["facts"]["reason"]
    assert sec["facts"]["measured"] == [1.5]  # what it measured before failing is kept
    assert sec["training"]["status"] == "ok" and "| facts | error |" in (tmp_path / "gpu_check.md").read_text()


def test_compiled_inference_alone_probes_in_a_child_and_runs_the_case(tmp_path):
    c = gpu_check.Check(tmp_path, gpu_check.CheckSettings(**{**DRY, "inference_compile": [True]}))
    c.section("inference", gpu_sections.SECTIONS["inference"])
    inf = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["inference"]
    assert inf["status"] == "ok" and list(inf["probes"]) == ["compiled"] and inf["chosen"] == "compiled"
    assert inf["case"]["compile"] and inf["case"]["tiles"] == 64 and inf["case"]["first_call_s"] > 0
    assert inf["case_not_run"] == {}


def test_norm_candidates_compute_the_same_norm():
    """In fp32 every candidate is PyTorch's InstanceNorm3d, forward and backward (the arithmetic is the same)."""
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm3d(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-1, 1)
    x = (torch.randn(2, 6, 8, 10, 12) * 3 + torch.arange(6.0).view(1, 6, 1, 1, 1) * 10).requires_grad_()
    ref = norm(x)
    gx_ref, gw_ref = torch.autograd.grad((ref * ref.detach().cos()).sum(), (x, norm.weight))
    for kind in candidates.NORMS:
        y = candidates.with_norm(torch.nn.Sequential(norm), kind)
        out = y(x)
        gx, gw = torch.autograd.grad((out * ref.detach().cos()).sum(), (x, y[0].weight))
        assert isinstance(y[0], candidates.StatsNorm) and torch.allclose(out, ref, atol=1e-5), kind
        assert torch.allclose(gx, gx_ref, atol=1e-5) and torch.allclose(gw, gw_ref, atol=1e-4), kind
    with pytest.raises(ValueError, match="norm candidate"):
        candidates.with_norm(norm, "var_mean")


def test_candidates_section_measures_rounding_and_speed(tmp_path):
    c = gpu_check.Check(tmp_path, gpu_check.CheckSettings(**{**DRY, "sections": ["candidates"]}))
    c.section("candidates", gpu_sections.SECTIONS["candidates"])
    rec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["candidates"]
    assert rec["status"] == "ok" and rec["precision"] == "torch.bfloat16", rec.get("reason")
    assert list(rec["speed"]) == ["instance", *candidates.NORMS]
    for k, r in rec["speed"].items():
        assert r["samples_per_s"] > 0 and r["tile_forward_s"] > 0 and r["tiles"] == 2
        assert (k == "instance") != ("step_speedup" in r and "adoptable" in r)
    nets = rec["network_rounding"]
    assert all(0 < v["max_abs"] < 1 and v["argmax_agreement"] > 0.5 for v in nets.values())
    # in bf16 the fused multiply-add rounds x * scale before the shift cancels it: worse the farther the mean is
    # from 0; statistics and arithmetic in fp32, rounded once, round as PyTorch's kernel does
    norms = rec["norm_rounding"]
    assert list(norms) == ["mean_0_sd_1", "mean_4_sd_1", "mean_16_sd_1", "mean_64_sd_1", "mean_0_sd_300"]
    assert norms["mean_64_sd_1"]["stats_fused"]["max_ratio_to_instance"] > 4
    assert norms["mean_64_sd_1"]["stats_fused"]["max_ratio_to_instance"] > 2 * norms["mean_0_sd_1"]["stats_fused"]["max_ratio_to_instance"]
    assert all(r["stats_fp32"]["max_ratio_to_instance"] <= 1.1 for r in norms.values())
    assert "## Speed-up candidates (torch.bfloat16" in (tmp_path / "gpu_check.md").read_text()
    with pytest.raises(ValueError, match="candidates"):
        candidates.measure({}, c.plans, "cpu", "fp32", ["instance"], 1, 0, 1, time.monotonic() + 60)


def test_fp16_variance_overflow_is_caught_by_the_norm_check():
    """fp16's variance of a channel with a spread of 300 (90,000) overflows: var_mean's candidates lose the channel,
    the fp32-statistics one does not."""
    row = candidates.norm_rounding(torch.device("cpu"), torch.float16, channels=4, size=16, spreads=[(0.0, 300.0)])
    row = row["mean_0_sd_300"]
    assert row["instance"]["max_abs"] < 0.01 and row["stats_fp32"]["max_ratio_to_instance"] <= 1.1
    assert row["stats_fused"]["max_abs"] > 0.5 and row["stats_centred"]["max_abs"] > 0.5


def test_candidates_report_leaves_undefined_figures_blank():
    """A candidate skipped for time and fp32's undefined ratios (PyTorch's own error is 0) show as blanks, not 0."""
    cand = {"precision": "fp32", "norm_rounding": {"mean_0_sd_1": {
        "instance": {"max_abs": 1e-7}, "stats_fused": {"max_abs": 2e-7, "max_ratio_to_instance": 2.0},
        "stats_fp32": {"max_abs": 1e-7, "max_ratio_to_instance": None}}},
        "network_rounding": {"instance": {"max_ratio_to_instance": None}, "stats_fused": {"max_ratio_to_instance": None}},
        "speed": {"instance": {"samples_per_s": 3.0, "step_s": 1.0}, "stats_fused": {"samples_per_s": 3.3,
                  "step_speedup": 1.1, "adoptable": False}, "stats_fp32": {"skipped": "would not fit"}}}
    md = gpu_check.markdown({"device": "cpu", "sections": {"candidates": {"status": "ok", **cand}}})
    lines = md[md.index("## Speed-up candidates (fp32"):].splitlines()[2:]
    head = [v.strip() for v in lines[0].split("|")[1:-1]]
    rows = {r["candidate"]: r for r in (dict(zip(head, [v.strip() for v in ln.split("|")[1:-1]])) for ln in lines[2:5])}
    assert rows["stats_fused"]["norm_rounding_x_worst"] == "2.0" and rows["stats_fused"]["network_rounding_x"] == ""
    assert rows["stats_fused"]["adoptable"] == "False" and rows["instance"]["norm_rounding_x_worst"] == ""
    assert rows["stats_fp32"]["norm_rounding_x_worst"] == "" and rows["stats_fp32"]["skipped"] == "would not fit"


def test_only_the_chosen_sections_run(tmp_path):
    handler = signal.getsignal(signal.SIGTERM)  # run_check installs its own
    try:
        res = gpu_check.run_check(tmp_path, gpu_check.CheckSettings(**{**DRY, "sections": []}))
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert list(res["sections"]) == list(gpu_check.ORDER)
    assert all(v == {"status": "skipped", "reason": "not in `sections`", "seconds": 0.0} for v in res["sections"].values())
    with pytest.raises(ValueError, match="'sections': unknown"):
        gpu_check.load_settings(None, ["sections=[inference, infer]"])


def test_the_shipped_params_file_is_the_defaults():
    """params/gpu_check.yaml and CheckSettings' defaults say the same, so neither drifts from the other."""
    assert gpu_check.load_settings(ROOT / "params" / "gpu_check.yaml", []) == gpu_check.CheckSettings()


def test_settings_reject_unknown_keys_and_wrong_types(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("steps: 3\ncaps: {inference: 20}\n")
    s = gpu_check.load_settings(f, ["precisions=[fp16]"])
    assert s.steps == 3 and s.precisions == ["fp16"] and s.caps["inference"] == 20 and s.caps["facts"] == 40
    with pytest.raises(ValueError, match="unknown gpu_check setting 'stepz'"):
        gpu_check.load_settings(None, ["stepz=3"])
    with pytest.raises(ValueError, match="'steps' must be int"):
        gpu_check.load_settings(None, ["steps=true"])
    shipped = gpu_check.load_settings(ROOT / "params" / "gpu_check.yaml", [])
    assert shipped.inference_shape == [482, 512, 512] and shipped.mirror_axes == [0, 1, 2]
    assert gpu_check.check_plans(shipped)["patch_size"] == [128, 128, 128] and shipped.budget_s <= 480


def test_repeated_set_options_accumulate_and_the_later_wins():
    args = gpu_check.parse_args(["--out", "x", "--set", "budget_s=270", "--set", "caps={inference: 20}", "steps=2",
                                 "--set", "steps=5"])
    assert args.set == ["budget_s=270", "caps={inference: 20}", "steps=2", "steps=5"]
    s = gpu_check.load_settings(ROOT / "params" / "gpu_check.yaml", args.set)
    assert s.budget_s == 270 and s.caps["inference"] == 20 and s.caps["facts"] == 40 and s.steps == 5


def test_sections_match_the_order_and_do_not_import_the_command():
    assert set(gpu_sections.SECTIONS) == set(gpu_check.ORDER)
    code = "import sys, unetpp_lib.perf.gpu_sections; print('unetpp_lib.gpu_check' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip() == "False"


def test_kill_at_cap_ends_the_child_group():
    rc, out = gpu_sections.run_captured([sys.executable, "-c", "import time; print('hi', flush=True); time.sleep(60)"], 2)
    assert rc is None and "hi" in out


def test_a_kill_keeps_the_sections_done_and_removes_the_scratch_store(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    sections = [k for k in gpu_check.ORDER if not k.startswith("original")]  # the original's own dry run: above
    (tmp_path / "dry.yaml").write_text(yaml.safe_dump({**DRY, "scratch_dir": str(scratch), "pipeline_batches": 10000,
                                                       "sections": sections}))
    proc = subprocess.Popen([sys.executable, "-m", "unetpp_lib.gpu_check", "--out", str(tmp_path / "out"), "--params",
                             str(tmp_path / "dry.yaml")], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "store:" in line:  # the data pipeline's store is written; the loader now reads it for a long while
            # once its workers are forked: a SIGTERM landing in logging's fork hook has its SystemExit swallowed
            time.sleep(3)
            proc.terminate()  # SIGTERM, as `timeout` sends
            break
    assert proc.wait(timeout=60) == 143
    sec = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["sections"]
    assert [sec[k]["status"] for k in ("facts", "training", "inference")] == ["ok"] * 3
    assert sec["data_pipeline"]["status"] == "killed" and len(sec["data_pipeline"]["store"]["cases"]) == 2
    assert list(scratch.iterdir()) == [] and len(list((tmp_path / "out").iterdir())) <= 7
