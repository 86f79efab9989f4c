"""moreDA augmentation: ours vs v1.6.4's transforms (batchgenerators 0.21), one reference run per module.

Distributions: each transform alone, N independent draws on a small probe, both sides
summarised by the same statistic (tests/parity/ref/ref_augment.py), compared with a
two-sample KS test; the statistic pins the parameter and the firing probability. Exact
checks: fixed parameters through both, compared value by value; spatial maps for fixed
angles and scales compared on a label probe (Dice) and a smooth image probe (cubic vs ours
trilinear, measured).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

from unetpp_lib.augment import (AugmentConfig, enlarged_size, gamma, gaussian_blur, intensity, mirror,
                                rotation_matrix, simulate_lowres, spatial, spatial_params)
from unetpp_lib.losses import IGNORE

from .conftest import REF_DIR

SEED = 20260
N = 1000
ALPHA = 1e-3  # fixed seeds: a pass is reproducible; the old rules below sit at p < 1e-6
RAMP_E, RAMP_PATCH = 17, (6, 6, 6)  # 17 = 1 mod 4: v1's centre round(E / 2) is the true centre (E - 1) / 2
GEO_E, GEO_PATCH = 45, (29, 29, 29)  # E - patch even, as in training
CASES = [((0.4, -0.3, 0.2), 1.0), ((0.5, 0.0, 0.0), 1.0), ((0.0, 0.0, -0.45), 1.0), ((0.1, 0.45, -0.35), 0.75),
         ((-0.3, 0.2, 0.5), 1.3), ((0.0, 0.0, 0.0), 0.8)]
BOX_PATCHES = [[128, 128, 128], [16, 64, 64], [48, 160, 160], [80, 192, 160], [40, 56, 24], [7, 9, 11]]
OFF = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")
       and not f.name.endswith("_channel")}
JOBS = {  # job -> probe, statistics, our config key switched on (at v1's probability unless `p`)
    "noise": dict(probe="smooth", stats=["noise_sd"], key="p_noise"),
    "noise_p1": dict(probe="smooth", stats=["noise_sd"], key="p_noise", p=1.0, kind="noise", set={"p_per_sample": 1.0}),
    "blur": dict(probe="checker", stats=["var_ratio"], key="p_blur"),
    "brightness": dict(probe="smooth", stats=["mean_ratio"], key="p_brightness"),
    "contrast": dict(probe="smooth", stats=["std_ratio"], key="p_contrast"),
    "lowres": dict(probe="white", stats=["hf_ratio"], key="p_lowres"),
    "gamma_inverted": dict(probe="skewed", stats=["gamma_shape", "mean"], key="p_gamma_inverted"),
    "gamma": dict(probe="skewed", stats=["gamma_shape", "mean"], key="p_gamma"),
    "mirror": dict(probe="arange", stats=["flip_code"], key="p_mirror"),
    "rotation": dict(probe="ramp", stats=["angles"], key="p_rotation"),
    "scaling": dict(probe="ramp", stats=["scale"], key="p_scale"),
    "scaling_p1": dict(probe="ramp", stats=["scale"], key="p_scale", p=1.0, kind="scaling",
                       set={"p_scale_per_sample": 1.0}, n=3000),
}


def _shared():
    """The numpy statistics of the reference script (one definition for both sides)."""
    spec = importlib.util.spec_from_file_location("ref_augment_stats", REF_DIR / "ref_augment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SHARED = _shared()


def smooth_field(shape, sigma: float, seed: int) -> np.ndarray:
    """A smooth random field, mean 0, std 1 (normalised CT-like intensities)."""
    f = ndimage.gaussian_filter(np.random.RandomState(seed).randn(*shape), sigma, mode="wrap")
    return ((f - f.mean()) / f.std()).astype(np.float32)


def make_probes() -> dict:
    """Small probe volumes (C, *S): 2 channels for the intensity transforms, 3 ramps for the spatial ones."""
    s = (12, 16, 16)
    z, y, x = np.meshgrid(*[np.arange(n) for n in s], indexing="ij")
    checker = np.where((z + y + x) % 2 == 0, 1.0, -1.0).astype(np.float32)
    ramp = np.stack(np.meshgrid(*[np.arange(RAMP_E) - (RAMP_E - 1) / 2] * 3, indexing="ij")).astype(np.float32)
    return {
        "smooth": np.stack([smooth_field(s, 2, 1), smooth_field(s, 2, 2)]) + 1.5,
        "checker": np.stack([checker, -checker]),
        "white": np.random.RandomState(3).randn(2, *s).astype(np.float32),
        "skewed": np.exp(0.6 * np.stack([smooth_field(s, 1.5, 4), smooth_field(s, 1.5, 5)])),
        "arange": np.arange(2 * np.prod(s), dtype=np.float32).reshape(2, *s),
        "ramp": ramp,
    }


def make_geometry() -> np.ndarray:
    """(2, E, E, E): a smooth image (normalised units) and a label with an ellipsoid (1) and an off-centre ball (2)."""
    c = (GEO_E - 1) / 2
    z, y, x = np.meshgrid(*[np.arange(GEO_E) - c] * 3, indexing="ij")
    lab = np.zeros((GEO_E,) * 3, np.float32)
    lab[(z / 9) ** 2 + ((y - 2) / 13) ** 2 + ((x + 1) / 11) ** 2 < 1] = 1
    lab[(z - 3) ** 2 + (y - 6) ** 2 + (x + 4) ** 2 < 16] = 2
    img = ndimage.gaussian_filter(lab, 1.5) + 0.3 * smooth_field(lab.shape, 3, 6)
    return np.stack([(img - img.mean()) / img.std(), lab])


_CACHE: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny tensor ops: one thread, or intra-op thread hand-offs cost 10-50x on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def ref(run_ref, tmp_path):
    """The one reference run of this module (the first test to ask makes it; later ones reuse it)."""
    if "ref" not in _CACHE:
        probes = make_probes()
        paths = {}
        for k, v in probes.items():
            paths[k] = tmp_path / f"probe_{k}.npy"
            np.save(paths[k], v)
        np.save(tmp_path / "geo.npy", make_geometry())
        jobs = {k: {kk: vv for kk, vv in j.items() if kk not in ("key", "p")} for k, j in JOBS.items()}
        _CACHE["ref"] = run_ref("ref_augment.py", jobs=jobs, probes={k: str(v) for k, v in paths.items()}, n=N,
                                seed=SEED, ramp_patch=list(RAMP_PATCH), geo=tmp_path / "geo.npy",
                                geo_patch=list(GEO_PATCH), cases=[[list(a), s] for a, s in CASES],
                                box_patches=BOX_PATCHES)
        _CACHE["probes"] = probes
    return _CACHE["ref"]


def ours(name: str, seed: int, chunk: int = 250) -> np.ndarray:
    """Our draws for one job: (n, C, *out), the transform alone at v1's probability."""
    job = JOBS[name]
    defaults = AugmentConfig()
    cfg = AugmentConfig(**{**OFF, job["key"]: job.get("p", getattr(defaults, job["key"]))})
    probe = torch.from_numpy(_CACHE["probes"][job["probe"]])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n, out = job.get("n", N), []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        img = probe.expand(b, *probe.shape).clone()
        lab = torch.zeros(b, *probe.shape[1:], dtype=torch.long)
        if job["probe"] == "ramp":
            y, _ = spatial(img, lab, RAMP_PATCH, spatial_params(b, cfg, gen), num_classes=1)
        elif name == "mirror":
            y, _ = mirror(img, lab, cfg, gen)
        else:
            y = intensity(img, cfg, gen)
        out.append(y.numpy())
    return np.concatenate(out)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS p-value."""
    return float(stats.ks_2samp(a, b, method="asymp").pvalue)


@pytest.mark.parametrize("name", list(JOBS))
def test_transform_alone_matches_v1_in_distribution(ref, name):
    y = ours(name, SEED + list(JOBS).index(name))
    probe = _CACHE["probes"][JOBS[name]["probe"]]
    for s in JOBS[name]["stats"]:
        mine, theirs = SHARED.STATS[s](probe, y), ref.array(f"{name}__{s}")
        assert mine.shape == theirs.shape
        for col in range(mine.shape[1]):  # each channel (or angle axis)
            p = _ks(mine[:, col], theirs[:, col])
            assert p > ALPHA, (name, s, col, p)
        if mine.shape[1] == 2:  # channels drawn together or apart: their difference tells
            p = _ks(mine[:, 0] - mine[:, 1], theirs[:, 0] - theirs[:, 1])
            assert p > ALPHA, (name, s, "channel difference", p)
        fired = float(np.mean(np.any(np.abs(theirs - np.median(theirs, 0)) > 1e-6, 1)))
        print(f"{name}/{s}: KS p = {min(_ks(mine[:, c], theirs[:, c]) for c in range(mine.shape[1])):.3g}, "
              f"v1 changed {fired:.3f} of draws")


def test_old_rules_would_fail(ref):
    """The KS tests reject what we had before: sqrt of U(0, 0.1) as the noise sigma, a plain U(0.7, 1.4) scale.

    Both drawn with p 1: at v1's p (one draw in ten or five) most of the difference hides among unchanged draws.
    """
    rng = np.random.RandomState(SEED)
    probe = _CACHE["probes"]["smooth"]
    sd = np.sqrt(rng.uniform(0, 0.1, N))
    y = probe[None] + rng.randn(N, *probe.shape).astype(np.float32) * sd[:, None, None, None, None]
    p_noise = _ks(SHARED.stat_noise_sd(probe, y)[:, 0], ref.array("noise_p1__noise_sd")[:, 0])
    theirs = ref.array("scaling_p1__scale")[:, 0]
    p_scale = _ks(rng.uniform(0.7, 1.4, len(theirs)), theirs)
    print(f"old noise rule KS p = {p_noise:.2g}; old scale rule KS p = {p_scale:.2g}")
    assert p_noise < 1e-6 and p_scale < 1e-4


def test_transform_order_and_parameters_are_v1s(ref):
    """v1's transform list (the one sampled from above): its order and parameters are our defaults'."""
    order = [t for t in ref["order"] if t != "SegChannelSelectionTransform"]
    assert order[:9] == ["SpatialTransform", "GaussianNoiseTransform", "GaussianBlurTransform",
                         "BrightnessMultiplicativeTransform", "ContrastAugmentationTransform",
                         "SimulateLowResolutionTransform", "GammaTransform(inverted)", "GammaTransform",
                         "MirrorTransform"]  # augment_batch: spatial, intensity (this order), mirror
    p = {k.rstrip("0123456789"): v for k, v in ref["params"].items() if k.rstrip("0123456789") != "GammaTransform"}
    c = AugmentConfig()
    sp = p["SpatialTransform"]
    rad = math.radians(c.rotation_deg)
    assert sp["angle_x"] == sp["angle_y"] == sp["angle_z"] == [-rad, rad]
    assert (sp["p_rot_per_sample"], sp["p_scale_per_sample"], sp["p_rot_per_axis"]) == (c.p_rotation, c.p_scale, 1)
    assert tuple(sp["scale"]) == c.scale and not sp["do_elastic_deform"] and not sp["independent_scale_for_each_axis"]
    assert (sp["order_data"], sp["order_seg"], sp["border_cval_seg"]) == (3, 1, -1)
    assert p["GaussianNoiseTransform"]["p_per_sample"] == c.p_noise
    assert tuple(p["GaussianNoiseTransform"]["noise_variance"]) == c.noise_sigma
    bl = p["GaussianBlurTransform"]
    assert (tuple(bl["blur_sigma"]), bl["p_per_sample"], bl["p_per_channel"], bl["different_sigma_per_channel"]) == \
        (c.blur_sigma, c.p_blur, c.p_blur_channel, True)
    br = p["BrightnessMultiplicativeTransform"]
    assert (tuple(br["multiplier_range"]), br["p_per_sample"], br["per_channel"]) == \
        (c.brightness, c.p_brightness, True)
    co = p["ContrastAugmentationTransform"]
    assert (tuple(co["contrast_range"]), co["p_per_sample"], co["per_channel"], co["preserve_range"]) == \
        (c.contrast, c.p_contrast, True, True)
    lr = p["SimulateLowResolutionTransform"]
    assert (tuple(lr["zoom_range"]), lr["p_per_sample"], lr["p_per_channel"], lr["per_channel"],
            lr["order_downsample"], lr["order_upsample"]) == (c.lowres_zoom, c.p_lowres, c.p_lowres_channel, True, 0, 3)
    gammas = [v for k, v in ref["params"].items() if k.startswith("GammaTransform")]
    assert [(g["invert_image"], g["p_per_sample"], g["per_channel"], g["retain_stats"], tuple(g["gamma_range"]))
            for g in gammas] == [(True, c.p_gamma_inverted, True, True, c.gamma),
                                 (False, c.p_gamma, True, True, c.gamma)]
    assert list(p["MirrorTransform"]["axes"]) == [0, 1, 2] and c.p_mirror == 0.5


def test_intensity_functions_equal_v1_for_fixed_parameters(ref):
    x = torch.from_numpy(_CACHE["probes"]["smooth"])
    blur = torch.stack([gaussian_blur(v, 0.7) for v in x])
    d = {"blur": np.abs(blur.numpy() - ref.array("exact_blur")).max()}
    low = torch.stack([simulate_lowres(v, 0.6) for v in x])
    d["lowres"] = d_low = np.abs(low.numpy() - ref.array("exact_lowres")).max()
    for invert in (False, True):
        g = torch.stack([gamma(v, 1.3, invert) for v in x])
        theirs = ref.array(f"exact_gamma_{int(invert)}")
        d[f"gamma inverted={invert}"] = np.abs(g.numpy() - theirs).max()
        v = -x if invert else x  # what we had: mean kept exactly, unlike batchgenerators 0.21
        lo, rng = v.amin((1, 2, 3), keepdim=True), v.amax((1, 2, 3), keepdim=True) - v.amin((1, 2, 3), keepdim=True)
        old = ((v - lo) / rng) ** 1.3 * rng + lo
        old = (old - old.mean((1, 2, 3), keepdim=True)) / old.std((1, 2, 3), keepdim=True) * \
            v.std((1, 2, 3), keepdim=True) + v.mean((1, 2, 3), keepdim=True)
        assert np.abs((-old if invert else old).numpy() - theirs).max() > 1e-2
    c = torch.stack([((v - v.mean()) * 1.2 + v.mean()).clamp(v.min(), v.max()) for v in x])
    d["contrast"] = np.abs(c.numpy() - ref.array("exact_contrast")).max()
    print("fixed-parameter max |ours - v1|:", {k: f"{v:.2g}" for k, v in d.items()})
    assert max(d.values()) < 1e-5
    # what we had for low resolution: nearest (floor) down, trilinear up
    small = [round(s * 0.6) for s in x.shape[1:]]
    tri = F.interpolate(F.interpolate(x[None], size=small, mode="nearest"), size=list(x.shape[1:]), mode="trilinear")
    d_tri = np.abs(tri[0].numpy() - ref.array("exact_lowres"))
    print(f"low resolution zoom 0.6: ours cubic max |diff| {d_low:.2g}; old nearest+trilinear mean |diff| "
          f"{d_tri.mean():.3f}, max {d_tri.max():.3f} (probe std 1)")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks."""
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def test_spatial_map_equals_v1_for_fixed_angles_and_scale(ref):
    """Same angles (rad, about array axes 0, 1, 2 = batchgenerators' x, y, z) and scale: the same geometry."""
    assert ref["spatial_transform_vs_steps"] < 1e-5  # the steps replayed are SpatialTransform's own
    geo = torch.from_numpy(make_geometry())
    img, lab = geo[0][None, None], geo[1].long()[None]
    for i, (angles, scale) in enumerate(CASES):
        m = rotation_matrix(torch.tensor([angles], dtype=torch.float64)).float() * scale
        out_img, out_lab = spatial(img, lab, GEO_PATCH, m, num_classes=3)
        v1_img, v1_lab = ref.array(f"geo_img_{i}"), ref.array(f"geo_lab_{i}")
        dice = [_dice(out_lab[0].numpy() == c, v1_lab == c) for c in (1, 2)]
        assert min(dice) >= 0.98, (angles, scale, dice)
        support = F.pad(torch.ones(1, 1, *(n - 2 for n in img.shape[2:])), [1] * 6)
        inside = spatial(support, lab, GEO_PATCH, m, 3)[0][0, 0].numpy() > 0.999  # cubic support inside the input
        diff = np.abs(out_img[0, 0].numpy() - v1_img)[inside]
        assert inside.mean() > 0.5 and diff.mean() < 0.05, (angles, scale, inside.mean(), diff.mean())
        if any(angles):  # the old convention (rotation matrix not transposed) lands elsewhere
            old = rotation_matrix(torch.tensor([angles], dtype=torch.float64)).float().transpose(1, 2) * scale
            _, old_lab = spatial(img, lab, GEO_PATCH, old, num_classes=3)
            assert _dice(old_lab[0].numpy() == 2, v1_lab == 2) < 0.9
        print(f"angles {angles} scale {scale}: label Dice {dice[0]:.4f}/{dice[1]:.4f}; image trilinear vs cubic "
              f"mean |diff| {diff.mean():.4f}, p99 {np.quantile(diff, 0.99):.3f}, max {diff.max():.3f} "
              f"(image std 1)")


def test_dummy_2d_is_v1s(ref):
    """Anisotropic plans (v1's dummy 2D): rotation +-180 deg and scale in-plane, no low resolution along axis 0."""
    p = {k.rstrip("0123456789"): v for k, v in ref["params_dummy_2d"].items()}
    assert "Convert3DTo2DTransform" in p and p["SimulateLowResolutionTransform"]["ignore_axes"] == [0]
    sp, c = p["SpatialTransform"], AugmentConfig(dummy_2d=True)
    assert sp["angle_x"] == [-math.radians(c.rotation_deg_2d), math.radians(c.rotation_deg_2d)]
    assert len(sp["patch_size"]) == 2 and tuple(sp["scale"]) == c.scale
    mats = spatial_params(2000, dataclasses.replace(c, p_rotation=1.0, p_scale=1.0), torch.Generator().manual_seed(0))
    axis0 = torch.tensor([1.0, 0, 0])
    assert torch.allclose(mats[:, 0], axis0) and torch.allclose(mats[:, :, 0], axis0)
    angle = torch.atan2(mats[:, 2, 1], mats[:, 1, 1]).abs()  # in-plane angle, up to the scale
    assert angle.max() > math.radians(170)
    img = torch.arange(12.0).view(1, 1, 12, 1, 1).expand(4, 2, 12, 16, 16).contiguous()  # varies along axis 0 only
    cfg = AugmentConfig(**{**OFF, "p_lowres": 1.0, "p_lowres_channel": 1.0, "dummy_2d": True})
    assert torch.allclose(intensity(img.clone(), cfg, torch.Generator().manual_seed(0)), img, atol=1e-5)
    cfg = dataclasses.replace(cfg, dummy_2d=False)
    assert not torch.allclose(intensity(img.clone(), cfg, torch.Generator().manual_seed(0)), img, atol=1e-2)


def test_loaded_box_is_v1s(ref):
    """The enlarged box: v1's basic_generator_patch_size (3D and dummy 2D), one voxel more where its margin is odd."""
    for patch, (v1_3d, v1_2d) in zip(BOX_PATCHES, ref["boxes"]):
        for v1, dummy in ((v1_3d, False), (v1_2d, True)):
            ours = enlarged_size(patch, AugmentConfig(dummy_2d=dummy))
            assert ours == [b + (b - p) % 2 for b, p in zip(v1, patch)], (patch, dummy, ours, v1)
