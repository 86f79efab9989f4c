"""Patch sampling (fix 3): where v1's DataLoader3D and our PatchSampler put their boxes, on the same cases.

Each case is written twice: in v1's format (npz of image + label stacked, pkl of properties
with class_locations) and in our store, with the same class locations. The image holds each
voxel's flat index + 1 (0 is padding), so every box's lower corner is read off its content.
"""
from __future__ import annotations

import pickle

import numpy as np
from scipy.stats import ks_2samp

from unetpp_lib.prep import store
from unetpp_lib.nn.data import IGNORE, PatchSampler, box_bounds, forced_foreground
from unetpp_lib.preprocess import STAGE

BATCH, BATCHES = 3, 500  # v1 forces the last of 3: 1000 random and 500 foreground boxes per case
FINAL = (8, 8, 8)
CASES = {  # name: (shape, loaded box)
    "A": ((14, 12, 11), (12, 12, 12)),
    # smaller than the final patch along its last axis; odd enlargement (3) along axis 1, where v1's
    # final patch can start 1 voxel before the image (lower bound -2, crop offset 1): reproduced
    "B": ((14, 10, 7), (12, 11, 12)),
}


def _label(shape) -> np.ndarray:
    """Liver blob inside; tumour voxels at the lower corner (clipped) and the upper corner (not clipped in v1)."""
    lab = np.zeros(shape, np.uint8)
    lab[5:9, 4:7, 3:6] = 1
    lab[0, 0, 0] = lab[1, 0, 1] = lab[-1, -1, -1] = lab[-2, -1, -2] = 2
    return lab


def _write(tmp_path, name: str, shape) -> tuple[dict, dict]:
    """The case in v1's format (for the reference) and in our store; the class locations (every voxel)."""
    image = np.arange(1, np.prod(shape) + 1, dtype=np.float32).reshape(shape)  # float16-exact: <= 2048
    lab = _label(shape)
    locs = {c: np.argwhere(lab == c).astype(np.int64) for c in (1, 2)}
    npz, pkl = tmp_path / f"{name}.npz", tmp_path / f"{name}.pkl"
    np.savez_compressed(npz, data=np.stack([image, lab.astype(np.float32)]))
    with open(pkl, "wb") as f:
        pickle.dump({"class_locations": locs}, f)
    store.write_case(tmp_path / "pre" / STAGE / f"{name}.zarr", image, lab, locs, FINAL)
    return {"npz": str(npz), "pkl": str(pkl)}, locs


def _corner(box: np.ndarray, shape) -> np.ndarray:
    """Lower corner of a box from its content (flat index + 1 of each voxel inside the image)."""
    inside = np.argwhere(box > 0)[0]
    return np.array(np.unravel_index(int(box[tuple(inside)]) - 1, shape)) - inside


def _inside_share(corners: np.ndarray, shape, box) -> np.ndarray:
    """Share of the final (centre-cropped) patch inside the image, per draw."""
    lo = corners + (np.array(box) - FINAL) // 2
    hi = lo + FINAL
    overlap = np.clip(np.minimum(hi, shape) - np.maximum(lo, 0), 0, None)
    return overlap.prod(1) / np.prod(FINAL)


def _rule_support(locs: dict, shape, box) -> set:
    """Every corner v1's forced-foreground rule can give: a class voxel minus half the box, clipped below only."""
    lo, _ = box_bounds(shape, box, FINAL)
    return {tuple(max(a, int(v) - b // 2) for a, v, b in zip(lo, p, box)) for pts in locs.values() for p in pts}


def _draw(run_ref, tmp) -> dict:
    """Corners of v1's and our boxes per case: {name: {'v1'|'ours': {'random'|'forced': (N, 3)}, ...}}."""
    written = {name: _write(tmp, name, shape) for name, (shape, _) in CASES.items()}
    ref = run_ref("ref_sampling.py", cases=[{**written[n][0], "patch": list(box), "final": list(FINAL)}
                                            for n, (_, box) in CASES.items()],
                  batch_size=BATCH, batches=BATCHES, seed=1234, oversample_batches=list(range(1, 13)))
    result = {"oversample": ref["oversample"]}
    forced = np.array(forced_foreground(BATCH))
    for k, (name, (shape, box)) in enumerate(CASES.items()):
        data, seg = ref.array(f"data_{k}"), ref.array(f"seg_{k}")
        assert ((data == 0) == (seg == -1)).all()  # v1 pads the image with 0 and the label with -1
        corners = np.array([[_corner(b, shape) for b in batch] for batch in data])
        v1 = {"random": corners[:, ~forced].reshape(-1, 3), "forced": corners[:, forced].reshape(-1, 3)}
        sampler = PatchSampler(tmp / "pre", [name], box, FINAL)
        rng = np.random.default_rng(99)
        ours = {kind: np.array([sampler.origin(rng, kind == "forced")[1] for _ in range(len(v1[kind]))])
                for kind in ("random", "forced")}
        for fg in (False, True):  # the boxes sample() reads are the corners origin() draws, padded as v1's
            for _ in range(10):
                state = rng.bit_generator.state
                img, lab = sampler.sample(rng, fg)
                rng.bit_generator.state = state
                assert _corner(img.astype(np.float32), shape).tolist() == sampler.origin(rng, fg)[1]
                assert ((img == 0) == (lab == IGNORE)).all()
        result[name] = {"v1": v1, "ours": ours, "shape": shape, "box": box, "locs": written[name][1]}
    return result


def test_patch_sampling_matches_v1(run_ref, tmp_path):
    drawn = _draw(run_ref, tmp_path)
    for name in CASES:
        _check_random(drawn[name], name)
        _check_forced(drawn[name], name)
    _check_oversampling(drawn["oversample"])


def _check_random(d: dict, name: str) -> None:
    """Random boxes: v1's bounds exactly, the same corner distribution per axis and share of the patch inside."""
    lo, hi = box_bounds(d["shape"], d["box"], FINAL)
    for who in ("v1", "ours"):  # exact rule: every corner between the bounds, and both ends reached
        c = d[who]["random"]
        assert c.min(0).tolist() == lo and c.max(0).tolist() == hi, (who, c.min(0), c.max(0), lo, hi)
    ps = [ks_2samp(d["v1"]["random"][:, axis], d["ours"]["random"][:, axis]).pvalue for axis in range(3)]
    assert min(ps) > 0.01, (name, ps)
    share = {who: _inside_share(d[who]["random"], d["shape"], d["box"]) for who in ("v1", "ours")}
    if name == "A":  # an image at least patch-sized: the final patch is always wholly inside
        assert (share["v1"] == 1).all() and (share["ours"] == 1).all()
    else:
        assert ks_2samp(share["v1"], share["ours"]).pvalue > 0.01
        assert share["v1"].max() < 1 and share["ours"].max() < 1  # 7 voxels cannot fill 8
        assert set(share["v1"]) == set(share["ours"])
    print(f"random boxes {name}: KS p min {min(ps):.3f}; inside share v1 {share['v1'].mean():.4f} ours {share['ours'].mean():.4f}")


def _check_forced(d: dict, name: str) -> None:
    """Foreground boxes: only corners v1's rule can give, the same distribution per axis, class drawn first."""
    support = _rule_support(d["locs"], d["shape"], d["box"])
    for who in ("v1", "ours"):
        assert {tuple(c) for c in d[who]["forced"].tolist()} <= support, who
    ps = [ks_2samp(d["v1"]["forced"][:, axis], d["ours"]["forced"][:, axis]).pvalue for axis in range(3)]
    assert min(ps) > 0.01, (name, ps)
    # the class is drawn first (1/2 each), then a voxel: the 4 tumour voxels get half the boxes, not 4/N of them
    lo, _ = box_bounds(d["shape"], d["box"], FINAL)
    tumour = {tuple(max(a, int(v) - b // 2) for a, v, b in zip(lo, p, d["box"])) for p in d["locs"][2]}
    shares = {who: np.mean([tuple(c) in tumour for c in d[who]["forced"].tolist()]) for who in ("v1", "ours")}
    assert abs(shares["v1"] - 0.5) < 0.07 and abs(shares["ours"] - 0.5) < 0.07, shares
    inside = {who: _inside_share(d[who]["forced"], d["shape"], d["box"]) for who in ("v1", "ours")}
    assert ks_2samp(inside["v1"], inside["ours"]).pvalue > 0.01
    print(f"foreground boxes {name}: KS p min {min(ps):.3f}; tumour share v1 {shares['v1']:.3f} ours {shares['ours']:.3f}; "
          f"inside share v1 {inside['v1'].mean():.4f} ours {inside['ours'].mean():.4f}")


def _check_oversampling(theirs_by_batch: dict) -> None:
    """Which samples of a batch are forced: v1's get_do_oversample, except at batch 1."""
    for b, theirs in theirs_by_batch.items():
        ours = forced_foreground(int(b))
        if b == "1":  # v1 never forces foreground with batch 1; we do (documented difference)
            assert theirs == [False] and ours == [True]
        else:
            assert ours == theirs, (b, ours, theirs)
