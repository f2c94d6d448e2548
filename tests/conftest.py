import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A small synthetic corpus (3 sites x 24 images), built once per test session."""
    from raycxr.synth.generator import synthesize

    out = tmp_path_factory.mktemp("corpus")
    synthesize(out, ["nih", "vindr", "siim"], n_per_site=24, seed=1, render_size=128, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def small_sites(small_corpus, tmp_path_factory) -> list[str]:
    """Config overrides registering the small corpus's three sites (manifest adapter)."""
    import yaml

    d = tmp_path_factory.mktemp("sites")
    for n in ("nih", "vindr", "siim"):
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": n}))
    return [f"sites.sites_dir={d}", f"sites.data_root={small_corpus}"]


@pytest.fixture(scope="session")
def val_sites(small_corpus, tmp_path_factory):
    """Two sites of the small corpus with half their images moved to the val split, so that the
    val AUC has positives and negatives to score."""
    import pyarrow as pa
    import yaml

    from raycxr.manifest import Manifest

    d = tmp_path_factory.mktemp("val_sites")
    for n in ("nih", "siim"):
        m = Manifest.read(small_corpus / n / "manifest.parquet")
        split = pa.array(["val" if i % 2 else "train" for i in range(len(m))])
        table = m.table.set_column(m.table.schema.get_field_index("split"), "split", split)
        Manifest(table, m.label_names, m.site_meta).write(d / f"{n}_manifest.parquet")
        (d / f"{n}.yaml").write_text(yaml.safe_dump({"name": n, "adapter": "manifest", "root": str(small_corpus / n),
                                                     "manifest": str(d / f"{n}_manifest.parquet")}))
    return [f"sites.sites_dir={d}", f"sites.data_root={small_corpus}"]


# a UniChest sweep cell small enough for a test (tests/test_tune.py, tests/test_cluster.py)
TUNE_TINY = ["image_size=32", "batch_size=4", "encoder.embed_dim=16", "max_steps_per_epoch=1", "probe_size=0",
             "unichest.query={n_layers: 1, n_heads: 2, ffn: 32, dropout: 0.0, lambda_local: 1.0, lambda_global: 0.4}",
             "unichest.scl_dim=8", "text.max_length=16", "unichest.conquer_epochs=1", "unichest.divide_epochs=1"]

UNICHEST_SMALL = ["image_size=64", "encoder.embed_dim=32", "unichest.n_experts=2", "text.max_length=16",
                  "unichest.query={n_layers: 1, n_heads: 2, ffn: 64, dropout: 0.0, lambda_local: 1.0, "
                  "lambda_global: 0.4}"]


def untrained_unichest_state(site_overrides: list[str]):
    """The checkpoint the UniChest method saves, for an untrained small UniChest in the divide stage.

    PyTorch's default init replaces UniChest's 0.02-scaled one in the query networks so that the
    probabilities depend visibly on the image (std across images ~1e-2, 100x the parity tolerance)."""
    import torch
    from omegaconf import OmegaConf

    from raycxr.checkpoint import Checkpoint
    from raycxr.config import compose
    from raycxr.labels import UnionLabelSpace
    from raycxr.models.factory import build_encoder, build_text_encoder
    from raycxr.models.unichest import UniChest
    from raycxr.sites.config import discover_sites

    cfg = compose("pretrain", [*UNICHEST_SMALL, *site_overrides])
    sites = discover_sites(cfg.sites.sites_dir, data_root=cfg.sites.data_root)
    names = UnionLabelSpace.build({n: s.load_manifest().label_names for n, s in sites.items()}).names
    torch.manual_seed(0)
    encoder = build_encoder(cfg)
    u = cfg.unichest
    model = UniChest(encoder, n_experts=u.n_experts, lam=u.lam, bias_ratio=u.bias_ratio, scl_dim=u.scl_dim,
                     query=OmegaConf.to_container(u.query, resolve=True))
    for m in [*model.query_networks.modules(), model.gate]:
        if isinstance(m, torch.nn.MultiheadAttention):
            m._reset_parameters()
        elif isinstance(m, torch.nn.Linear):
            m.reset_parameters()
    for qn in model.query_networks:
        torch.nn.init.normal_(qn.head.weight, std=0.3)
    model.set_stage("divide")
    text = build_text_encoder(cfg, encoder.dim)
    return Checkpoint(method="unichest", config=OmegaConf.to_container(cfg, resolve=True), position=2,
                      modules={"model": model.state_dict(), "text_head": text.mlp_embed.state_dict()},
                      meta={"stage": "divide", "class_names": names, "site_names": list(sites),
                            "site_index": {n: i for i, n in enumerate(sites)}})


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real PACS (Orthanc, with its DICOMweb plugin when installed) on 127.0.0.1 for the whole session."""
    from orthanc import orthanc_binary, start_orthanc

    if orthanc_binary() is None:
        pytest.skip("Orthanc is not installed (Debian package 'orthanc'; .ci/run installs it)")
    pacs = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    yield pacs
    pacs.stop()
