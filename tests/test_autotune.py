"""`auto` precision and layout: the probe on this CPU, its cache, the choice rules, the warning, the step report."""
import json
import os
import subprocess
import sys

import pytest
import torch

from unetpp_lib.core import device
from unetpp_lib.nn import autotune
from unetpp_lib.nn.progress import StepReport

PLANS = {"num_input_channels": 1, "num_classes": 3, "patch_size": [8, 16, 16], "batch_size": 2,
         "pool_op_kernel_sizes": [[1, 2, 2], [2, 2, 2]], "conv_kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
         "base_num_features": 4, "max_num_features": 320}
CPU, GPU = torch.device("cpu"), torch.device("cuda")


def row(precision, cl, seconds=None, **extra):
    r = {"precision": precision, "channels_last": cl, **extra}
    if seconds is not None:
        r["seconds"] = seconds
    return r


def test_probe_times_the_network_here_and_is_cached(tmp_path):
    cache = tmp_path / "autotune.json"
    first = autotune.choose("train", PLANS, 2, CPU, cache=cache)
    timed = {(r["precision"], r["channels_last"]) for r in first.rows if "seconds" in r}
    assert {("fp32", False), ("fp32", True)} <= timed and not first.cached
    assert all(r["seconds"] > 0 for r in first.rows if "seconds" in r)
    assert first.cpu["bf16"] in ("native", "emulated") and first.cpu["aten_capability"]
    if first.cpu["bf16"] == "emulated":  # never a full bf16 step where it would take a minute
        assert all("seconds" not in r for r in first.rows if r["precision"] == "bf16")
    assert (first.precision, first.channels_last) == autotune.pick(first.rows, CPU)
    again = autotune.choose("train", PLANS, 2, CPU, cache=cache)
    assert again.cached and (again.precision, again.channels_last) == (first.precision, first.channels_last)
    stored = json.loads(cache.read_text())  # readable JSON, keyed by machine, torch and network
    (entry,) = stored.values()
    assert entry["key"]["machine"]["torch"] == torch.__version__ and entry["key"]["patch"] == [8, 16, 16]
    other = autotune.choose("infer", PLANS, 2, CPU, cache=cache)  # another workload: probed on its own
    assert not other.cached and len(json.loads(cache.read_text())) == 2


def test_an_explicit_setting_is_kept_and_a_slow_one_warned(tmp_path, monkeypatch):
    rows = [row("fp32", False, 0.66), row("fp32", True, 0.70),
            row("bf16", False, estimate_s=36.0, note="emulated"), row("bf16", True, estimate_s=40.0, note="emulated")]
    monkeypatch.setattr(autotune, "probe", lambda *a, **k: {"rows": rows, "cpu": {"bf16": "emulated"}, "probe_s": 1.0})
    slow = autotune.choose("train", PLANS, 2, CPU, precision="bf16", channels_last=True, cache=tmp_path / "c.json")
    assert (slow.precision, slow.channels_last) == ("bf16", True)  # kept as asked
    assert "61x slower" in slow.warning and "fp32 + channels-first" in slow.warning and "emulated" in slow.warning
    fine = autotune.choose("train", PLANS, 2, CPU, precision="fp32", channels_last=True, cache=tmp_path / "c.json")
    assert fine.warning == "" and fine.cached
    auto = autotune.choose("train", PLANS, 2, CPU, cache=tmp_path / "c.json")
    assert (auto.precision, auto.channels_last, auto.warning) == ("fp32", False, "")
    assert "bf16/CF ~36 (emulated)" in auto.summary() and "fp32/CF 0.66" in auto.summary()


@pytest.mark.parametrize("rows, device, expected", [
    # CPU: bf16 only when the probe shows it faster, by the margin; an estimate (emulated) is never chosen
    ([row("fp32", False, 1.0), row("fp32", True, 0.99), row("bf16", False, 0.6), row("bf16", True, 0.48)], CPU, ("bf16", True)),
    ([row("fp32", False, 1.0), row("fp32", True, 0.95), row("bf16", False, 0.93), row("bf16", True, 0.97)], CPU, ("fp32", False)),
    ([row("fp32", False, 1.0), row("fp32", True, 0.8), row("bf16", False, estimate_s=0.1)], CPU, ("fp32", True)),
    # GPU: fp16 as v1 unless its numerics fail or another is clearly faster
    ([row("fp16", False, 0.10), row("fp16", True, 0.13), row("bf16", False, 0.095), row("fp32", False, 0.4)], GPU, ("fp16", False)),
    ([row("fp16", False, 0.10, numerics="non-finite"), row("bf16", False, 0.11), row("fp32", False, 0.4)], GPU, ("bf16", False)),
    ([row("fp16", False, 0.10), row("fp16", True, 0.07), row("fp32", False, 0.4)], GPU, ("fp16", True)),
])
def test_pick_follows_the_rules(rows, device, expected):
    assert autotune.pick(rows, device) == expected


def test_the_cap_makes_bf16_emulated_and_the_probe_sees_it():
    """ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 stands in for an AVX2-only CPU: no native bf16 there."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if " avx2" not in flags:
        pytest.skip("not an AVX2 CPU")
    code = "import json; from unetpp_lib.core import device; print(json.dumps(device.cpu_info()))"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    info = json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout)
    assert info["aten_capability"] == "AVX2" and info["onednn_max_cpu_isa"] == "AVX2"
    assert info["bf16"] == "emulated" and info["bf16_conv_vs_fp32"] >= device.EMULATED
    assert "capped" in info["isa_summary"]


def test_step_report_projects_and_warns_once_with_a_cause(capsys, monkeypatch):
    choice = autotune.Choice("fp32", False, "train", "cpu", rows=[row("fp32", False, 0.5)])
    report = StepReport(25, 40, 0, 2, choice)
    report.step(1, 0.1, 2.0)
    report.step(2, 0.1, 0.5)
    out = capsys.readouterr().out
    assert "epoch 1/40: step 1/25, 2.10 s/step -> epoch ~52 s, training ~35 min" in out and "warning" not in out
    for i in range(3, 6):
        report.step(i, 3.0, 0.5)  # now mostly waiting for data: 3.5 s a step, 7x the probe
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "waits for data" in out and "num_workers 2" in out


def test_choice_round_trips_through_the_launcher_config():
    choice = autotune.Choice("bf16", True, "train", "cpu", rows=[row("bf16", True, 0.4)], probe_s=2.0)
    again = autotune.Choice(**{k: v for k, v in json.loads(json.dumps(choice.as_dict())).items()
                               if k in autotune.Choice.__dataclass_fields__})
    assert again == choice and again.dtype == torch.bfloat16


def test_the_probe_leaves_the_callers_random_stream_alone(tmp_path):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    autotune.choose("infer", PLANS, 1, CPU, cache=tmp_path / "c.json")  # probed: builds and seeds networks
    assert torch.equal(torch.rand(3), expected)


def test_a_probe_cut_short_decides_this_run_only(tmp_path):
    cache = tmp_path / "c.json"
    short = autotune.choose("train", PLANS, 2, CPU, cache=cache, budget_s=0.0)  # the default alone is timed
    assert not autotune.complete(short.rows) and any(r.get("note") == "budget spent" for r in short.rows)
    assert (short.precision, short.channels_last) == ("fp32", False) and "not cached" in short.summary()
    assert not cache.exists()  # a busy moment is not kept for this machine's later runs
    full = autotune.choose("train", PLANS, 2, CPU, cache=cache)
    assert autotune.complete(full.rows) and not full.cached and cache.exists()
