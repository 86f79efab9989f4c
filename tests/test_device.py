import sys

import pytest
import torch

from unetpp_lib.core.device import DeviceError, device_name, resolve_device


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert device_name(torch.device("cpu")) == "cpu"


def test_auto_never_imports_torch_npu():
    sys.modules.pop("torch_npu", None)
    resolve_device("auto")
    assert "torch_npu" not in sys.modules


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_npu_without_torch_npu_explains_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import fails as if not installed
    with pytest.raises(DeviceError, match=r"torch_npu .*pip install -e \.\[npu\]"):
        resolve_device("npu")


def test_unknown_device():
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
