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
