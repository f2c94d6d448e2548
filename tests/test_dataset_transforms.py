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
