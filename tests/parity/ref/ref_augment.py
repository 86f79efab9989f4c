"""v1.6.4's moreDA transforms (batchgenerators 0.21) on probe volumes, for tests/parity/test_augment_parity.py.

The transforms are the very objects `get_moreDA_augmentation` builds after
`nnUNetTrainerV2.setup_DA_params` (3D, no dummy 2D), each applied alone. The statistic
functions at the top need numpy only: the kit's test imports them, so both sides
summarise their draws with the same code.
"""
import numpy as np

# ---------------------------------------------------------------- statistics (numpy only, shared)


def _per_channel(y: np.ndarray) -> np.ndarray:
    """(N, C, *S) -> (N, C, V)."""
    return y.reshape(y.shape[0], y.shape[1], -1).astype(np.float64)


def stat_noise_sd(x, y):
    """std of the added noise per channel: pins sigma."""
    return _per_channel(y - x[None]).std(-1)


def stat_var_ratio(x, y):
    """var(out) / var(in) per channel: a checkerboard loses variance with the blur sigma."""
    return _per_channel(y).var(-1) / _per_channel(x[None]).var(-1)


def stat_mean_ratio(x, y):
    """mean(out) / mean(in) per channel: the brightness multiplier."""
    return _per_channel(y).mean(-1) / _per_channel(x[None]).mean(-1)


def stat_std_ratio(x, y):
    """std(out) / std(in) per channel: the contrast factor (after clipping)."""
    return _per_channel(y).std(-1) / _per_channel(x[None]).std(-1)


def stat_hf_ratio(x, y):
    """High-frequency energy kept: mean squared neighbour difference (last axis), out / in, per channel."""
    e = lambda v: (np.diff(v.astype(np.float64), axis=-1) ** 2).reshape(v.shape[0], v.shape[1], -1).mean(-1)
    return e(y) / e(x[None])


def stat_gamma_shape(x, y):
    """(q50 - q10) / (q90 - q10) per channel: invariant to the affine re-normalisation, moved by gamma."""
    q = np.quantile(_per_channel(y), [0.1, 0.5, 0.9], axis=-1)
    return (q[1] - q[0]) / (q[2] - q[0])


def stat_mean(x, y):
    """mean(out) per channel (gamma's retain_stats)."""
    return _per_channel(y).mean(-1)


def stat_flip_code(x, y):
    """Which axes were flipped (bits 1, 2, 4 for axes 0, 1, 2) of a probe with distinct values."""
    codes = np.full(y.shape[0], -1.0)
    for code in range(8):
        axes = [a + 1 for a in range(3) if code >> a & 1]
        ref = np.flip(x, axes) if axes else x
        codes[np.all(y.reshape(len(y), -1) == ref.reshape(1, -1), axis=1)] = code
    return codes[:, None]


def fit_affine(y: np.ndarray) -> np.ndarray:
    """(N, 3, 3) matrices M with out_k = M[k] . offset + t_k, from the ramp probe's (N, 3, *P) outputs."""
    p = y.shape[2:]
    grid = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in p], indexing="ij"), -1).reshape(-1, 3)
    design = np.concatenate([grid, np.ones((len(grid), 1))], 1)
    coef = np.linalg.pinv(design) @ y.reshape(len(y), 3, -1).astype(np.float64).transpose(0, 2, 1)  # (N, 4, 3)
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


STATS = {k[5:]: v for k, v in dict(globals()).items() if k.startswith("stat_")}


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


def pick(transforms, name):
    """The transform a job runs alone, with v1's parameters."""
    import copy

    cls = {"noise": "GaussianNoiseTransform", "blur": "GaussianBlurTransform",
           "brightness": "BrightnessMultiplicativeTransform", "contrast": "ContrastAugmentationTransform",
           "lowres": "SimulateLowResolutionTransform", "gamma_inverted": "GammaTransform", "gamma": "GammaTransform",
           "mirror": "MirrorTransform", "rotation": "SpatialTransform", "scaling": "SpatialTransform"}[name]
    t = [t for t in transforms if type(t).__name__ == cls]
    if cls == "GammaTransform":
        t = [g for g in t if g.invert_image == (name == "gamma_inverted")]
    t = copy.copy(t[0])
    if name == "rotation":
        t.do_scale = False
    if name == "scaling":
        t.do_rotation = False
    return t


def run_job(transform, probe: np.ndarray, n: int, chunk: int = 100) -> np.ndarray:
    """n independent draws of one transform on copies of the (C, *S) probe: (n, C, *out)."""
    out = []
    for start in range(0, n, chunk):
        b = min(chunk, n - start)
        data = np.repeat(probe[None].astype(np.float32), b, 0)
        seg = np.zeros((b, 1, *probe.shape[1:]), np.float32)
        out.append(transform(data=data, seg=seg)["data"].astype(np.float32))
    return np.concatenate(out)


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
    for k, (name, job) in enumerate(a["jobs"].items()):
        np.random.seed(a["seed"] + k)
        random.seed(a["seed"] + k)  # augment_gaussian_noise and get_range_val draw from `random`
        t = pick(transforms, job.get("kind", name))
        for attr, v in job.get("set", {}).items():
            setattr(t, attr, v)
        probe = np.load(a["probes"][job["probe"]])
        y = run_job(t, probe, job.get("n", a["n"]))
        for s in job["stats"]:
            _ref.save_array(a, f"{name}__{s}", STATS[s](probe, y))
    geo = np.load(a["geo"])
    result.update(exact_ops(a, np.load(a["probes"]["smooth"]), geo[0], geo[1].astype(np.float32),
                            a["cases"], a["geo_patch"]))
    _ref.done(a, result)


if __name__ == "__main__":
    main()
