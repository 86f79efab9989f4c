import sys

import numpy as np
import pytest
from matplotlib.image import imread

from unetpp_lib import convert
from unetpp_lib.core import io
from unetpp_lib.qa import plots, viz


@pytest.fixture(scope="module")
def raw_case(synth_task, tmp_path_factory):
    raw = tmp_path_factory.mktemp("viz") / "raw"
    convert.convert_task(synth_task, raw)
    return convert.case_files(raw)


def test_one_palette_for_error_codes_and_label_maps():
    assert set(plots.ERRORS) == {1, 2, 3, 4} and len({c for _, c in plots.ERRORS.values()}) == 4
    assert plots.OVERLAY == {1: plots.PALETTE["liver"], 2: plots.PALETTE["tumour"]}  # one palette everywhere


def test_orientation_does_not_depend_on_how_the_file_is_stored(tmp_path):
    """The same patient stored with flipped axes shows the same picture."""
    arr = np.zeros((4, 5, 6), np.int16)
    arr[1, 2, 0] = 100  # a voxel at the first x index
    plain = io.Geometry(arr.shape, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # flipped x and y: store the mirrored array with the origin at the other corner
    flipped = io.Geometry(arr.shape, (2.0, 1.0, 1.0), (5.0, 4.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    io.write_image(tmp_path / "a.nii.gz", arr, plain)
    io.write_image(tmp_path / "b.nii.gz", arr[:, ::-1, ::-1], flipped)
    a, sa = plots.load_oriented(tmp_path / "a.nii.gz")
    b, sb = plots.load_oriented(tmp_path / "b.nii.gz")
    assert np.array_equal(a, b) and sa == sb == (2.0, 1.0, 1.0)


def test_planes_png_is_written(raw_case, tmp_path):
    case, image, label = raw_case
    png = plots.planes_png(image, label, tmp_path / "qa.png")
    pixels = imread(png)
    grey = pixels[..., :3].mean(-1)
    thirds = np.array_split(grey, 3, axis=1)
    assert all(t.std() > 0.05 for t in thirds)  # three planes, each with anatomy in it
    blue = (pixels[..., 2] > 0.6) & (pixels[..., 2] - pixels[..., 0] > 0.25)
    assert blue.sum() > 20  # the tumour overlay, in the palette's tumour blue, is in the picture
    assert not list(tmp_path.glob("*.partial*"))


def test_view_png_backend_and_headless(raw_case, tmp_path):
    case, image, label = raw_case
    assert viz.view(image, label, backend="png", png_path=tmp_path / "a.png") is None
    assert (tmp_path / "a.png").is_file()
    assert viz.view(image, label, backend="niivue", png_path=tmp_path / "b.png", headless=True) is None
    with pytest.raises(ValueError, match="viewer backend 'vtk'"):
        viz.view(image, label, backend="vtk", png_path=tmp_path / "c.png")


def test_view_niivue_widget_carries_image_and_overlay(raw_case, tmp_path):
    pytest.importorskip("ipyniivue")
    case, image, label = raw_case
    nv = viz.view(image, label, backend="niivue", png_path=tmp_path / "a.png")
    assert type(nv).__name__ == "NiiVue"
    assert len(nv.volumes) == 2 and nv.volumes[1].opacity == 0.5
    assert nv.volumes[0].cal_min == plots.WINDOW_HU[0] and nv.opts.is_radiological_convention
    lut = nv.volumes[1].colormap_label  # the label in the palette's colours, as the PNGs
    assert list(lut.lut[4:8]) == [round(255 * c) for c in plots.PALETTE["liver"]] + [255]
    errors = viz.view(image, label, backend="niivue", png_path=tmp_path / "b.png", prediction=label)
    assert len(errors.volumes) == 2 and errors.volumes[1].name == "errors.nii.gz" and (tmp_path / "b.png").is_file()


def test_crosshair_frac_follows_the_file_orientation():
    plain = io.Geometry((4, 10, 20), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # ITK's identity is LPS: x runs to the patient's left, so NiiVue's RAS fraction counts from the other end
    assert viz.crosshair_frac((1, 2, 3), plain) == pytest.approx([1 - 3.5 / 20, 1 - 2.5 / 10, 1.5 / 4])
    flipped = io.Geometry((4, 10, 20), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    assert viz.crosshair_frac((1, 2, 3), flipped) == pytest.approx([3.5 / 20, 2.5 / 10, 1.5 / 4])


def test_surface_mesh_is_an_mz3_in_world_mm():
    import struct

    mask = np.zeros((6, 8, 8), bool)
    mask[2:4, 2:6, 2:6] = True
    g = io.Geometry(mask.shape, (2.0, 1.0, 1.0), (10.0, 20.0, 30.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    data = viz.surface_mesh(mask, g)
    magic, attr, nface, nvert, skip = struct.unpack("<HHIII", data[:16])
    assert (magic, attr, skip) == (0x5A4D, 3, 0) and len(data) == 16 + 12 * nface + 12 * nvert
    xyz = np.frombuffer(data[16 + 12 * nface:], "<f4").reshape(-1, 3)
    # the box spans x 1.5-5.5 voxels (1 mm) from x = 10 mm in LPS, so RAS x = -(11.5 ... 15.5); z 1.5-3.5 x 2 mm + 30
    assert xyz[:, 0].min() == pytest.approx(-15.5) and xyz[:, 0].max() == pytest.approx(-11.5)
    assert xyz[:, 2].min() == pytest.approx(33.0) and xyz[:, 2].max() == pytest.approx(37.0)
    assert viz.surface_mesh(np.zeros((3, 3, 3), bool), g) is None


def test_missing_viewer_falls_back_to_png_with_install_hint(raw_case, tmp_path, monkeypatch):
    case, image, label = raw_case
    monkeypatch.setitem(sys.modules, "itkwidgets", None)
    with pytest.warns(UserWarning, match=r"pip install -e '\.\[itk\]'"):
        assert viz.view(image, label, backend="itkwidgets", png_path=tmp_path / "a.png") is None
    assert (tmp_path / "a.png").is_file()


def test_spacing_png(synth_task, tmp_path):
    table = convert.verify_task(synth_task).table()
    pixels = imread(plots.spacing_png(table, tmp_path / "s.png"))[..., :3]
    blue = (pixels[..., 2] > 0.55) & (pixels[..., 0] < 0.3)  # matplotlib's first colour: points and bars
    left, right = np.array_split(blue, 2, axis=1)
    assert left.sum() > 20 and right.sum() > 200  # the scatter of spacings and the histogram of slice counts


def test_importing_the_library_needs_no_viewer_or_jupyter():
    import subprocess

    code = ("import sys, unetpp_lib.convert, unetpp_lib.qa.viz, unetpp_lib.qa.plots, unetpp_lib.launch, unetpp_lib.prep.synthetic, "
            "unetpp_lib.qa.review, unetpp_lib.qa.browser, unetpp_lib.evaluation.lesions, unetpp_lib.core.params\n"
            "bad = [m for m in ('ipyniivue', 'itkwidgets', 'papermill', 'IPython', 'ipywidgets', 'matplotlib.pyplot', "
            "'skimage') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
