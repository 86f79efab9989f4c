"""Reading nnU-Net v1's pickles safely: the allow-list unpickler and the weights-only checkpoint load."""
from __future__ import annotations

import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch

from test_import_v1 import Payload, v1_plans
from unetpp_lib.nn import v1_pickle
from unetpp_lib.nn.v1_pickle import ImportV1Error, UnsafePickleError, restricted_load, restricted_loads


class Custom:
    """A class of the test's own: not in the allow-list."""


def test_restricted_unpickler_builds_what_v1_writes():
    obj = OrderedDict(plans=v1_plans(2), arrays=[np.arange(6, dtype=np.int16).reshape(2, 3), np.array(["a", "bc"]),
                                                  np.array([None, (1, 2)], dtype=object), np.zeros(3, np.float32)],
                      scalars=(np.float64(1.5), np.int64(-3), np.bool_(True), np.float32(2.0)), raw=b"\x00\xff",
                      misc={1: None, "s": {1, 2}, "f": frozenset({3}), "c": 1 + 2j, "t": (True, 1.0)})
    for protocol in (2, 3, 4, 5):  # v1 wrote 3 (Python 3.7) or 4; torch.save uses 2 (bytes via _codecs.encode)
        back = restricted_loads(pickle.dumps(obj, protocol=protocol))
        assert back["plans"]["plans_per_stage"][1]["patch_size"].tolist() == [8, 16, 16]
        assert isinstance(back["plans"]["normalization_schemes"], OrderedDict)
        assert back["scalars"] == obj["scalars"] and type(back["scalars"][1]) is np.int64
        for a, b in zip(back["arrays"], obj["arrays"]):
            assert a.dtype == b.dtype and a.tolist() == b.tolist()
        assert back["raw"] == b"\x00\xff" and back["misc"] == obj["misc"]


def test_numpy_1_names_are_read_by_numpy_2():
    """v1 ran numpy 1, whose pickles say numpy.core.multiarray; this numpy keeps them in numpy._core."""
    data = pickle.dumps({"a": np.arange(3.0), "s": np.int64(7)}, protocol=2)
    assert b"numpy._core.multiarray" in data
    old = restricted_loads(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert old["a"].tolist() == [0.0, 1.0, 2.0] and old["s"] == 7


@pytest.mark.parametrize("make, named", [
    (lambda m: Payload(m), "system"),
    (lambda m: Custom(), "test_v1_pickle.Custom"),
    (lambda m: {"ok": np.arange(2), "bad": Custom}, "test_v1_pickle.Custom"),
    (lambda m: OrderedDict(c=__import__("collections").Counter("ab")), "collections.Counter"),
    (lambda m: np.ma.masked_array([1, 2]), "numpy.ma"),
    (lambda m: np.datetime64("2020-01-01"), None),  # allowed: a numpy scalar (its dtype is plain data)
])
def test_restricted_unpickler_refuses_other_globals_without_running_them(make, named, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(make(marker)))
    if named is None:
        restricted_load(path)
        return
    with pytest.raises(UnsafePickleError, match=named) as e:
        restricted_load(path)
    assert str(path) in str(e.value) and "refused" in str(e.value)
    assert not marker.exists()


def test_reconstructor_builds_plain_arrays_only():
    """numpy's `_reconstruct` is allowed; handed another type than ndarray by a crafted pickle, it refuses."""
    crafted = (b"cnumpy.core.multiarray\n_reconstruct\n(ccollections\nOrderedDict\n(I0\ntp0\nS'b'\np1\ntp2\nRp3\n.")
    with pytest.raises(UnsafePickleError, match="only numpy.ndarray"):
        restricted_loads(crafted)
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_loads(b"cbuiltins\neval\n(S'1'\ntR.")


def test_damaged_pickle_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps(v1_plans())[:100])
    with pytest.raises(ImportV1Error, match="cut.pkl: not a readable pickle"):
        restricted_load(path)


def test_checkpoint_with_another_class_is_refused(tmp_path):
    path = tmp_path / "model_final_checkpoint.model"
    torch.save({"epoch": 1, "state_dict": {}, "plot_stuff": [Custom()]}, path)
    with pytest.raises(UnsafePickleError, match="weights_only=True.*Custom"):
        v1_pickle.load_v1_checkpoint(path)
