"""Interactive QA viewers of CT volumes with liver/tumour overlays (static pictures are in plots.py).

Three backends:
- `png`: the static picture from plots.py (three planes, or the error map with a prediction).
  Always made, and all that headless runs keep.
- `niivue` (default): ipyniivue, the Jupyter widget of the NiiVue viewer. Its code ships
  inside the package, so it works offline in JupyterLab 4.
- `itkwidgets`: opt-in for users with internet; its 1.0 alphas fetch the viewer at run
  time and block the next cell under papermill, so headless runs never call it.
Viewer packages are imported only inside `view`.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from .plots import WINDOW_HU, error_png, planes_png

def _niivue(image: str | Path, label: str | Path | None, height: int, prediction: str | Path | None = None) -> Any:
    """NiiVue widget: CT in an abdominal window, label (and prediction) overlays in two colour maps."""
    from ipyniivue import NiiVue, SliceType

    nv = NiiVue(height=height)
    vols = [{"path": str(image), "colormap": "gray", "cal_min": WINDOW_HU[0], "cal_max": WINDOW_HU[1]}]
    if label:
        vols.append({"path": str(label), "colormap": "warm", "opacity": 0.5, "cal_min": 0.5, "cal_max": 2.0})
    if prediction:
        vols.append({"path": str(prediction), "colormap": "cool", "opacity": 0.4, "cal_min": 0.5, "cal_max": 2.0})
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
