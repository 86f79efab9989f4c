"""Every benchmark function on tiny sizes: fields, units and the FLOP count."""
import json
import time

import pytest

from conftest import prepared_run
from unetpp_lib import benchmark, plan, preprocess, scale
from unetpp_lib.perf import timing
from unetpp_lib.qa import plots
from unetpp_lib.nn.model import UNetPPConfig, count_macs


@pytest.fixture(scope="module")
def tiny_run(synth_task, tmp_path_factory):
    return prepared_run(tmp_path_factory.mktemp("bench"), synth_task,
                        {"patch_size": [8, 16, 16], "base_num_features": 2, "batch_size": 2})


def tiny_plans(run):
    return json.loads((run / "preprocessed" / "plans.json").read_text())


def test_flops_match_a_hand_count():
    cfg = UNetPPConfig(1, 3, [[2, 2, 2]], [[3, 3, 3], [3, 3, 3]], base_features=2)
    v0, v1, k = 4 ** 3, 2 ** 3, 27  # voxels at level 0 and 1 for a 4^3 patch, 3x3x3 taps
    by_hand = (2 * v0 * k * 1 + 2 * v0 * k * 2  # X(0,0): 1->2, 2->2
               + 4 * v1 * k * 2 + 4 * v1 * k * 4  # X(1,0): strided 2->4, 4->4
               + 4 * v1 * 2 * 8  # up: transposed conv 4->2, each input voxel fills a 2x2x2 block
               + 2 * v0 * k * 4 + 2 * v0 * k * 2  # X(0,1): (2+2)->2, 2->2
               + 3 * v0 * 2)  # head 1x1x1: 2->3
    assert count_macs(cfg, [4, 4, 4]) == by_hand == 37184


def test_datasheet_peaks():
    assert timing.datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert timing.datasheet_peak("NVIDIA H100 PCIe", "bf16") == 756.0
    assert timing.datasheet_peak("Tesla V100-SXM2-32GB", "fp16") == 125.0
    assert timing.datasheet_peak("cpu", "fp32") is None


def test_train_throughput_and_peak(tiny_run):
    r = timing.train_throughput(tiny_plans(tiny_run), "cpu", warmup=1, steps=2)
    assert r["samples_per_s"] > 0 and r["step_s_median"] > 0 and r["steps"] == 2 and r["first_step_s"] > 0
    assert r["forward_macs_per_sample"] == count_macs(UNetPPConfig(1, 3, tiny_plans(tiny_run)["pool_op_kernel_sizes"],
                                                                    tiny_plans(tiny_run)["conv_kernel_sizes"], 2),
                                                       [8, 16, 16])
    p = timing.matmul_peak_tflops("cpu", "fp32", n=256, repeats=2)
    assert p["measured_tflops"] > 0 and p["device"] == "cpu" and p["n"] == 256
    # a tiny conv net cannot beat a dense matmul: a FLOP count 10x too high would show here
    assert 0 < r["achieved_tflops"] < 1.5 * p["measured_tflops"]


def test_pipeline_inference_profile(tiny_run, tmp_path, capfd):
    d = timing.pipeline_throughput(tiny_run, batches=3, num_workers=0)
    assert d["samples_per_s"] > 0 and d["batch_size"] == 2
    t0 = time.perf_counter()
    inf = timing.inference_timing(tiny_plans(tiny_run), [10, 20, 20], "cpu", mirror_axes=(2,))
    wall = time.perf_counter() - t0
    assert inf["tiles"] == 2 * 2 * 2 * 2 and inf["mirrorings"] == 2  # 2 tiles per axis, 2 mirrorings
    # the stages are disjoint parts of the call: nothing counted twice, nothing outside the call
    assert 0 < inf["network"] and inf["network"] + inf["sliding_window"] <= inf["predict_total"] + 1e-5
    assert inf["predict_total"] + inf["export_write"] <= wall
    prof = timing.profile_steps(tiny_plans(tiny_run), tmp_path, "cpu", steps=1, top=5)
    assert len(prof["top_operators"]) == 5 and json.loads(open(prof["trace"]).read())
    assert "USDT" not in capfd.readouterr().err  # libkineto's start/stop lines stay out of the run's terminal
    # the GPU check's variants: no trace but a text table; export without the NIfTI write; any store's cases
    prof = timing.profile_steps(tiny_plans(tiny_run), None, "cpu", steps=1, top=5, precision="bf16", channels_last=True)
    assert "trace" not in prof and "aten::" in prof["table"] and prof["precision"] == "torch.bfloat16"
    inf = timing.inference_timing(tiny_plans(tiny_run), [10, 20, 20], "cpu", mirror_axes=(), write=False)
    assert inf["export_argmax"] > 0 and "export_write" not in inf and inf["tile_batch"] == 2
    splits = json.loads((tiny_run / "preprocessed" / "splits.json").read_text())
    d = timing.loader_throughput(tiny_run / "preprocessed", splits[0]["train"], tiny_plans(tiny_run), 2, 0)
    assert d["samples_per_s"] > 0 and all(b >= p for b, p in zip(d["box"], [8, 16, 16]))


def test_preprocess_benchmark_fields(tiny_run):
    r = timing.benchmark_preprocess(tiny_run / "raw", tiny_run / "preprocessed", preprocess.preprocess_task)
    assert r["cases"] == 5 and r["x_io_floor"] > 0 and r["cases_per_min"] > 0
    assert 0 < r["bytes_per_voxel"] < 4 and r["nnunet_v2_like_bytes_per_voxel"] > 0
    assert r["resampling"]["speedup"] > 0


def test_run_benchmark_writes_json_and_plot(tiny_run, monkeypatch):
    s = benchmark.BenchSettings(device="cpu", bench_warmup=1, bench_steps=1, bench_inference_shape=[10, 20, 20],
                                bench_head_modes=["deepest", "pruned"], bench_profile_steps=1,
                                inference_mirror_axes=[[]], preprocess=False, bench_scale_cases=1)
    seen = []  # real-size cases take minutes: the stage's call is seen, not made
    monkeypatch.setattr(scale, "preprocessing_at_scale", lambda work, n: seen.append(n) or {"ratio": 2.5})
    bench = benchmark.run_benchmark(tiny_run, s)
    saved = json.loads((tiny_run / "benchmark" / "benchmark.json").read_text())
    assert seen == [1] and saved["preprocessing_at_scale"] == {"ratio": 2.5}
    assert [p.name for p in (tiny_run / "benchmark").iterdir() if p.name.startswith("scale_")] == []  # work folder gone
    assert saved["device"] == "cpu" and len(saved["training"]) == 1 and len(saved["inference"]) == 2
    assert 0 < saved["training"][0]["mfu_measured_peak"] < 1.5 and {"table", "caveat"} <= set(saved["seed"])
    assert plots.benchmark_png(bench, tiny_run / "benchmark" / "benchmark.png").is_file()
    assert plan.task03_plans()["patch_size"] == [128, 128, 128]
