"""The decode cache on a real site (DICOM and PNG files of the synthetic corpus)."""

import os
import shutil

import numpy as np
import pytest
import torch

from raycxr import cache as cache_mod
from raycxr.dataset import site_dataset
from raycxr.quarantine import Quarantine
from raycxr.readers import read_image, resize
from raycxr.sites.config import SiteConfig

SIZE = 32


@pytest.fixture()
def site(tmp_path, small_corpus):
    shutil.copytree(small_corpus / "vindr", tmp_path / "vindr")  # its files get changed below
    cache_mod._OPEN.clear()  # every test opens its caches afresh, as a new process would
    return SiteConfig.from_dict({"name": "vindr", "adapter": "manifest", "root": "vindr"}, data_root=tmp_path)


def tf(dtype="uint16", enabled=True, size=SIZE, cache_dir=None):
    return {"size": size, "train": {}, "cache": {"enabled": enabled, "dir": cache_dir, "dtype": dtype}}


def images(ds) -> list[torch.Tensor]:
    return [ds[i]["image"] for i in range(len(ds))]


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("uint16", 0.5 / 65535 + 1e-7), ("uint8", 0.5 / 255 + 1e-7)])
def test_cached_images_equal_the_uncached_ones_and_the_second_pass_hits(site, dtype, atol):
    plain = images(site_dataset(site, tf(enabled=False), split=None, train=False))
    ds = site_dataset(site, tf(dtype), split=None, train=False)
    assert ds.cache is not None and ds.cache.folder.parent == site.manifest_path.parent / "decode_cache"
    first = images(ds)
    assert ds.cache.stats == {"hits": 0, "misses": len(ds), "rebuilt": 0} and ds.cache.filled() == len(ds)
    second = images(ds)
    assert ds.cache.stats["hits"] == len(ds)
    for a, b, p in zip(plain, first, second):
        assert a.shape == (1, SIZE, SIZE)
        torch.testing.assert_close(b, a, rtol=0, atol=atol)
        assert torch.equal(b, p)  # a miss returns the stored value: the first epoch sees what later ones see
    # a new process opens the same files: all hits, nothing decoded
    cache_mod._OPEN.clear()
    again = site_dataset(site, tf(dtype), split=None, train=False)
    assert torch.equal(torch.stack(images(again)), torch.stack(second))
    assert again.cache.stats == {"hits": len(ds), "misses": 0, "rebuilt": 0}


def test_augmentation_runs_on_the_cached_array(site):
    """With an exact (float32) cache, the augmented tensors equal the uncached ones draw for draw."""
    a = site_dataset(site, tf(enabled=False), split=None, train=True, seed=3)
    b = site_dataset(site, tf("float32"), split=None, train=True, seed=3)
    xa, xb = images(a), images(b)
    assert not torch.equal(xa[0], site_dataset(site, tf(enabled=False), split=None, train=False)[0]["image"])
    for u, v in zip(xa, xb):
        torch.testing.assert_close(v, u)


def test_a_changed_file_is_rebuilt_and_a_touched_one_is_not(site):
    ds = site_dataset(site, tf(), split=None, train=False)
    images(ds)
    paths = ds.df["path"].tolist()
    # same bytes, new mtime: the content hash says the entry still holds
    os.utime(site.root / paths[0], ns=(1, 1))
    # new content (another image's bytes): rebuilt from the file
    shutil.copyfile(site.root / paths[2], site.root / paths[1])
    ds.cache.stats.update(hits=0, misses=0, rebuilt=0)
    out = images(ds)
    assert ds.cache.stats == {"hits": len(ds) - 1, "misses": 0, "rebuilt": 1}
    want = resize(read_image(site.root / paths[2]), SIZE)
    np.testing.assert_allclose(out[1][0].numpy(), want, atol=0.5 / 65535 + 1e-7)
    assert not torch.equal(out[1], out[0])


def test_changed_settings_make_a_new_cache(site, tmp_path):
    a = site_dataset(site, tf(), split=None, train=False).cache
    b = site_dataset(site, tf(size=48), split=None, train=False).cache
    c = site_dataset(site, tf("uint8"), split=None, train=False).cache
    d = site_dataset(site, tf(cache_dir=str(tmp_path / "elsewhere")), split=None, train=False).cache
    assert len({a.folder, b.folder, c.folder}) == 3 and b.pixels.shape[1:] == (48, 48)
    assert d.folder.parent == tmp_path / "elsewhere" and d.folder.name == a.folder.name
    # a site whose image list changed (one row fewer) is another cache too
    key = cache_mod.cache_key(list(a.row)[:-1], SIZE, "uint16")
    assert not a.folder.name.endswith(key)


def test_an_unreadable_image_is_still_quarantined_and_not_stored(site):
    paths = site.load_manifest().to_pandas()["path"].tolist()
    (site.root / paths[3]).write_bytes(b"not an image")
    q = Quarantine(site.quarantine_path, site="vindr")
    ds = site_dataset(site, tf(), split=None, train=False, quarantine=q)
    assert ds[3] is None and [e.path for e in q.entries()] == [paths[3]]
    assert ds.cache.state[ds.cache.row[paths[3]]] == 0 and ds[4] is not None
    # the next dataset skips it, as without a cache
    assert len(site_dataset(site, tf(), split=None, train=False, quarantine=q)) == len(ds) - 1
