"""The ``raycxr`` command. Arguments with ``=`` are Hydra overrides; others are names.

    raycxr demo [overrides]                       synthesise + register the demo sites, report on them
    raycxr synth out=DIR n_per_site=N seed=S      write the synthetic multi-site corpus (preset=study: the study's)
    raycxr pretrain method=unichest|ark|concurrent|mixed|single [overrides]
    raycxr federate [rounds=N out=DIR] [overrides] rounds of local training at each site + server aggregation
    raycxr eval run=RUN [overrides]               AUC/F1/AP, zero-shot, linear probe, fine-tune, report
    raycxr segment run=RUN [overrides]            MONAI segmentation decoders: pretrained vs random encoder
    raycxr export run=RUN [int8=true]             ONNX classifier + encoder with metadata and parity check
    raycxr tune [overrides]                       Ray Tune sweep over UniChest's lambda, K and lr (ASHA)
    raycxr study [overrides]                      every pretraining strategy, transferred to a target site, with CIs
    raycxr sites list | adapters [NAME]           registered sites | each adapter's options, defaults, meaning
    raycxr sites show NAME
    raycxr sites validate [NAME ...] [check_images=true]
    raycxr sites build NAME                       run the site's adapter, write its manifest
    raycxr sites add PATH.yaml                    register a site (copy its YAML into sites_dir)
    raycxr sites update PATH.yaml                 replace a registered site's YAML (then `sites build` it)
    raycxr sites remove NAME                      unregister a site (its data and manifest stay)
    raycxr cluster check [overrides]              nodes, labels, site placement, shared out/storage_path
                                                  (the pretrain config: ray.address, sites, out, ...)
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from .config import compose, compose_preset

USAGE = __doc__


def _split(args: Sequence[str]) -> tuple[list[str], list[str]]:
    names = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    return names, overrides


def cmd_synth(args: Sequence[str]) -> int:
    from .stats import print_corpus_table
    from .synth.generator import synthesize

    names, overrides = _split(args)
    if names:
        raise SystemExit(f"raycxr synth takes only overrides (key=value), got {names}")
    cfg = compose_preset("synth", overrides)
    stats = synthesize(cfg.out, OmegaConf.to_container(cfg.sites), n_per_site=cfg.n_per_site, seed=cfg.seed,
                       render_size=cfg.render_size, workers=cfg.workers, overwrite=cfg.overwrite,
                       preview=cfg.preview, enrich=OmegaConf.to_container(cfg.enrich) if cfg.enrich else None,
                       split_fractions=list(cfg.split_fractions))
    print_corpus_table(stats["sites"], title=f"synthetic corpus in {cfg.out} ({stats['seconds']} s)")
    return 0


def _sites(cfg) -> dict:
    from .sites.config import discover_sites

    return discover_sites(cfg.sites_dir, data_root=cfg.data_root)


def _site_stats(site) -> dict:
    from .quarantine import Quarantine
    from .stats import site_statistics

    q = len(Quarantine(site.quarantine_path, site=site.name)) if site.quarantine_path else 0
    return site_statistics(site.load_manifest(), quarantined=q)


def cmd_sites(args: Sequence[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from .sites.adapters import ADAPTERS, list_adapters
    from .stats import print_corpus_table

    names, overrides = _split(args)
    if not names:
        raise SystemExit("usage: raycxr sites list|show|validate|build|add|update|remove|adapters ...")
    action, names = names[0], names[1:]
    cfg = compose("sites", overrides)
    console = Console()
    if action == "adapters":  # every adapter (or the named ones) with its options, defaults and meaning
        import yaml

        from .sites.adapters import describe_options

        templates = {}
        for t in sorted((Path(__file__).resolve().parents[1] / "sites" / "templates").glob("*.yaml")):
            templates.setdefault((yaml.safe_load(t.read_text()) or {}).get("adapter"), []).append(t.name)
        for name, cls in ((n, ADAPTERS[n]) for n in list_adapters()):
            if names and name not in names:
                continue
            table = Table(title=f"{name}: {cls.description}", title_justify="left")
            for col in ("option", "default", "meaning"):
                table.add_column(col, overflow="fold")
            for opt, default, meaning in describe_options(name):
                table.add_row(opt, json.dumps(default, default=str), meaning)
            console.print(table)
            for t in templates.get(name, []):
                console.print(f"  template: sites/templates/{t}")
        return 0
    if action == "add":
        from .sites.config import SiteConfig

        if len(names) != 1:
            raise SystemExit("usage: raycxr sites add PATH.yaml")
        site = SiteConfig.load(names[0], data_root=cfg.data_root)
        existing = _sites(cfg)
        dest = Path(cfg.sites_dir) / f"{site.name}.yaml"
        if site.name in existing and existing[site.name].yaml_path.resolve() != Path(names[0]).resolve():
            raise SystemExit(f"a site named '{site.name}' is already registered ({existing[site.name].yaml_path})")
        if Path(names[0]).resolve() != dest.resolve():
            shutil.copyfile(names[0], dest)
        console.print(f"registered site '{site.name}' ({site.adapter}) as {dest}")
        if not site.has_manifest():
            console.print(f"  no manifest yet: run `raycxr sites build {site.name}`")
        return 0
    if action == "update":  # replace a registered site's YAML (validated first); its manifest needs a rebuild
        from .sites.config import SiteConfig

        if len(names) != 1:
            raise SystemExit("usage: raycxr sites update PATH.yaml")
        site = SiteConfig.load(names[0], data_root=cfg.data_root)
        existing = _sites(cfg)
        if site.name not in existing:
            raise SystemExit(f"no site named '{site.name}' is registered (registered: {sorted(existing)}); "
                             "use `raycxr sites add`")
        dest = existing[site.name].yaml_path
        if Path(names[0]).resolve() != dest.resolve():
            shutil.copyfile(names[0], dest)
        console.print(f"updated site '{site.name}' ({dest}); run `raycxr sites build {site.name}` to rebuild "
                      "its manifest")
        return 0
    sites = _sites(cfg)
    if action == "remove":  # unregister: the YAML goes; data, manifest and quarantine stay where they are
        if len(names) != 1 or names[0] not in sites:
            raise SystemExit(f"usage: raycxr sites remove NAME (registered: {sorted(sites)})")
        s = sites[names[0]]
        s.yaml_path.unlink()
        kept = [str(p) for p in (s.manifest_file, s.dropped_path) if p.is_file()]
        console.print(f"removed site '{s.name}' ({s.yaml_path})"
                      + (f"; left in place: {', '.join(kept)}" if kept else ""))
        return 0
    unknown = [n for n in names if n not in sites]
    if unknown:
        raise SystemExit(f"unknown site(s) {unknown}; registered: {sorted(sites)}")
    if action == "list":
        table = Table(title=f"sites registered in {cfg.sites_dir}")
        for col in ("site", "adapter", "root", "manifest", "images", "objective"):
            table.add_column(col)
        for s in sites.values():
            n = str(len(s.load_manifest())) if s.has_manifest() else "-"
            table.add_row(s.name, s.adapter, str(s.root), "yes" if s.has_manifest() else "missing", n, s.objective)
        console.print(table)
        return 0
    if action == "show":
        if len(names) != 1:
            raise SystemExit("usage: raycxr sites show NAME")
        s = sites[names[0]]
        console.print_json(json.dumps(s.to_dict()))
        if s.has_manifest():
            m = s.load_manifest()
            console.print(f"labels ({len(m.label_names)}): {', '.join(m.label_names)}")
            counts = m.to_pandas()["split"].value_counts()
            how = (m.site_meta.get("split") or {}).get("source") or \
                f"hashed (salt {m.site_meta.get('split_salt', '?')!r})"
            if m.site_meta.get("ambiguous_file_names"):
                console.print(f"[yellow]{m.site_meta['ambiguous_file_names']} files share a name with an image the "
                              f"manifest uses and were not used[/yellow]; listed in {s.dropped_path}")
            console.print(f"splits: {how}: "
                          + ", ".join(f"{k} {int(counts.get(k, 0))}" for k in ("train", "val", "test")))
            from .dataset import site_pair_types

            how = "declared in the site file" if s.pair_types is not None else "from the manifest"
            types = site_pair_types(m, s.pair_types, source=str(s.yaml_path or s.name))
            console.print(f"pair types (UmiF, {how}): {', '.join(types)}")
            print_corpus_table({s.name: _site_stats(s)}, title=f"site {s.name}")
        return 0
    if action == "validate":
        from .validate import validate_site

        failed = 0
        for name in names or list(sites):
            report = validate_site(sites[name], check_images=cfg.check_images, workers=cfg.workers)
            status = "[green]ok[/green]" if report["ok"] else "[red]FAILED[/red]"
            console.print(f"{name}: {status} {report['message']}")
            failed += not report["ok"]
        if len(names or sites) > 1:
            from .validate import shared_patients

            for pair in shared_patients({n: sites[n] for n in (names or list(sites))}):
                a, b = pair["sites"]
                if pair["different_split"]:
                    failed += 1
                    console.print(f"[red]{a} and {b} share {pair['shared']} patients, {pair['different_split']} "
                                  "of them in different splits[/red] (a test patient trained on at the other site); "
                                  "give both sites the same split_salt, or remove one copy")
                else:
                    console.print(f"{a} and {b} share {pair['shared']} patients (in the same splits)")
        return 1 if failed else 0
    if action == "build":
        if len(names) != 1:
            raise SystemExit("usage: raycxr sites build NAME")
        s = sites[names[0]]
        m, dropped = s.build_manifest()
        console.print(f"site '{s.name}': wrote {len(m)} rows to {s.manifest_path}"
                      + (f"; {len(dropped)} rows dropped, listed in {s.dropped_path}"
                         if dropped else ""))
        return 0
    raise SystemExit(f"unknown action '{action}'; expected list, show, validate, build, add, update, remove "
                     "or adapters")


def cmd_demo(args: Sequence[str]) -> int:
    from .demo import run_demo

    names, overrides = _split(args)
    if names:
        raise SystemExit(f"raycxr demo takes only overrides (key=value), got {names}")
    run_demo(compose("demo", overrides))
    return 0


def cmd_pretrain(args: Sequence[str]) -> int:
    names, overrides = _split(args)
    if names:
        raise SystemExit(f"raycxr pretrain takes only overrides (key=value), got {names}")
    cfg = compose("pretrain", overrides)
    if cfg.runner == "local":
        from .train.local import run_pretrain
    elif cfg.runner == "ray":
        from .ray.runner import run_pretrain_ray as run_pretrain
    else:
        raise ValueError(f"unknown runner '{cfg.runner}'; expected local or ray")
    result = run_pretrain(cfg)
    last = result["history"][-1] if result["history"] else {}
    print(f"done: {len(result['history'])} epochs, last loss {last.get('loss', float('nan')):.4f}; "
          f"checkpoint {result['checkpoint']}")
    return 0


def _overrides_only(command: str, args: Sequence[str]) -> list[str]:
    names, overrides = _split(args)
    if names:
        raise SystemExit(f"raycxr {command} takes only overrides (key=value), got {names}")
    return overrides


def cmd_eval(args: Sequence[str]) -> int:
    from .eval.evaluate import run_eval

    run_eval(compose("eval", _overrides_only("eval", args)))
    return 0


def cmd_segment(args: Sequence[str]) -> int:
    from .eval.segmentation import run_segmentation

    run_segmentation(compose("segment", _overrides_only("segment", args)))
    return 0


def cmd_export(args: Sequence[str]) -> int:
    from .export import export_onnx

    export_onnx(compose("export", _overrides_only("export", args)))
    return 0


def cmd_study(args: Sequence[str]) -> int:
    from .study import run_study

    run_study(compose_preset("study", _overrides_only("study", args)))
    return 0


def cmd_federate(args: Sequence[str]) -> int:
    from .federated import run_federate

    result = run_federate(compose("federate", _overrides_only("federate", args)))
    last = result["history"][-1] if result["history"] else {}
    print(f"done: {len(result['history'])} rounds, last participants {last.get('participants')}; "
          f"global model {result['checkpoint']}")
    return 0


def cmd_tune(args: Sequence[str]) -> int:
    from .tune import run_tune

    run_tune(compose("tune", _overrides_only("tune", args)))
    return 0


def cmd_cluster(args: Sequence[str]) -> int:
    names, overrides = _split(args)
    if names != ["check"]:
        raise SystemExit("usage: raycxr cluster check [ray.address=HOST:PORT] [pretrain overrides]")
    from .cluster import check_cluster, print_report

    report = check_cluster(compose("pretrain", overrides))
    print_report(report)
    return 0 if report["ok"] else 1


COMMANDS = {"demo": cmd_demo, "synth": cmd_synth, "sites": cmd_sites, "pretrain": cmd_pretrain, "eval": cmd_eval,
            "segment": cmd_segment, "export": cmd_export, "tune": cmd_tune, "study": cmd_study,
            "federate": cmd_federate, "cluster": cmd_cluster}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"raycxr: unknown command '{argv[0]}'\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return cmd(argv[1:])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        # user-facing problems (bad config, bad site file, bad manifest): one clear line, no traceback
        print(f"raycxr {argv[0]}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
