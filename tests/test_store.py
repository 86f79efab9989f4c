import numpy as np
import zarr

from unetpp_lib.prep import store
from unetpp_lib.nn.data import read_box
from unetpp_lib.prep.store import sample_locations


def test_round_trip_and_locations(tmp_path):
    rng = np.random.default_rng(1)
    img = rng.normal(size=(20, 30, 40)).astype(np.float32)
    lab = np.zeros(img.shape, np.uint8)
    lab[5:15, 10:20, 10:30] = 1
    lab[8:10, 12:14, 12:14] = 2
    locs = sample_locations(lab, seed=0)
    path = store.write_case(tmp_path / "c.zarr", img, lab, locs, patch_size=[8, 16, 16])
    g = store.open_case(path)
    assert g["image"].dtype == np.float16 and g["label"].dtype == np.uint8
    np.testing.assert_allclose(g["image"][...], img, atol=2e-3)  # float16 precision
    assert np.array_equal(g["label"][...], lab)
    back = store.class_locations(g)
    assert set(back) == {1, 2} and all((lab[tuple(back[c].T)] == c).all() for c in back)
    assert {c: len(v) for c, v in back.items()} == {c: len(v) for c, v in locs.items()}
    assert not list(tmp_path.glob("*.partial*"))


def test_patch_read_touches_only_its_chunks(tmp_path):
    img = np.arange(32 * 64 * 64, dtype=np.float32).reshape(32, 64, 64) / 1000
    path = store.write_case(tmp_path / "c.zarr", img, (img > 10).astype(np.uint8), {}, patch_size=[16, 16, 16],
                            min_chunk=16)
    assert store.open_case(path)["image"].chunks == (16, 16, 16)  # 2 x 4 x 4 = 32 chunks in the case

    class CountingStore(zarr.storage.LocalStore):
        reads: list = []

        async def get(self, key, *args, **kwargs):
            if "/c/" in key:
                CountingStore.reads.append(key)
            return await super().get(key, *args, **kwargs)

    group = zarr.open_group(CountingStore(str(path), read_only=True), mode="r")
    patch = read_box(group["image"], (3, 20, 40), (12, 16, 16), 0, np.float16)  # the loader's reader
    np.testing.assert_allclose(patch, img[3:15, 20:36, 40:56], rtol=1e-3)
    touched = {k for k in CountingStore.reads if k.startswith("image/")}
    assert touched == {f"image/c/0/{y}/{x}" for y in (1, 2) for x in (2, 3)}  # 4 of 32 chunks


def test_chunk_shape():
    assert store.chunk_shape((20, 300, 300), (128, 128, 128)) == (20, 128, 128)
    assert store.chunk_shape((200, 300, 300), (8, 8, 8)) == (96, 96, 96)
    assert store.chunk_shape((200, 300, 300), (8, 8, 8), minimum=16) == (16, 16, 16)


def test_a_damaged_case_is_named_marked_and_redone_alone(synth_task, tmp_path):
    """A chunk changed on disk after 03: the training start names the case, marks it to be redone, and 03 redoes
    that case only; the store then passes."""
    import pytest

    from conftest import prepared_run
    from unetpp_lib import preprocess
    from unetpp_lib.core.layout import PreLayout
    from unetpp_lib.train import TrainConfig, Trainer

    run = prepared_run(tmp_path, synth_task, {"patch_size": [16, 32, 32], "base_num_features": 4})
    pre = PreLayout(run / "preprocessed")
    case = sorted(p.stem for p in pre.store.glob("*.zarr"))[1]
    chunk = max((p for p in pre.case_store(case).rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, as a bad sector would
    chunk.write_bytes(bytes(data))
    cfg = TrainConfig(str(run), fold=0, num_epochs=1, iterations_per_epoch=1, val_iterations=1, num_workers=0,
                      device="cpu")
    with pytest.raises(store.DamagedStoreError, match=rf"case\(s\) {case} in .*python run_all.py --stages preprocess"):
        Trainer(cfg)
    assert not pre.case_properties(case).exists() and not pre.manifest.exists()
    redone = {r["case"]: r["status"] for r in preprocess.preprocess_task(run / "raw", pre.root)}
    assert redone.pop(case) == "preprocessed" and set(redone.values()) == {"skipped"}
    store.verify_cases(pre.root, sorted(redone) + [case])  # passes
    assert Trainer(cfg).train_cases
