"""Interactive QA viewers of CT volumes with liver/tumour overlays (static pictures are in plots.py).

Three backends:
- `png`: the static picture from plots.py (three planes, or the error map with a prediction).
  Always made, and all that headless runs keep.
- `niivue` (default): ipyniivue, the Jupyter widget of the NiiVue viewer. Its code ships
  inside the package, so it works offline in JupyterLab 4. Labels and error maps take
  plots.PALETTE's colours, as every PNG; browser.py builds its case browser from these parts.
- `itkwidgets`: opt-in for users with internet; its 1.0 alphas fetch the viewer at run
  time and block the next cell under papermill, so headless runs never call it.
Viewer packages (ipyniivue, itkwidgets, IPython) are imported only inside the functions that use them.
"""
from __future__ import annotations

import gzip
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..core.io import Geometry, read_image
from ..evaluation.errors import error_map
from .plots import ERRORS, HEAT_COLORMAP, HEAT_FLOOR, HEAT_STOPS, OVERLAY, WINDOW_HU, error_png, planes_png

LABEL_NAMES = {1: "liver", 2: "tumour"}


def label_colormap(colours: dict[int, tuple[float, float, float]], names: dict[int, str]) -> dict:
    """A NiiVue label colour table (`Volume.set_colormap_label`): value 0 transparent, the others opaque."""
    n = max(colours) + 1
    rgb = [(0.0, 0.0, 0.0)] * n
    for k, c in colours.items():
        rgb[k] = c
    return {"R": [round(255 * c[0]) for c in rgb], "G": [round(255 * c[1]) for c in rgb],
            "B": [round(255 * c[2]) for c in rgb], "A": [0] + [255] * (n - 1), "I": list(range(n)),
            "labels": [""] + [names.get(k, "") for k in range(1, n)]}


def label_lut() -> dict:
    """The palette's label table for a liver/tumour label map."""
    return label_colormap(OVERLAY, LABEL_NAMES)


def error_lut() -> dict:
    """The palette's label table for an error map (evaluation.errors.error_map's codes)."""
    return label_colormap({k: c for k, (_, c) in ERRORS.items()}, {k: n for k, (n, _) in ERRORS.items()})


def nifti_bytes(array: np.ndarray, like: str | Path) -> bytes:
    """A (z, y, x) uint8 array as gzipped NIfTI bytes placed exactly as the file `like` (for NiiVue's `data`)."""
    import nibabel

    ref = nibabel.load(str(like))
    img = nibabel.Nifti1Image(np.ascontiguousarray(array.T).astype(np.uint8), ref.affine)  # nibabel is (x, y, z)
    img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]) or 1)
    img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]) or 1)
    return gzip.compress(img.to_bytes(), compresslevel=1)  # label maps shrink 50-100x; faster over the comm


def label_volume(path: str | Path | None = None, data: bytes | None = None, name: str = "", lut: dict | None = None,
                 opacity: float = 0.5) -> Any:
    """An ipyniivue Volume of a label file or of NIfTI bytes, coloured by a label table (the palette's)."""
    from ipyniivue import Volume

    vol = Volume(path=str(path), opacity=opacity) if path else Volume(data=data, name=name, opacity=opacity)
    vol.set_colormap_label(lut or label_lut())
    return vol


def heat_volume(path: str | Path, opacity: float = 0.55) -> dict:
    """An uncertainty map (uint8 percent) as NiiVue volume options: plots.HEAT_COLORMAP's colours over 0-100 %,
    transparent at 0 and below plots.HEAT_FLOOR (NiiVue's "zero to max, transparent below cal_min"), as the PNG."""
    from ipyniivue import ColormapType

    return {"path": str(path), "colormap": HEAT_COLORMAP, "cal_min": float(HEAT_FLOOR), "cal_max": 100.0,
            "colormap_type": ColormapType.ZERO_TO_MAX_TRANSPARENT_BELOW_MIN, "opacity": opacity,
            "colorbar_visible": False}


def heat_css() -> str:
    """A CSS linear gradient of the heat map's colours, 0 % to 100 % (the browser's legend)."""
    stops = ", ".join(f"rgb({','.join(str(round(255 * v)) for v in c)}) {100 * t:.0f}%" for t, c in HEAT_STOPS)
    return f"linear-gradient(to right, {stops})"


def ct_volume(image: str | Path) -> dict:
    """The CT as NiiVue volume options, in the abdominal window (W400/L40)."""
    return {"path": str(image), "colormap": "gray", "cal_min": WINDOW_HU[0], "cal_max": WINDOW_HU[1]}


def _niivue(image: str | Path, label: str | Path | None, height: int, prediction: str | Path | None = None) -> Any:
    """NiiVue widget: CT in an abdominal window; the label (or, with a prediction, the error map) in the palette."""
    from ipyniivue import NiiVue, SliceType

    nv = NiiVue(height=height)
    vols: list = [ct_volume(image)]
    if label and prediction:
        codes = error_map(read_image(label)[0].astype(np.uint8), read_image(prediction)[0].astype(np.uint8))
        vols.append(label_volume(data=nifti_bytes(codes, prediction), name="errors.nii.gz", lut=error_lut()))
    elif label or prediction:
        vols.append(label_volume(label or prediction))
    nv.load_volumes(vols)
    nv.set_slice_type(SliceType.MULTIPLANAR)
    nv.set_radiological_convention(True)  # patient's right on screen left, as the PNG and most CT viewers
    return nv


def _itkwidgets(image: str | Path, label: str | Path | None) -> Any:
    """itkwidgets viewer (needs internet to fetch its viewer)."""
    from itkwidgets import view as itk_view

    img = sitk.ReadImage(str(image))
    kwargs = {"label_image": sitk.ReadImage(str(label))} if label else {}
    return itk_view(image=img, **kwargs)


def view(image: str | Path, label: str | Path | None = None, backend: str = "niivue",
         png_path: str | Path | None = None, headless: bool = False, height: int = 420,
         prediction: str | Path | None = None) -> Any:
    """Show a CT volume with its liver/tumour overlay (and a prediction); always writes and shows a static PNG.

    Returns the interactive widget (displayed as the cell's result), or None for `png`,
    in headless runs, or when the backend's package is missing (with a warning).
    """
    from IPython.display import Image, display

    png = Path(png_path) if png_path else Path(image).with_name(Path(image).name.replace(".nii.gz", "") + "_qa.png")
    if prediction and label:
        error_png(image, label, prediction, png)
    else:
        planes_png(image, label, png)
    display(Image(filename=str(png)))
    if backend == "png" or headless:
        return None
    makers = {"niivue": (lambda: _niivue(image, label, height, prediction), "viewers"),
              "itkwidgets": (lambda: _itkwidgets(image, label), "itk")}
    if backend not in makers:
        raise ValueError(f"viewer backend {backend!r}: use one of niivue, itkwidgets, png")
    make, extra = makers[backend]
    try:
        return make()
    except ImportError as e:
        warnings.warn(f"viewer {backend!r} is not installed ({e}); showing the PNG only. "
                      f"Install it with: pip install -e '.[{extra}]'", stacklevel=2)
        return None


# ----------------------------------------------------------------------------- parts of the review browser
def crosshair_frac(voxel_zyx: tuple[int, ...], geom: Geometry) -> list[float]:
    """NiiVue's crosshair position (fractions of its RAS-ordered volume) of a (z, y, x) voxel of a file with `geom`."""
    direction = np.array(geom.direction, float).reshape(3, 3)  # ITK: column a is index axis a (x, y, z) in LPS
    index, size = list(voxel_zyx)[::-1], list(geom.shape)[::-1]
    frac = [0.5, 0.5, 0.5]
    for a in range(3):
        ras = direction[:, a] * (-1.0, -1.0, 1.0)
        axis = int(np.argmax(np.abs(ras)))  # NiiVue shows the nearest orthogonal orientation, as this does
        f = (index[a] + 0.5) / size[a]
        frac[axis] = f if ras[axis] > 0 else 1.0 - f
    return frac


def _mz3(verts: np.ndarray, faces: np.ndarray) -> bytes:
    """A triangle mesh in NiiVue's MZ3 format: header (magic, faces+vertices flags, counts), int32 faces, float32 xyz."""
    head = struct.pack("<HHIII", 0x5A4D, 3, len(faces), len(verts), 0)
    return head + faces.astype("<i4").tobytes() + verts.astype("<f4").tobytes()


def surface_mesh(mask: np.ndarray, geom: Geometry, max_voxels: int = 160) -> bytes | None:
    """The surface of a (z, y, x) mask as an MZ3 mesh in world RAS mm (None when empty); coarser for big masks."""
    from skimage import measure

    if not mask.any():
        return None
    step = max(1, int(np.ceil(max(mask.shape) / max_voxels)))
    padded = np.pad(mask.astype(np.float32), 1)
    verts, faces, _, _ = measure.marching_cubes(padded, 0.5, step_size=step, allow_degenerate=False)
    if not len(faces):
        return None
    xyz = (verts - 1.0)[:, ::-1] * np.array(geom.spacing[::-1])  # index (z, y, x) -> mm along the x, y, z axes
    lps = xyz @ np.array(geom.direction, float).reshape(3, 3).T + np.array(geom.origin)
    return _mz3(lps * (-1.0, -1.0, 1.0), faces[:, ::-1])  # RAS; reversed winding keeps normals outward


def meshes(codes: np.ndarray, geom: Geometry, colours: dict[int, tuple], names: dict[int, str]) -> list[dict]:
    """ipyniivue mesh options of each code's surface in its colour; code 1 is the organ around the others
    (its surface encloses them all), drawn see-through, and codes 3 and up (errors) half so, since a missed rim
    wraps the agreed core it belongs to."""
    out = []
    for k, rgb in colours.items():
        data = surface_mesh(codes >= 1 if k == 1 else codes == k, geom)
        if data:
            out.append({"data": data, "name": f"{names.get(k, k)}.mz3".replace(" ", "_"),
                        "rgba255": [round(255 * c) for c in rgb] + [255], "opacity": 0.3 if k == 1 else 0.6 if k >= 3 else 1.0})
    return out


def niivue_widget(height: int, render: bool = False) -> Any:
    """An empty NiiVue widget for the review: planes in a row (or a 3D render), no legend of its own."""
    from ipyniivue import MultiplanarType, NiiVue, ShowRender, SliceType

    nv = NiiVue(height=height, show_legend=False, back_color=(0.0, 0.0, 0.0, 1.0),
                crosshair_color=(0.85, 0.85, 0.85, 0.8), multiplanar_show_render=ShowRender.NEVER,
                multiplanar_layout=MultiplanarType.ROW)
    nv.set_slice_type(SliceType.RENDER if render else SliceType.MULTIPLANAR)
    nv.set_radiological_convention(True)
    nv.layout.flex, nv.layout.min_width = "1 1 0%", "0"  # in a row of views: share the width equally
    return nv
