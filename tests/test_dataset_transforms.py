import numpy as np
import torch
from torch.utils.data import DataLoader

from raycxr.dataset import SiteDataset, collate_skip_none
from raycxr.labels import UnionLabelSpace
from raycxr.manifest import Manifest
from raycxr.quarantine import Quarantine
from raycxr.transforms import (
    cross_site_fourier_mix,
    eval_transforms,
    fourier_amplitude_mix,
    transforms_from_config,
)


def test_dataset_batches_masks_and_quarantine(tmp_path, small_corpus):
    import shutil

    root = tmp_path / "vindr"
    shutil.copytree(small_corpus / "vindr", root)
    m = Manifest.read(root / "manifest.parquet")
    bad = m.to_pandas()["path"][2]
    (root / bad).write_bytes(b"garbage")
    union = UnionLabelSpace.build({"vindr": m.label_names, "nih": Manifest.read(
        small_corpus / "nih" / "manifest.parquet").label_names})
    q = Quarantine(tmp_path / "q.jsonl", site="vindr")
    ds = SiteDataset(m, root, transform=transforms_from_config({"size": 64, "train": {}}, train=True),
                     label_space=union, site_index=3, quarantine=q)
    batches = [b for b in DataLoader(ds, batch_size=8, collate_fn=collate_skip_none) if b is not None]
    n = sum(len(b["image_id"]) for b in batches)
    assert n == len(m) - 1 and len(q) == 1 and q.entries()[0].path == bad
    b = batches[0]
    assert b["image"].shape[1:] == (1, 64, 64) and b["image"].dtype == torch.float32
    assert 0 <= b["image"].min() and b["image"].max() <= 1
    assert (b["site_index"] == 3).all()
    # union columns the site does not annotate are masked out
    nih_only = [j for j, name in enumerate(union.names) if j not in set(union.site_index["vindr"])]
    assert nih_only and (b["target_mask"][:, nih_only] == 0).all()
    # a rebuilt dataset skips what is already quarantined
    assert len(SiteDataset(m, root, quarantine=q)) == len(m) - 1


def test_eval_transform_is_deterministic(small_corpus):
    m = Manifest.read(small_corpus / "nih" / "manifest.parquet")
    ds = SiteDataset(m, small_corpus / "nih", transform=eval_transforms(48))
    assert torch.equal(ds[0]["image"], ds[0]["image"])


def test_fourier_mix_keeps_phase_and_mixes_amplitude():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g)
    same = fourier_amplitude_mix(x, torch.arange(4), torch.rand(4, generator=g))
    assert torch.allclose(same, x, atol=1e-5)  # mixing with itself changes nothing
    lam = torch.tensor([1.0, 0.0, 0.5, 0.5])
    y = fourier_amplitude_mix(x, torch.tensor([1, 0, 3, 2]), lam)
    assert torch.allclose(y[0], x[0], atol=1e-5)  # lam = 1 keeps the image
    fy, fx, fp = torch.fft.fft2(y[1]), torch.fft.fft2(x[1]), torch.fft.fft2(x[0])
    assert torch.allclose(fy.abs(), fp.abs(), atol=1e-3)  # lam = 0: the partner's amplitude...
    assert torch.allclose(torch.cos(torch.angle(fy) - torch.angle(fx))[fx.abs() > 1e-3], torch.tensor(1.0),
                          atol=1e-3)  # ...with its own phase
    expected = 0.5 * torch.fft.fft2(x[2]).abs() + 0.5 * torch.fft.fft2(x[3]).abs()
    assert torch.allclose(torch.fft.fft2(y[2]).abs(), expected, atol=1e-3)


def test_cross_site_mix_pairs_other_sites():
    x = torch.rand(6, 1, 8, 8)
    sites = torch.tensor([0, 0, 0, 1, 1, 1])
    assert torch.equal(cross_site_fourier_mix(x, sites, p=0.0), x)
    y = cross_site_fourier_mix(x, sites, p=1.0, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(y, x)
    # each image's amplitude is lam * own + (1 - lam) * amplitude of an image from the *other* site
    amp = torch.fft.fft2(x).abs().flatten(1)
    ya = torch.fft.fft2(y).abs().flatten(1)

    def residual(i, j):
        d = amp[i] - amp[j]
        lam = torch.dot(ya[i] - amp[j], d) / torch.dot(d, d)
        return (ya[i] - (lam * amp[i] + (1 - lam) * amp[j])).norm() / ya[i].norm()

    for i in range(6):
        best = min(range(6), key=lambda j: residual(i, j) if j != i else float("inf"))
        assert sites[best] != sites[i] and residual(i, best) < 1e-4


def _test_image(size: int) -> np.ndarray:
    """A radiograph-like test card: a bright off-centre blob on a ramp (asymmetric, so a wrong rotation or
    translation direction shows in the mean image)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    return (0.2 + 0.6 * np.exp(-((xx - 0.4) ** 2 + (yy - 0.6) ** 2) / 0.05) + 0.1 * xx).astype(np.float32)


def test_device_augmentation_draws_from_the_host_pipelines_distribution():
    """``transforms.augment=device`` (BatchAugment, batched) against today's per-sample MONAI pipeline
    (train_transforms) on the same image, 384 draws each: the distributions of per-image statistics
    agree (two-sample KS, fixed seeds) and so does the mean image (the geometry's direction)."""
    from scipy.stats import ks_2samp

    from raycxr.transforms import BatchAugment, train_transforms

    size, n = 48, 384
    img = _test_image(size)
    host_tf = train_transforms(size)
    host_tf.set_random_state(0)
    host = torch.stack([torch.as_tensor(np.asarray(host_tf({"image": img[None]})["image"])) for _ in range(n)])
    device = BatchAugment(seed=0)(torch.from_numpy(img)[None, None].repeat(n, 1, 1, 1))
    assert device.shape == host.shape and device.dtype == torch.float32
    assert 0 <= float(device.min()) and float(device.max()) <= 1

    def stats(x: torch.Tensor) -> dict[str, np.ndarray]:
        x = x.flatten(1)
        return {"mean": x.mean(1), "std": x.std(1), "zero (affine padding)": (x == 0).float().mean(1),
                "max": x.amax(1), "centre pixel": x[:, (size // 2) * size + size // 2]}

    a, b = stats(host), stats(device)
    for k in a:
        p = ks_2samp(a[k].numpy(), b[k].numpy()).pvalue
        assert p > 0.01, f"{k}: host mean {float(a[k].mean()):.4f} vs device {float(b[k].mean()):.4f} (KS p={p:.2g})"
    assert float((host.mean(0) - device.mean(0)).abs().max()) < 0.03
    # the same seed draws the same batch (a run repeats); nothing on: the image itself
    x = torch.from_numpy(img)[None, None].repeat(4, 1, 1, 1)
    assert torch.equal(BatchAugment(seed=1)(x), BatchAugment(seed=1)(x))
    off = BatchAugment(affine_prob=0, contrast_prob=0, intensity_prob=0, noise_prob=0)
    torch.testing.assert_close(off(x), x)


def test_device_data_plane_ships_stored_pixels_and_the_trainer_augments(tmp_path, small_corpus):
    """With the cache at uint16 a training item is the stored pixels (int16-packed, exact), flagged for
    augmentation; a clean second view keeps its flag off; the loader's BatchAugment makes floats in [0, 1]."""
    import shutil

    from raycxr import cache as cache_mod
    from raycxr.dataset import site_dataset
    from raycxr.sites.config import SiteConfig
    from raycxr.transforms import BatchAugment, augment_batch, pack_pixels, unit_float

    u16 = np.array([[0, 1, 32767, 32768, 65535]], np.uint16)
    assert torch.equal(unit_float(pack_pixels(u16))[0], torch.from_numpy(u16.astype(np.float32) / 65535))
    shutil.copytree(small_corpus / "nih", tmp_path / "nih")
    cache_mod._OPEN.clear()
    site = SiteConfig.from_dict({"name": "nih", "adapter": "manifest", "root": "nih"}, data_root=tmp_path)
    tf = {"size": 32, "train": {}, "augment": "device", "cache": {"enabled": True, "dir": None, "dtype": "uint16"}}
    ds = site_dataset(site, tf, split=None, train=True, second_view=True)
    item = ds[0]
    assert item["image"].dtype == torch.int16 and item["image"].shape == (1, 32, 32)
    assert bool(item["augment"]) and not bool(item["augment2"])  # a supervised site's second view is clean
    stored = ds.cache.stored(ds.df["path"][0])
    assert stored.dtype == np.uint16
    assert torch.equal(unit_float(item["image"])[0], torch.from_numpy(stored / 65535.0).float())
    batch = augment_batch(collate_skip_none([ds[i] for i in range(4)]), BatchAugment(seed=0))
    assert batch["image"].dtype == torch.float32 and "augment" not in batch
    assert 0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1
    clean = site_dataset(site, {**tf, "augment": "host"}, split=None, train=False)
    torch.testing.assert_close(batch["image2"], torch.stack([clean[i]["image"] for i in range(4)]), rtol=0, atol=1e-6)
    assert not torch.equal(batch["image"], batch["image2"])
