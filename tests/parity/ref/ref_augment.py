"""v1.6.4's moreDA transforms (batchgenerators 0.21) on probe volumes, for tests/parity/test_augment_parity.py.

The transforms are the very objects `get_moreDA_augmentation` builds after
`nnUNetTrainerV2.setup_DA_params` (3D, no dummy 2D), each applied alone, either as built
(v1's probabilities) or forced to fire (p = 1). The statistic functions at the top need
numpy only: the kit's test imports them, so both sides summarise their draws with the
same code. Most read the transform's random parameter back exactly from one draw.
"""
import numpy as np

# ---------------------------------------------------------------- statistics (numpy only, shared)


def _per_channel(y: np.ndarray) -> np.ndarray:
    """(N, C, *S) -> (N, C, V)."""
    return y.reshape(y.shape[0], y.shape[1], -1).astype(np.float64)


def stat_changed(x, y):
    """1 where a channel differs from the probe, else 0: which channels the transform touched."""
    d = np.abs(_per_channel(y) - _per_channel(x[None]))
    return (d.max(-1) > 1e-6 * (1 + np.abs(x).max())).astype(np.float64)


def stat_noise_sd(x, y):
    """std of the added noise per channel: the noise sigma, to about 1 / sqrt(2 V) of itself."""
    return _per_channel(y - x[None]).std(-1)


def stat_blur_sigma(x, y):
    """Blur sigma per channel from an impulse probe: neighbour / centre = exp(-1 / (2 sigma^2)); 0 if not blurred."""
    centre = np.unravel_index(np.argmax(x[0]), x.shape[1:])
    nb = (centre[0], centre[1], centre[2] + 1)
    r = y[(slice(None), slice(None)) + nb].astype(np.float64) / y[(slice(None), slice(None)) + centre]
    return np.where(r > 0, np.sqrt(-0.5 / np.log(np.clip(r, 1e-300, 1 - 1e-15))), 0.0)


def stat_mean_ratio(x, y):
    """mean(out) / mean(in) per channel: the brightness multiplier."""
    return _per_channel(y).mean(-1) / _per_channel(x[None]).mean(-1)


def stat_contrast_factor(x, y):
    """Contrast factor per channel: slope of out on in over the voxels clipping cannot reach (the inner half)."""
    xs, ys = _per_channel(x[None]), _per_channel(y)
    dev = np.abs(xs - xs.mean(-1, keepdims=True))
    w = (dev < 0.5 * dev.max(-1, keepdims=True)).astype(np.float64)
    xm = (w * xs).sum(-1, keepdims=True) / w.sum(-1, keepdims=True)
    ym = (w * ys).sum(-1, keepdims=True) / w.sum(-1, keepdims=True)
    return (w * (xs - xm) * (ys - ym)).sum(-1) / (w * (xs - xm) ** 2).sum(-1)


def _gamma_exponent(x, y, inverted: bool):
    """The exponent g of out = a u^g + b, u the probe rescaled to [0, 1] (from its max down if inverted)."""
    xs, ys = _per_channel(x[None])[0], _per_channel(y)
    u = xs.max(-1, keepdims=True) - xs if inverted else xs - xs.min(-1, keepdims=True)
    u = u / u.max(-1, keepdims=True)
    c = np.arange(len(u))
    lo, hi = ys[:, c, np.argmin(u, -1)][..., None], ys[:, c, np.argmax(u, -1)][..., None]
    rho = (ys - lo) / (hi - lo)  # = u^g: the offset and scale of the re-normalisation cancel
    sel = (u > 0.05) & (u < 0.95)
    lu = np.where(sel, np.log(np.where(sel, u, 1)), 0.0)
    lr = np.where(sel, np.log(np.clip(np.abs(rho), 1e-300, None)), 0.0)
    return (lu * lr).sum(-1) / (lu * lu).sum(-1)


def stat_gamma_exponent(x, y):
    """Gamma exponent per channel (not inverted)."""
    return _gamma_exponent(x, y, False)


def stat_gamma_exponent_inverted(x, y):
    """Gamma exponent per channel of the inverted gamma."""
    return _gamma_exponent(x, y, True)


def stat_lowres_size(x, y, table):
    """Axis-0 size each channel was resampled through, by matching its profile to v1's outputs per size (`table`).

    The probe varies along axis 0 only, so the output depends on round(zoom * length) there and on nothing
    else; NaN where no size of the table matches to 1e-4 (a draw neither side can produce).
    """
    sizes, prof = table["sizes"], table["profiles"]  # (M,), (M, C, L)
    p = y[:, :, :, 0, 0].astype(np.float64)  # (N, C, L)
    d2 = (p ** 2).sum(-1)[..., None] + (prof ** 2).sum(-1).T[None] - 2 * np.einsum("ncl,mcl->ncm", p, prof)
    best = np.argmin(d2, -1)
    rms = np.sqrt(np.clip(np.take_along_axis(d2, best[..., None], -1)[..., 0], 0, None) / p.shape[-1])
    return np.where(rms < 1e-4, sizes[best].astype(np.float64), np.nan)


def stat_flip_axes(x, y):
    """Which axes (0, 1, 2) were flipped, 1 or 0, of a probe with distinct values; NaN if no flip matches."""
    out = np.full((y.shape[0], 3), np.nan)
    for code in range(8):
        axes = [a for a in range(3) if code >> a & 1]
        ref = np.flip(x, [a + 1 for a in axes]) if axes else x
        hit = np.all(y.reshape(len(y), -1) == ref.reshape(1, -1), axis=1)
        out[hit] = [code >> a & 1 for a in range(3)]
    return out


def fit_affine(y: np.ndarray) -> np.ndarray:
    """(N, C, 3) gradients G with out_c = G[c] . offset + t_c, from (N, C, *P) outputs of linear probes."""
    p = y.shape[2:]
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in p], indexing="ij"), -1).reshape(-1, 3)
    design = np.concatenate([grid, np.ones((len(grid), 1))], 1)
    coef = np.linalg.pinv(design) @ y.reshape(*y.shape[:2], -1).astype(np.float64).transpose(0, 2, 1)  # (N, 4, C)
    return coef[:, :3].transpose(0, 2, 1)


def stat_angles(x, y):
    """Angles (rad) about array axes 0, 1, 2 in batchgenerators' convention: input = s (Rx Ry Rz)^T output."""
    m = fit_affine(y)
    r = m.transpose(0, 2, 1) / np.cbrt(np.linalg.det(m))[:, None, None]
    a0 = np.arctan2(-r[:, 1, 2], r[:, 2, 2])
    a1 = np.arcsin(np.clip(r[:, 0, 2], -1, 1))
    a2 = np.arctan2(-r[:, 0, 1], r[:, 0, 0])
    return np.round(np.stack([a0, a1, a2], 1), 5)  # untouched samples: exactly 0 on both sides


def stat_scale(x, y):
    """Isotropic scale factor (cube root of the determinant)."""
    return np.round(np.cbrt(np.linalg.det(fit_affine(y))), 5)[:, None]


def stat_spatial_fired(x, y):
    """(rotated, scaled) per draw, 1 or 0, of a one-channel linear probe: its gradient turned by over 1e-3 rad, its
    length changed by over 1e-3 (v1's cubic read-out errs by < 2e-4 on the 13^3 probe)."""
    crop = tuple(slice((e - q) // 2, (e - q) // 2 + q) for e, q in zip(x.shape[1:], y.shape[2:]))
    g = fit_affine(x[(slice(None),) + crop][None])[0, 0]  # the untouched gradient
    grad = fit_affine(y)[:, 0]
    turn = np.arctan2(np.linalg.norm(np.cross(grad, g), axis=1), grad @ g)
    return np.stack([turn > 1e-3, np.abs(np.linalg.norm(grad, axis=1) / np.linalg.norm(g) - 1) > 1e-3],
                    1).astype(np.float64)


STATS = {k[5:]: v for k, v in dict(globals()).items() if k.startswith("stat_")}


def summarise(stat: str, x: np.ndarray, y: np.ndarray, tables: dict) -> np.ndarray:
    """One statistic of (N, C, *S) outputs of the (C, *S) probe x: (N, K)."""
    return STATS[stat](x, y, tables[stat]) if stat in tables else STATS[stat](x, y)


# ---------------------------------------------------------------- the reference run


def v1_transforms(patch, dummy_2d=False):
    """The training transforms v1.6.4 builds (setup_DA_params of nnUNetTrainerV2, then get_moreDA_augmentation)."""
    from nnunet.training.data_augmentation.default_data_augmentation import get_moreDA_augmentation

    t = v1_trainer(patch, dummy_2d)
    tr, _ = get_moreDA_augmentation(None, None, t.data_aug_params["patch_size_for_spatialtransform"],
                                    t.data_aug_params, pin_memory=False)
    return tr.transform.transforms


_PRISTINE = []


def v1_trainer(patch, dummy_2d=False):
    """A bare nnUNetTrainerV2 after its setup_DA_params, on nnU-Net's parameter dicts as a fresh process has them."""
    import copy
    from collections import OrderedDict

    from nnunet.training.data_augmentation import default_data_augmentation as dda
    from nnunet.training.network_training.nnUNetTrainerV2 import nnUNetTrainerV2

    dicts = (dda.default_3D_augmentation_params, dda.default_2D_augmentation_params)
    if not _PRISTINE:
        _PRISTINE.extend(copy.deepcopy(dicts))
    for d, pristine in zip(dicts, _PRISTINE):  # setup_DA_params edits them in place (once per process in v1)
        d.clear()
        d.update(copy.deepcopy(pristine))
    t = nnUNetTrainerV2.__new__(nnUNetTrainerV2)  # only the attributes setup_DA_params reads
    t.threeD, t.do_dummy_2D_aug, t.use_mask_for_norm = True, dummy_2d, OrderedDict({0: False})
    t.net_num_pool_op_kernel_sizes, t.patch_size = [[2, 2, 2]], np.array(patch)
    t.print_to_log_file = lambda *args, **kwargs: None
    nnUNetTrainerV2.setup_DA_params(t)
    return t


def pick(transforms, kind):
    """A copy of the transform a job runs alone, with v1's parameters ("spatial": rotation and scaling as built)."""
    import copy

    cls = {"noise": "GaussianNoiseTransform", "blur": "GaussianBlurTransform",
           "brightness": "BrightnessMultiplicativeTransform", "contrast": "ContrastAugmentationTransform",
           "lowres": "SimulateLowResolutionTransform", "gamma_inverted": "GammaTransform", "gamma": "GammaTransform",
           "mirror": "MirrorTransform", "rotation": "SpatialTransform", "scaling": "SpatialTransform",
           "spatial": "SpatialTransform"}[kind]
    t = [t for t in transforms if type(t).__name__ == cls]
    if cls == "GammaTransform":
        t = [g for g in t if g.invert_image == (kind == "gamma_inverted")]
    t = copy.copy(t[0])
    if kind == "rotation":
        t.do_scale = False
    if kind == "scaling":
        t.do_rotation = False
    return t


def run_job(transform, probe: np.ndarray, n: int, stat: str, tables: dict) -> np.ndarray:
    """n independent draws of one transform on copies of the (C, *S) probe, summarised chunk by chunk: (n, K)."""
    chunk = max(1, min(n, 2_000_000 // probe.size))  # bounded memory whatever the probe
    out = []
    for start in range(0, n, chunk):
        data = np.repeat(probe[None].astype(np.float32), min(chunk, n - start), 0)
        y = transform(data=data)["data"].astype(np.float32)  # no seg: none of these transforms needs one
        out.append(summarise(stat, probe, y, tables))
    return np.concatenate(out)


def lowres_table(transforms, probe: np.ndarray, sizes) -> dict:
    """v1's low-resolution output of the probe for each axis-0 size it may be resampled through."""
    from batchgenerators.augmentations.resample_augmentations import augment_linear_downsampling_scipy

    t = pick(transforms, "lowres")
    prof = []
    for m in sizes:
        z = m / probe.shape[1]  # v1 resamples to round(z * length) == m
        y = augment_linear_downsampling_scipy(probe.astype(np.float32).copy(), (z, z), per_channel=True,
                                              p_per_channel=1, order_downsample=t.order_downsample,
                                              order_upsample=t.order_upsample)
        prof.append(y[:, :, 0, 0])
    return {"sizes": np.asarray(sizes), "profiles": np.asarray(prof, np.float64)}


def v1_spatial(img, seg, patch, angles, scale):
    """augment_spatial's own steps with a fixed angle triple and scale (image cubic, label linear per class)."""
    from batchgenerators.augmentations.utils import (create_zero_centered_coordinate_mesh, interpolate_img,
                                                     rotate_coords_3d, scale_coords)

    coords = create_zero_centered_coordinate_mesh(patch)
    coords = scale_coords(rotate_coords_3d(coords, *angles), scale)
    for d in range(3):
        coords[d] += int(np.round(img.shape[d] / 2.0))  # augment_spatial's centre (random_crop False)
    return (interpolate_img(img, coords, 3, "constant", cval=0),
            interpolate_img(seg, coords, 1, "constant", cval=-1, is_seg=True))


def exact_ops(a, probe, geo_img, geo_lab, cases, patch):
    """Fixed-parameter outputs of the intensity functions and of the spatial map."""
    from batchgenerators.augmentations.color_augmentations import augment_contrast, augment_gamma
    from batchgenerators.augmentations.noise_augmentations import augment_gaussian_blur
    from batchgenerators.augmentations.resample_augmentations import augment_linear_downsampling_scipy
    from batchgenerators.transforms.spatial_transforms import SpatialTransform

    import _ref

    p = probe.astype(np.float32)
    _ref.save_array(a, "exact_blur", augment_gaussian_blur(p.copy(), (0.7, 0.7), True, 1))
    _ref.save_array(a, "exact_lowres", augment_linear_downsampling_scipy(
        p.copy(), (0.6, 0.6), per_channel=True, p_per_channel=1, order_downsample=0, order_upsample=3))
    _ref.save_array(a, "exact_contrast", augment_contrast(p.copy(), (1.2, 1.2), True, True))
    for invert in (False, True):
        _ref.save_array(a, f"exact_gamma_{int(invert)}", augment_gamma(p.copy(), (1.3, 1.3), invert, per_channel=True,
                                                                        retain_stats=True))
    for i, (angles, scale) in enumerate(cases):
        img, lab = v1_spatial(geo_img, geo_lab, patch, angles, scale)
        _ref.save_array(a, f"geo_img_{i}", img)
        _ref.save_array(a, f"geo_lab_{i}", lab)
    # the same map through SpatialTransform itself (fixed ranges, rotation only): our steps are its steps
    angles = cases[0][0]
    st = SpatialTransform(patch, None, False, do_rotation=True, angle_x=(angles[0],) * 2, angle_y=(angles[1],) * 2,
                          angle_z=(angles[2],) * 2, do_scale=False, border_mode_data="constant", order_data=3,
                          border_mode_seg="constant", border_cval_seg=-1, order_seg=1, random_crop=False)
    res = st(data=geo_img[None, None].astype(np.float32), seg=geo_lab[None, None].astype(np.float32))
    img0, lab0 = v1_spatial(geo_img, geo_lab, patch, angles, 1.0)
    return {"spatial_transform_vs_steps": float(np.abs(res["data"][0, 0] - img0).max()
                                                 + np.abs(res["seg"][0, 0] - lab0).max())}


def main():
    import random
    import time

    import _ref

    a = _ref.args()
    transforms = v1_transforms(a["ramp_patch"])
    params = lambda ts: {type(t).__name__ + str(i): {k: v for k, v in vars(t).items()
                                                     if isinstance(v, (int, float, tuple, list, bool, str, np.ndarray))}
                         for i, t in enumerate(ts)}
    result = {"order": [type(t).__name__ + ("(inverted)" if getattr(t, "invert_image", False) else "")
                        for t in transforms],
              "params": params(transforms),
              "params_dummy_2d": params(v1_transforms(a["ramp_patch"], dummy_2d=True)),
              "boxes": [[v1_trainer(p, d).basic_generator_patch_size.tolist() for d in (False, True)]
                        for p in a["box_patches"]]}
    probes = {k: np.load(v) for k, v in a["probes"].items()}
    tables = {"lowres_size": lowres_table(transforms, probes["profile"], a["lowres_sizes"])}
    for name, arr in tables["lowres_size"].items():
        _ref.save_array(a, f"lowres_table_{name}", arr)
    result["seconds"] = {}
    for k, (name, job) in enumerate(a["jobs"].items()):
        start = time.perf_counter()
        np.random.seed(a["seed"] + k)
        random.seed(a["seed"] + k)  # augment_gaussian_noise and get_range_val draw from `random`
        t = pick(transforms, job["kind"])
        for attr, v in job.get("set", {}).items():
            setattr(t, attr, v)
        _ref.save_array(a, name, run_job(t, probes[job["probe"]], job["n"], job["stat"], tables))
        result["seconds"][name] = round(time.perf_counter() - start, 2)
    geo = np.load(a["geo"])
    result.update(exact_ops(a, probes["smooth"], geo[0], geo[1].astype(np.float32), a["cases"], a["geo_patch"]))
    _ref.done(a, result)


if __name__ == "__main__":
    main()
