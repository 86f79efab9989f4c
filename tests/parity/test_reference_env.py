"""The reference environment itself: nnU-Net v1.6.4 imports and the file round trip works."""
from __future__ import annotations


def test_reference_imports_and_round_trip(run_ref):
    res = run_ref("ref_smoke.py")
    assert "site-packages" in res["batchgenerators_file"]
    assert res.array("echo").tolist() == [1, 2, 3]
