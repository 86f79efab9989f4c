"""moreDA augmentation: ours vs v1.6.4's transforms (batchgenerators 0.21), one reference run per module.

Each transform runs alone on a small probe, many independent draws on both sides, and both
sides summarise their draws with the same statistic (tests/parity/ref/ref_augment.py):
  * p = 1 (the transform always fires): its random parameter read back from every draw
    (noise sigma, blur sigma, multiplier, contrast factor, resampled size, gamma, angles, scale),
    compared at the two ends of the pooled sample (a range moved by 5 % of its width leaves
    tens of one side's draws beyond the other's extreme) and by KS (shape).
  * v1's probabilities: which draws fired (per channel, per axis), compared event by event
    with a two-proportion test, with enough draws for a 5 % relative change (10 % where v1 is
    too slow) to lie Z_DESIGN standard errors out.
Each comparison is also run against our transform with a planted change (range widened,
shifted or narrowed by 5 % of its width; a probability times 1.05 or 1.1) and must reject it.
The transform order is read off one augment_batch call. Exact checks: fixed parameters
through both, value by value; spatial maps for fixed angles and scales on a label probe
(Dice) and a smooth image probe (cubic vs ours trilinear, measured).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage, stats

import unetpp_lib.nn.augment as aug
from unetpp_lib.nn.augment import (AugmentConfig, _contrast, augment_batch, enlarged_size, gamma, gaussian_blur,
                                   intensity, mirror, rotation_matrix, simulate_lowres, spatial, spatial_params)

from .conftest import REF_DIR

SEED = 20260
ALPHA = 1e-3  # fixed seeds: a pass (and a rejection) is reproducible
CHANGE = 0.05  # the planted deviation: 5 % of a range's width, or a probability times 1.05
N_RANGE = 1000  # p = 1 draws: a 5 % wider range puts ~25 draws beyond v1's extreme, p ~ 2^-25
# A probability change of r needs ~2 (1 - f) / f (z / r)^2 draws of an event of frequency f a side: 5 % at z = 5.5
# is 35k-220k draws for f = 0.5-0.1. Low resolution (scipy's spline prefilter, ~2 ms a channel) and v1's spatial
# transform (~0.3 ms a sample even when it does not fire) cannot afford that: 10 %, a quarter of the draws.
PROB_CHANGE = {"noise": 0.05, "blur": 0.05, "brightness": 0.05, "contrast": 0.05, "gamma_inverted": 0.05,
               "gamma": 0.05, "mirror": 0.05, "lowres": 0.10, "rotation": 0.10, "scaling": 0.10}
Z_DESIGN = 5.5  # a planted change's expected z: below ALPHA (Bonferroni, <= 4 events) for 96-99 % of seeds
RAMP_PATCH = (3, 3, 3)  # affine read-out from 27 voxels; offsets stay > 5 voxels inside the 17^3 ramp
GEO_E, GEO_PATCH = 45, (29, 29, 29)  # E - patch even, as in training
CASES = [((0.4, -0.3, 0.2), 1.0), ((0.5, 0.0, 0.0), 1.0), ((0.0, 0.0, -0.45), 1.0), ((0.1, 0.45, -0.35), 0.75),
         ((-0.3, 0.2, 0.5), 1.3), ((0.0, 0.0, 0.0), 0.8)]
BOX_PATCHES = [[128, 128, 128], [16, 64, 64], [48, 160, 160], [80, 192, 160], [40, 56, 24], [7, 9, 11]]
LOWRES_SIZES = list(range(24, 81))  # axis-0 sizes of the 63 long profile probe, zooms 0.38 .. 1.29
DEFAULT = AugmentConfig()
OFF = {f.name: 0.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")
       and not f.name.endswith("_channel")}


def draws_for(freq: float, transform: str) -> int:
    """Draws a side that put the transform's planted relative change of an event of frequency `freq` Z_DESIGN out."""
    return int(math.ceil(2 * (1 - freq) / freq * (Z_DESIGN / PROB_CHANGE[transform]) ** 2 / 1000) * 1000)


def _set(keys, value=None) -> dict:
    """Our config overrides: the named probabilities at `value`, or at v1's (our defaults) if None."""
    return {k: getattr(DEFAULT, k) if value is None else value for k in keys}


# job -> v1 transform (kind), probe, statistic, draws, our config overrides, v1 attributes set (p = 1)
JOBS = {
    "noise_p1": dict(kind="noise", probe="flat", stat="noise_sd", n=N_RANGE, ours=_set(["p_noise"], 1.0),
                     set={"p_per_sample": 1.0}),
    "blur_p1": dict(kind="blur", probe="impulse", stat="blur_sigma", n=N_RANGE,
                    ours=_set(["p_blur", "p_blur_channel"], 1.0), set={"p_per_sample": 1.0, "p_per_channel": 1.0}),
    "brightness_p1": dict(kind="brightness", probe="skewed", stat="mean_ratio", n=N_RANGE,
                          ours=_set(["p_brightness"], 1.0), set={"p_per_sample": 1.0}),
    "contrast_p1": dict(kind="contrast", probe="spread", stat="contrast_factor", n=N_RANGE,
                        ours=_set(["p_contrast"], 1.0), set={"p_per_sample": 1.0}),
    "lowres_p1": dict(kind="lowres", probe="profile", stat="lowres_size", n=N_RANGE,
                      ours=_set(["p_lowres", "p_lowres_channel"], 1.0),
                      set={"p_per_sample": 1.0, "p_per_channel": 1.0}),
    "gamma_inverted_p1": dict(kind="gamma_inverted", probe="skewed", stat="gamma_exponent_inverted", n=N_RANGE,
                              ours=_set(["p_gamma_inverted"], 1.0), set={"p_per_sample": 1.0}),
    "gamma_p1": dict(kind="gamma", probe="skewed", stat="gamma_exponent", n=N_RANGE, ours=_set(["p_gamma"], 1.0),
                     set={"p_per_sample": 1.0}),
    "rotation_p1": dict(kind="rotation", probe="ramp", stat="angles", n=N_RANGE, ours=_set(["p_rotation"], 1.0),
                        set={"p_rot_per_sample": 1.0}),
    "scaling_p1": dict(kind="scaling", probe="ramp", stat="scale", n=3 * N_RANGE, ours=_set(["p_scale"], 1.0),
                       set={"p_scale_per_sample": 1.0}),  # 3x: KS then sees a plain U(0.7, 1.4) (old rule) at p < 1e-4
    # v1's probabilities; draws from the frequency of the event a planted change of p_per_sample moves
    "noise": dict(kind="noise", probe="tiny", stat="changed", n=draws_for(0.1, "noise"), ours=_set(["p_noise"])),
    "blur": dict(kind="blur", probe="tiny", stat="changed", n=draws_for(0.2 * 0.75, "blur"), ours=_set(["p_blur"])),
    "brightness": dict(kind="brightness", probe="tiny", stat="changed", n=draws_for(0.15, "brightness"),
                       ours=_set(["p_brightness"])),
    "contrast": dict(kind="contrast", probe="tiny", stat="changed", n=draws_for(0.15, "contrast"),
                     ours=_set(["p_contrast"])),
    "lowres": dict(kind="lowres", probe="profile_short", stat="changed", n=draws_for(0.18, "lowres"),
                   ours=_set(["p_lowres"])),  # zooms above 15.5 / 16 leave the 16 long probe as it was
    "gamma_inverted": dict(kind="gamma_inverted", probe="tiny", stat="changed", n=draws_for(0.1, "gamma_inverted"),
                           ours=_set(["p_gamma_inverted"])),
    "gamma": dict(kind="gamma", probe="tiny", stat="changed", n=draws_for(0.3, "gamma"), ours=_set(["p_gamma"])),
    "spatial": dict(kind="spatial", probe="ramp1", stat="spatial_fired", n=draws_for(0.2, "rotation"),
                    ours=_set(["p_rotation", "p_scale"])),
    "mirror": dict(kind="mirror", probe="arange", stat="flip_axes", n=draws_for(0.5, "mirror"),
                   ours=_set(["p_mirror"])),
}
# transform -> (p = 1 job, our range field); mirror has no range (v1 flips each axis with p 0.5)
RANGES = {"noise": ("noise_p1", "noise_sigma"), "blur": ("blur_p1", "blur_sigma"),
          "brightness": ("brightness_p1", "brightness"), "contrast": ("contrast_p1", "contrast"),
          "lowres": ("lowres_p1", "lowres_zoom"), "gamma_inverted": ("gamma_inverted_p1", "gamma"),
          "gamma": ("gamma_p1", "gamma"), "rotation": ("rotation_p1", "rotation_deg"),
          "scaling": ("scaling_p1", "scale")}
# transform -> (v1-probability job, our probability fields)
PROBS = {"noise": ("noise", ["p_noise"]), "blur": ("blur", ["p_blur", "p_blur_channel"]),
         "brightness": ("brightness", ["p_brightness"]), "contrast": ("contrast", ["p_contrast"]),
         "lowres": ("lowres", ["p_lowres", "p_lowres_channel"]),
         "gamma_inverted": ("gamma_inverted", ["p_gamma_inverted"]), "gamma": ("gamma", ["p_gamma"]),
         "mirror": ("mirror", ["p_mirror"]), "rotation": ("spatial", ["p_rotation"]),
         "scaling": ("spatial", ["p_scale"])}


def planted_ranges(field: str) -> dict:
    """The range `field` changed by CHANGE of its width: widened (both ends out) and shifted (both ends up)."""
    v = getattr(DEFAULT, field)
    if field == "rotation_deg":  # symmetric about 0: it can only widen or narrow
        return {"widened": v * (1 + CHANGE), "narrowed": v * (1 - CHANGE)}
    lo, hi = v
    w = hi - lo
    widened = (lo, hi + CHANGE * w) if lo == 0 else (lo - CHANGE / 2 * w, hi + CHANGE / 2 * w)  # a sigma stays >= 0
    return {"widened": widened, "shifted": (lo + CHANGE * w, hi + CHANGE * w)}


RANGE_PLANTS = [(t, k) for t, (_, field) in RANGES.items() for k in planted_ranges(field)]
PROB_PLANTS = [(t, f) for t, (_, fields) in PROBS.items() for f in fields]


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


def _spread(seed: int, scale: float, offset: float) -> np.ndarray:
    """(4, 4, 4): 62 distinct values in +-scale, two at +-4 scale: a contrast factor <= 1.3 clips only those two."""
    inner = np.random.RandomState(seed).permutation(np.linspace(-1, 1, 62))
    return (np.concatenate([inner, [-4.0, 4.0]]).reshape(4, 4, 4) * scale + offset).astype(np.float32)


def _profile(length: int, width: int, seed: int) -> np.ndarray:
    """(2, length, width, width): distinct values along axis 0, constant across 1 and 2 (only axis 0's zoom shows)."""
    p = np.random.RandomState(seed).randn(2, length, 1, 1).astype(np.float32)
    return np.broadcast_to(p, (2, length, width, width)).copy()


def _ramp(e: int) -> np.ndarray:
    """(3, e, e, e): each channel the offset from the centre along one axis (the affine map reads back exactly)."""
    return np.stack(np.meshgrid(*[np.arange(e) - (e - 1) / 2] * 3, indexing="ij")).astype(np.float32)


def make_probes() -> dict:
    """Small probe volumes (C, *S), each made for its statistic."""
    impulse = np.zeros((2, 9, 9, 9), np.float32)
    impulse[:, 4, 4, 4] = [1.0, 2.0]  # kernel radius <= 4: no reflection reaches the centre's neighbours
    return {
        "smooth": np.stack([smooth_field((12, 16, 16), 2, 1), smooth_field((12, 16, 16), 2, 2)]) + 1.5,
        "flat": np.zeros((2, 16, 16, 32), np.float32),  # 8192 voxels a channel: sigma read to 0.8 %
        "tiny": np.random.RandomState(3).randn(2, 3, 3, 3).astype(np.float32),
        "impulse": impulse,
        "skewed": np.exp(0.6 * np.stack([smooth_field((4, 4, 4), 1.0, 4), smooth_field((4, 4, 4), 1.0, 5)])),
        "spread": np.stack([_spread(6, 1.0, 0.0), _spread(7, 2.0, 1.0)]),
        # odd length: round(63 * 0.5) sits on a rounding boundary, so any zoom below 0.5 shows as a smaller size;
        # width 2 as zooms below 0.5 (planted) would round a width of 1 to 0
        "profile": _profile(63, 2, 8),
        "profile_short": _profile(16, 1, 9),  # scipy's spline prefilter pads every axis by 12: keep them short
        "arange": np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4),
        "ramp": _ramp(17),
        "ramp1": (_ramp(13) * np.array([1.0, 2.0, 3.0]).reshape(3, 1, 1, 1)).sum(0, keepdims=True),  # one channel
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


pytestmark = pytest.mark.usefixtures("one_thread")  # one torch thread (tests/parity/conftest.py)


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
        jobs = {k: {kk: j[kk] for kk in ("kind", "probe", "stat", "n", "set") if kk in j} for k, j in JOBS.items()}
        res = run_ref("ref_augment.py", jobs=jobs, probes={k: str(v) for k, v in paths.items()}, seed=SEED,
                      ramp_patch=list(RAMP_PATCH), lowres_sizes=LOWRES_SIZES, geo=tmp_path / "geo.npy",
                      geo_patch=list(GEO_PATCH), cases=[[list(a), s] for a, s in CASES], box_patches=BOX_PATCHES)
        _CACHE.update(ref=res, probes=probes, tables={"lowres_size": {
            "sizes": res.array("lowres_table_sizes"), "profiles": res.array("lowres_table_profiles")}})
        print("v1 seconds per job:", res["seconds"])
    return _CACHE["ref"]


def _apply(kind: str, img: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Our transform of one job on a batch of probes (the other transforms are off in cfg)."""
    lab = torch.zeros(img.shape[0], *img.shape[2:], dtype=torch.long)
    if kind in ("rotation", "scaling", "spatial"):
        return spatial(img, lab, RAMP_PATCH, spatial_params(img.shape[0], cfg, gen), num_classes=1)[0]
    if kind == "mirror":
        return mirror(img, lab, cfg, gen)[0]
    return intensity(img, cfg, gen)


def ours(job: str, **change) -> np.ndarray:
    """Our statistic of one job's draws, (n, K); `change` overrides config fields (the planted deviations)."""
    key = (job, tuple(sorted(change.items())))
    if key not in _CACHE:
        spec = JOBS[job]
        cfg = dataclasses.replace(AugmentConfig(**{**OFF, **spec["ours"]}), **change)
        probe = _CACHE["probes"][spec["probe"]]
        seed = SEED + 1000 * list(JOBS).index(job) + zlib.crc32(repr(key[1]).encode()) % 1000  # planted: afresh
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the noise fields
        chunk, out = max(1, min(spec["n"], 2_000_000 // probe.size)), []
        for start in range(0, spec["n"], chunk):
            img = torch.from_numpy(probe).expand(min(chunk, spec["n"] - start), *probe.shape).clone()
            y = _apply(spec["kind"], img, cfg, gen).numpy()
            out.append(SHARED.summarise(spec["stat"], probe, y, _CACHE["tables"]))
        _CACHE[key] = np.concatenate(out)
    return _CACHE[key]


# ---------------------------------------------------------------- comparisons


def _run_prob(k: int, n_own: int, n_all: int) -> float:
    """P(the k most extreme of n_all exchangeable values all come from one given sample of n_own)."""
    return math.exp(sum(math.log((n_own - i) / (n_all - i)) for i in range(k))) if k <= n_own else 0.0


def tail_run_p(a: np.ndarray, b: np.ndarray) -> float:
    """Same extremes? At each end, how many of one sample lie beyond the other's extreme (exact under exchangeability).

    Ties (discrete read-outs) only shorten the runs, so the p-value stays valid (conservative).
    """
    ends = []
    for x, y in ((a, b), (-a, -b)):  # low end, high end
        ka, kb = int((x < y.min()).sum()), int((y < x.min()).sum())
        n = len(a) + len(b)
        ends.append(_run_prob(max(ka, kb), len(a), n) + _run_prob(max(ka, kb), len(b), n) if max(ka, kb) else 1.0)
    return min(1.0, 2 * min(ends))


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample KS p-value."""
    return float(stats.ks_2samp(a, b, method="asymp").pvalue)


def range_tests(mine: np.ndarray, theirs: np.ndarray) -> dict:
    """p-values of read-back parameters (N, K): extremes and KS per column, KS of neighbouring columns' difference."""
    assert mine.shape[1] == theirs.shape[1] and not np.isnan(mine).any() and not np.isnan(theirs).any()
    p = {}
    for c in range(mine.shape[1]):  # each channel (or angle axis): drawn independently, so each column is iid
        p[f"col {c} extremes"] = tail_run_p(mine[:, c], theirs[:, c])
        p[f"col {c} KS"] = _ks(mine[:, c], theirs[:, c])
    for c in range(mine.shape[1] - 1):  # drawn together or apart: the difference tells
        p[f"col {c}-{c + 1} KS"] = _ks(mine[:, c] - mine[:, c + 1], theirs[:, c] - theirs[:, c + 1])
    return p


def events(job: str, fired: np.ndarray) -> dict:
    """Boolean events of a job's (N, K) fired flags: per column (axes; rotation, scale) and all of them, or for
    channels: any and all (per-channel probabilities), or fired (one draw per sample: both channels or none)."""
    f = fired > 0.5
    if job in ("spatial", "mirror"):
        return {**{f"col {c}": f[:, c] for c in range(f.shape[1])}, "all": f.all(1)}
    if job in ("blur", "lowres"):
        return {"any": f.any(1), "all": f.all(1)}
    return {"fired": f.any(1)}


def proportion_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided two-proportion z-test of boolean samples."""
    pooled = (a.sum() + b.sum()) / (len(a) + len(b))
    se = math.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    return 1.0 if se == 0 else float(2 * stats.norm.sf(abs(a.mean() - b.mean()) / se))


def probability_tests(job: str, mine: np.ndarray, theirs: np.ndarray) -> dict:
    """p-values of the firing events of one v1-probability job."""
    assert not np.isnan(mine).any() and not np.isnan(theirs).any()
    if job not in ("spatial", "mirror", "blur", "lowres"):  # v1 draws once per sample: so must we (a draw within
        for f in (mine, theirs):  # ~1e-6 of the identity reads as unchanged, so rarely one channel seems not to fire)
            assert (f != f[:, :1]).any(1).mean() < 1e-4, (job, (f != f[:, :1]).any(1).mean())
    ea, eb = events(job, mine), events(job, theirs)
    return {k: proportion_p(ea[k], eb[k]) for k in ea}


def combined(p: dict) -> float:
    """Bonferroni over a comparison's sub-tests: one p-value for the whole comparison."""
    return min(1.0, len(p) * min(p.values()))


def _fmt(p: dict) -> str:
    """Sub-test p-values, short."""
    return ", ".join(f"{k} {v:.2g}" for k, v in p.items())


# ---------------------------------------------------------------- distributions and planted deviations


@pytest.mark.parametrize("transform", list(RANGES))
def test_parameter_range_is_v1s(ref, transform):
    """p = 1: the read-back parameter's distribution (ends and shape) is v1's."""
    job = RANGES[transform][0]
    mine, theirs = ours(job), ref.array(job)
    p = range_tests(mine, theirs)
    print(f"{transform}: range comparison p {combined(p):.3g} ({_fmt(p)}); ours {mine.min():.4f}..{mine.max():.4f}, "
          f"v1 {theirs.min():.4f}..{theirs.max():.4f}")
    assert combined(p) > ALPHA, (transform, p)


@pytest.mark.parametrize("transform,variant", RANGE_PLANTS)
def test_range_changed_by_5_percent_is_rejected(ref, transform, variant):
    """The same comparison, our range widened / shifted / narrowed by 5 % of its width: rejected."""
    job, field = RANGES[transform]
    value = planted_ranges(field)[variant]
    p = range_tests(ours(job, **{field: value}), ref.array(job))
    print(f"{transform} {field}={value}: p {combined(p):.3g} ({_fmt(p)})")
    assert combined(p) < ALPHA, (transform, variant, p)


@pytest.mark.parametrize("transform", list(PROBS))
def test_firing_probability_is_v1s(ref, transform):
    """v1's probabilities: how often the transform fires (per sample, per channel or axis) is v1's."""
    job = PROBS[transform][0]
    mine, theirs = ours(job), ref.array(job)
    p = probability_tests(job, mine, theirs)
    print(f"{transform}: {len(mine)} draws, fired ours {mine.mean(0).round(4)}, v1 {theirs.mean(0).round(4)}; "
          f"p {combined(p):.3g} ({_fmt(p)})")
    assert combined(p) > ALPHA, (transform, p)


@pytest.mark.parametrize("transform,field", PROB_PLANTS)
def test_probability_change_is_rejected(ref, transform, field):
    """The same comparison, one of our probabilities times 1 + PROB_CHANGE (1.05 or 1.1): rejected."""
    job = PROBS[transform][0]
    value = getattr(DEFAULT, field) * (1 + PROB_CHANGE[transform])
    mine = ours(job, **{field: value})
    p = probability_tests(job, mine, ref.array(job))
    print(f"{transform} {field}={value:.4f}: fired ours {mine.mean(0).round(4)}; p {combined(p):.3g} ({_fmt(p)})")
    assert combined(p) < ALPHA, (transform, field, p)


def test_old_rules_would_fail(ref):
    """The range comparisons reject what we had before: sqrt of U(0, 0.1) as noise sigma, a plain U(0.7, 1.4) scale."""
    rng = np.random.RandomState(SEED)
    probe = _CACHE["probes"]["flat"]
    sd = np.sqrt(rng.uniform(0, 0.1, (N_RANGE, 1, 1, 1, 1))).astype(np.float32)
    noisy = (probe + rng.randn(100, *probe.shape).astype(np.float32) * sd[i:i + 100] for i in range(0, N_RANGE, 100))
    mine = np.concatenate([SHARED.stat_noise_sd(probe, y) for y in noisy])
    p_noise = combined(range_tests(mine, ref.array("noise_p1")))
    p_scale = combined(range_tests(rng.uniform(0.7, 1.4, (3 * N_RANGE, 1)), ref.array("scaling_p1")))
    print(f"old noise rule p = {p_noise:.2g}; old scale rule p = {p_scale:.2g}")
    assert p_noise < 1e-6 and p_scale < 1e-4


# ---------------------------------------------------------------- order and parameters


# which transform each config field belongs to; "gamma" (both gammas' range) and "dummy_2d" (a mode) belong to none
OWNER = {"p_rotation": "rotation", "rotation_deg": "rotation", "rotation_deg_2d": "rotation",
         "p_scale": "scaling", "scale": "scaling", "p_noise": "noise", "noise_sigma": "noise",
         "p_blur": "blur", "p_blur_channel": "blur", "blur_sigma": "blur",
         "p_brightness": "brightness", "brightness": "brightness", "p_contrast": "contrast", "contrast": "contrast",
         "p_lowres": "lowres", "p_lowres_channel": "lowres", "lowres_zoom": "lowres",
         "p_gamma_inverted": "gamma_inverted", "p_gamma": "gamma", "p_mirror": "mirror"}
# v1's transform classes (get_moreDA_augmentation's list) -> ours; SpatialTransform rotates, then scales
V1_NAMES = {"SpatialTransform": ["rotation", "scaling"], "GaussianNoiseTransform": ["noise"],
            "GaussianBlurTransform": ["blur"], "BrightnessMultiplicativeTransform": ["brightness"],
            "ContrastAugmentationTransform": ["contrast"], "SimulateLowResolutionTransform": ["lowres"],
            "GammaTransform(inverted)": ["gamma_inverted"], "GammaTransform": ["gamma"], "MirrorTransform": ["mirror"]}
V1_NOT_AUGMENTATION = {"SegChannelSelectionTransform", "MaskTransform", "RemoveLabelTransform", "RenameTransform",
                       "NumpyToTensor", "DownsampleSegForDSTransform2", "DownsampleSegForDSTransform3"}


def kit_order(monkeypatch) -> tuple[list, list]:
    """Our transforms in the order one augment_batch call (every p 1) reads their settings and applies them.

    Settings read: every transform, the inline ones too (noise, brightness); functions applied: those with one.
    """
    reads, applied = [], []

    class Recording(AugmentConfig):
        """The config, logging which transform's field is read."""

        def __getattribute__(self, name: str):
            if name in OWNER:
                reads.append(OWNER[name])
            return super().__getattribute__(name)

    def logged(fn, name):
        """fn, logging its transform's name (or name(kwargs)) on each call."""
        def wrapper(*args, **kwargs):
            applied.append(name(kwargs) if callable(name) else name)
            return fn(*args, **kwargs)
        return wrapper

    for fn, name in ((aug.spatial, "spatial"), (aug.gaussian_blur, "blur"), (aug._contrast, "contrast"),
                     (aug.simulate_lowres, "lowres"), (aug.mirror, "mirror"),
                     (aug.gamma, lambda kw: "gamma_inverted" if kw.get("invert") else "gamma")):
        monkeypatch.setattr(aug, fn.__name__, logged(fn, name))
    cfg = Recording(**{k: 1.0 for k in OFF}, p_blur_channel=1.0, p_lowres_channel=1.0)
    img = torch.from_numpy(make_probes()["smooth"][:, :9, :9, :9]).expand(2, 2, 9, 9, 9).clone()
    augment_batch(img, torch.zeros(2, 9, 9, 9, dtype=torch.long), (5, 5, 5), 1, cfg, torch.Generator().manual_seed(0))
    return list(dict.fromkeys(reads)), list(dict.fromkeys(applied))


def test_transform_order_is_v1s(ref, monkeypatch):
    """The kit's pipeline, as one augment_batch call runs it, against v1's transform list: the same order."""
    assert set(OWNER) | {"gamma", "dummy_2d"} == {f.name for f in dataclasses.fields(AugmentConfig)}
    reads, applied = kit_order(monkeypatch)
    # each function the kit applies comes in the order its settings were read (spatial: rotation and scaling)
    assert [t for t in reads if t in applied or t in ("rotation", "scaling")] == \
        [t for a in applied for t in (["rotation", "scaling"] if a == "spatial" else [a])]
    unknown = set(ref["order"]) - set(V1_NAMES) - V1_NOT_AUGMENTATION
    assert not unknown, unknown
    v1 = [t for name in ref["order"] for t in V1_NAMES.get(name, [])]
    print("kit:", reads, "\nv1: ", v1)
    assert reads == v1


def test_parameters_are_v1s(ref):
    """v1's transform list (the one sampled from above): its parameters are our defaults'."""
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
    c = torch.stack([_contrast(v, 1.2) for v in x])  # the kit's own function
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
