import json
import numpy as np
import pytest

from unetpp_lib.core import io


def oblique_geometry(shape=(5, 6, 7)) -> io.Geometry:
    a = np.radians(8)
    d = np.diag([-1.0, -1.0, 1.0]) @ np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    return io.Geometry(shape, (2.5, 0.75, 0.7), (-180.25, -201.5, -512.0), tuple(d.ravel()))


def test_image_round_trip_keeps_voxels_and_geometry(tmp_path):
    geom = oblique_geometry()
    arr = np.arange(np.prod(geom.shape), dtype=np.int16).reshape(geom.shape) - 100
    path = io.write_image(tmp_path / "a.nii.gz", arr, geom)
    back, g = io.read_image(path)
    assert back.dtype == np.int16 and np.array_equal(back, arr)
    assert g.shape == geom.shape
    np.testing.assert_allclose(g.spacing, geom.spacing, atol=1e-6)
    np.testing.assert_allclose(g.origin, geom.origin, atol=1e-4)
    np.testing.assert_allclose(g.direction, geom.direction, atol=1e-6)


def test_nifti_affine_matches_itk_geometry(tmp_path):
    """An independent reader (nibabel, RAS) sees the same affine ITK (LPS) wrote."""
    nib = pytest.importorskip("nibabel")
    geom = oblique_geometry()
    path = io.write_image(tmp_path / "a.nii.gz", np.zeros(geom.shape, np.uint8), geom)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    d = np.array(geom.direction).reshape(3, 3)
    expected = np.eye(4)
    expected[:3, :3] = lps_to_ras @ d @ np.diag(geom.spacing[::-1])
    expected[:3, 3] = lps_to_ras @ np.array(geom.origin)
    np.testing.assert_allclose(nib.load(path).affine, expected, atol=1e-4)
    assert nib.load(path).shape == geom.shape[::-1]  # nibabel indexes (x, y, z)


def test_geometry_json_round_trip():
    geom = oblique_geometry()
    assert io.Geometry.from_dict(json.loads(json.dumps(geom.to_dict()))) == geom


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    io.write_json(target, {"a": 1})
    assert io.read_json(target) == {"a": 1} and list(tmp_path.iterdir()) == [target]


def test_write_image_rejects_shape_mismatch(tmp_path):
    with pytest.raises(ValueError, match="shape"):
        io.write_image(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)), oblique_geometry())
    assert list(tmp_path.iterdir()) == []


def test_remove_partials(tmp_path):
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / "liver_1_0000.partial.nii.gz"
    stale.write_bytes(b"x")
    keep = tmp_path / "sub" / "liver_1_0000.nii.gz"
    keep.write_bytes(b"y")
    assert io.remove_partials(tmp_path) == [stale]
    assert keep.exists() and not stale.exists()


@pytest.mark.parametrize("kind", ["int16", "float64", "scaled", "nifti2", "4d", "plain"])
def test_strict_reader_equals_itk_and_nibabel(tmp_path, kind):
    """The strict reader gives ITK's (z, y, x) voxels, nibabel's values for scaled data, and refuses damage."""
    nib = pytest.importorskip("nibabel")
    geom = oblique_geometry((6, 7, 9))
    arr = (np.arange(np.prod(geom.shape)).reshape(geom.shape) % 700 - 300).astype(np.int16)
    path = tmp_path / ("a.nii" if kind == "plain" else "a.nii.gz")
    if kind in ("int16", "plain"):
        io.write_image(path, arr, geom)
    else:
        data = arr.T.astype(np.float64) + 0.25 if kind == "float64" else arr.T
        if kind == "4d":
            data = data[..., None]
        cls = nib.Nifti2Image if kind == "nifti2" else nib.Nifti1Image
        img = cls(data, np.diag([0.7, 0.75, 2.5, 1.0]))
        if kind == "scaled":
            img.header.set_slope_inter(0.5, -10.0)
        nib.save(img, path)
    back = io.read_voxels_strict(path)
    expected = np.asanyarray(nib.load(path).dataobj)
    expected = expected.reshape(expected.shape[:3]).T
    assert back.shape == geom.shape and back.dtype == expected.dtype and np.array_equal(back, expected)
    if kind in ("int16", "scaled"):
        assert np.array_equal(back, io.read_image(path)[0])  # the same voxels ITK reads
    if kind == "plain":
        return
    blob = path.read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(blob[: len(blob) - 40])
    with pytest.raises(EOFError):
        io.read_voxels_strict(tmp_path / "short.nii.gz")


def test_strict_reader_refuses_a_body_shorter_than_its_header(tmp_path):
    """An intact gzip whose NIfTI body is cut (the header promises more voxels) is an error, not zeros."""
    import gzip

    geom = oblique_geometry()
    path = io.write_image(tmp_path / "a.nii.gz", np.ones(geom.shape, np.int16), geom)
    body = gzip.decompress(path.read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(body[:-50]))
    with pytest.raises(ValueError, match="bytes of voxels"):
        io.read_voxels_strict(tmp_path / "cut.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 40))
    with pytest.raises(ValueError, match="NIfTI"):
        io.read_voxels_strict(tmp_path / "junk.nii.gz")


def test_strict_reader_without_isal_reads_the_same_and_refuses_the_same(tmp_path, monkeypatch):
    """ISA-L is an accelerator: without it the standard library inflates, with the same voxels and errors."""
    import sys

    geom = oblique_geometry()
    arr = (np.arange(np.prod(geom.shape)).reshape(geom.shape) % 300 - 100).astype(np.int16)
    path = io.write_image(tmp_path / "a.nii.gz", arr, geom)
    fast = io.read_voxels_strict(path)
    blob = path.read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(blob[:-30])
    monkeypatch.setitem(sys.modules, "isal", None)  # `from isal import igzip` now raises ImportError
    assert np.array_equal(io.read_voxels_strict(path), fast) and np.array_equal(fast, arr)
    with pytest.raises(EOFError):
        io.read_voxels_strict(tmp_path / "short.nii.gz")
