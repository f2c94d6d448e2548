"""Downstream segmentation (``raycxr segment``): weights, shapes, training, metrics and the written report."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycxr.checkpoint import Checkpoint
from raycxr.config import compose
from raycxr.dataset import SegmentationDataset
from raycxr.eval.segmentation import evaluate_segmentation, run_segmentation, train_segmentation
from raycxr.losses import DiceBCELoss
from raycxr.manifest import Manifest
from raycxr.models.encoders import ImageEncoder
from raycxr.models.segmentation import SegmentationModel

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The embedded demo corpus when it is there, else a small synthetic SIIM site (clean checkout)."""
    demo = REPO / "data" / "demo"
    if (demo / "siim" / "manifest.parquet").is_file():
        return demo
    from raycxr.synth.generator import synthesize

    out = tmp_path_factory.mktemp("seg") / "corpus"
    synthesize(out, ["siim"], n_per_site=24, seed=0, render_size=128, workers=1, overwrite=True, preview=False,
               progress=False)
    return out


@pytest.fixture(scope="module")
def siim(corpus) -> Manifest:
    return Manifest.read(corpus / "siim" / "manifest.parquet")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A pretraining run folder holding a resnet18 ImageEncoder with non-default BatchNorm statistics."""
    torch.manual_seed(123)
    enc = ImageEncoder("resnet18", embed_dim=64)
    with torch.no_grad():
        enc.backbone.bn1.running_mean.uniform_(-1, 1)
        enc.backbone.layer3[0].bn2.running_var.uniform_(0.5, 2.0)
    run = tmp_path_factory.mktemp("run")
    Checkpoint(method="mixed", config={"encoder": {"name": "resnet18", "embed_dim": 64}, "image_size": SIZE},
               modules={"model": {f"encoder.{k}": v for k, v in enc.state_dict().items()}}).save(run / "checkpoint.pt")
    return run


def _encoder_state(run: Path) -> dict:
    return Checkpoint.load(run).encoder_state()


def test_pretrained_weights_are_loaded_into_the_feature_extractor(run_dir):
    state = _encoder_state(run_dir)
    torch.manual_seed(0)
    model = SegmentationModel.from_run(run_dir, n_classes=1)
    own = model.encoder.state_dict()
    assert model.n_loaded == len(own) == sum(k.startswith("backbone.") for k in state)
    assert torch.equal(own["layer4.1.conv2.weight"], state["backbone.layer4.1.conv2.weight"])
    assert torch.equal(own["bn1.running_mean"], state["backbone.bn1.running_mean"])
    assert torch.equal(own["layer3.0.bn2.running_var"], state["backbone.layer3.0.bn2.running_var"])
    torch.manual_seed(0)
    random = SegmentationModel.random_init("resnet18", n_classes=1)
    assert random.n_loaded == 0
    key = "layer4.1.conv2.weight"
    assert not torch.equal(random.encoder.state_dict()[key], state[f"backbone.{key}"])
    # the deepest feature map is exactly the pretrained encoder's output (same normalisation, same weights)
    enc = ImageEncoder("resnet18", embed_dim=64)
    enc.load_state_dict(state)
    x = torch.rand(2, 1, SIZE, SIZE)
    model.eval()
    enc.eval()
    with torch.no_grad():
        ref = enc.backbone.forward_features((x - enc.mean) / enc.std)
        torch.testing.assert_close(model.features(x)[-1], ref)


def test_bad_checkpoints_fail_clearly(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SegmentationModel.from_run(tmp_path / "nowhere", 1)
    model = SegmentationModel("resnet18", 1)
    with pytest.raises(ValueError, match="only 0 of 120"):
        model.load_encoder_state({"backbone.other.weight": torch.zeros(3)}, source="other")
    with pytest.raises(ValueError, match="strides"):  # one scale, and not a vit_* that gets the feature pyramid
        SegmentationModel("deit_tiny_patch16_224", 1, img_size=SIZE)
    cfg = compose("segment", [f"run={tmp_path / 'missing-run'}", f"out={tmp_path / 'out'}"])
    with pytest.raises(FileNotFoundError, match="missing-run"):
        run_segmentation(cfg)


def test_output_shape_and_frozen_encoder():
    model = SegmentationModel("resnet18", n_classes=2, freeze_encoder=True)
    x = torch.rand(3, 1, SIZE, SIZE)
    assert model(x).shape == (3, 2, SIZE, SIZE)
    assert SegmentationModel("resnet18", 1)(torch.rand(1, 1, 96, 96)).shape == (1, 1, 96, 96)
    model.train()
    assert not model.encoder.training and model.decoder.training
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.decoder.parameters())


def test_dataset_pairs_images_with_masks(corpus, siim):
    ds = SegmentationDataset.from_manifest(siim, corpus / "siim", "lungs", split="train", size=SIZE, limit=4)
    item = ds[0]
    assert item["image"].shape == item["mask"].shape == (1, SIZE, SIZE)
    assert 0 <= float(item["image"].min()) and float(item["image"].max()) <= 1
    assert set(torch.unique(item["mask"]).tolist()) == {0.0, 1.0}
    assert 0.1 < float(item["mask"].mean()) < 0.6  # two lungs cover a good part of a chest film
    aug = SegmentationDataset.from_manifest(siim, corpus / "siim", "lungs", split="train", size=SIZE, limit=4,
                                            train=True)
    assert set(torch.unique(aug[0]["mask"]).tolist()) <= {0.0, 1.0}
    ptx = SegmentationDataset.from_manifest(siim, corpus / "siim", "pneumothorax", split=None, size=SIZE)
    df = siim.to_pandas()
    assert len(ptx) == len(df) and ptx.has_mask.sum() == df["mask_path"].notna().sum() > 0
    negative = int(np.flatnonzero(~ptx.has_mask)[0])
    assert float(ptx[negative]["mask"].sum()) == 0.0
    with pytest.raises(ValueError, match="site 'siim' has no lung masks"):
        SegmentationDataset.from_manifest(df.drop(columns=["lung_mask_path"]), corpus / "siim", "lungs",
                                          split="train", size=SIZE)


def test_training_steps_reduce_the_lung_loss(corpus, siim):
    torch.manual_seed(0)
    ds = SegmentationDataset.from_manifest(siim, corpus / "siim", "lungs", split="train", size=SIZE, limit=16)
    model = SegmentationModel("resnet18", 1)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=16)))
    loss_fn = DiceBCELoss()

    def loss() -> float:
        model.train()  # batch statistics: what training optimises
        with torch.no_grad():
            return float(loss_fn(model(batch["image"]), batch["mask"]))

    before = loss()
    history = train_segmentation(model, ds, epochs=4, batch_size=8, lr=1e-3, seed=0)
    assert len(history) == 8 and all(np.isfinite(h["loss"]) for h in history)
    assert loss() < 0.8 * before


def _square(size: int, rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(1, size, size)
    m[0, rows, cols] = 1.0
    return m


def test_perfect_prediction_scores_dice_1_and_hd95_0(corpus, siim):
    lungs = SegmentationDataset.from_manifest(siim, corpus / "siim", "lungs", split=None, size=SIZE, limit=4)
    masks = [lungs[i]["mask"] for i in range(len(lungs))] + [torch.zeros(1, SIZE, SIZE)]
    # the image is the mask and the model thresholds it: a perfect prediction through the real evaluation path
    data = [{"image": m, "mask": m, "site": "siim", "image_id": f"m{i}"} for i, m in enumerate(masks)]
    res = evaluate_segmentation(lambda x: (x - 0.5) * 20, data, batch_size=2)
    s = res["summary"]
    assert s["dice_mean"] == pytest.approx(1.0) and s["dice_std"] == pytest.approx(0.0)
    assert s["hd95_mean"] == pytest.approx(0.0) and s["n_hd95"] == 4
    assert (s["n_test"], s["n_positive"], s["n_empty_gt"], s["empty_gt_dice"], s["n_missed"]) == (5, 4, 1, 1.0, 0)
    assert res["per_site"]["siim"]["n"] == 5 and len(res["per_image"]) == 5

    # imperfect: half a square (Dice 2*50/150), an empty prediction on a positive, a false positive on a negative
    gt = _square(SIZE, slice(10, 20), slice(10, 20))
    half = _square(SIZE, slice(10, 20), slice(10, 15))
    data = [{"image": half, "mask": gt}, {"image": torch.zeros_like(gt), "mask": gt},
            {"image": gt, "mask": torch.zeros_like(gt)}]
    s = evaluate_segmentation(lambda x: (x - 0.5) * 20, data, batch_size=3)["summary"]
    assert s["n_positive"] == 2 and s["dice_mean"] == pytest.approx((2 * 50 / 150 + 0.0) / 2)
    assert s["n_hd95"] == 1 and s["hd95_mean"] > 0 and s["n_missed"] == 1
    assert s["n_empty_gt"] == 1 and s["empty_gt_dice"] == 0.0


def test_run_segmentation_writes_table_and_figure(tmp_path, corpus, siim, run_dir):
    sites = tmp_path / "sites"
    sites.mkdir()
    (sites / "siim.yaml").write_text(f"name: siim\nadapter: manifest\nroot: {corpus / 'siim'}\n"
                                     "manifest: manifest.parquet\n")
    out = tmp_path / "out"
    cfg = compose("segment", [f"run={run_dir}", f"out={out}", f"sites.sites_dir={sites}", "tasks.lungs=[siim]",
                              "tasks.pneumothorax=[siim]", f"image_size={SIZE}", "epochs=1", "max_steps_per_epoch=2",
                              "batch_size=4", "n_train_limit=8", "n_test_limit=6", "n_figure=2", "threads=2"])
    results = run_segmentation(cfg)
    pairs = [(r["task"], r["init"]) for r in results["rows"]]
    assert pairs == [("lungs", "pretrained"), ("lungs", "random"), ("pneumothorax", "pretrained"),
                     ("pneumothorax", "random")]
    split = siim.to_pandas()["split"]
    n_test, n_train = min(6, int((split == "test").sum())), min(8, int((split == "train").sum()))
    for r in results["rows"]:
        assert r["n_test"] == n_test and r["n_train"] == n_train and r["steps"] == 2
        assert r["encoder_tensors_loaded"] == (120 if r["init"] == "pretrained" else 0)
    lungs = results["rows"][0]
    assert lungs["n_empty_gt"] == 0 and 0.0 <= lungs["dice_mean"] <= 1.0
    written = json.loads((out / "segmentation.json").read_text())
    assert [(r["task"], r["init"]) for r in written["rows"]] == pairs
    md = (out / "segmentation.md").read_text()
    assert "| lungs | pretrained | siim |" in md and "| pneumothorax | random | siim |" in md
    assert "Dice mean ± std" in md and "HD95" in md
    with Image.open(out / "segmentation.png") as im:
        assert im.width > 200 and im.height > 400  # two images x four task/init rows
