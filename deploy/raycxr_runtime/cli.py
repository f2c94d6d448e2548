"""``raycxr-infer``: score chest radiographs with an exported raycxr model, serve it over HTTP, or as a DICOM node.

    raycxr-infer --model classifier.onnx INPUT... [--out results.json|.jsonl|.csv] [--sr-dir DIR] [--workers N]
    raycxr-infer serve --model classifier.onnx [--host 127.0.0.1] [--port 8080] [--max-bytes 33554432]
    raycxr-infer dicom-node --model classifier.onnx --port 11112 --ae-title RAYCXR --send-to HOST:PORT:AET

INPUTs are files or folders (searched recursively for DICOM, PNG, JPEG and TIFF). Without
``--out`` the JSON report goes to standard output. Results are written as they come, so a run that
stops early keeps what it scored. Exit status: 0 when the run completed (each result has its own
status), 1 when it stopped early (the output says so), 2 for a usage problem, an unusable model
or no input files.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import __version__
from .inference import quiet_pydicom
from .model import BACKENDS, DEFAULT_BACKEND, Model, ModelError
from .readers import PixelBudget, get_pixel_budget, set_pixel_budget

logger = logging.getLogger("raycxr_runtime")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else
                                           logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _common(p: argparse.ArgumentParser) -> None:
    """Options every command shares: the model, its backend and the pixel budget."""
    default = PixelBudget()
    p.add_argument("--model", required=True, help="classifier.onnx (or classifier.int8.onnx) from `raycxr export`")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                   help=f"inference engine (default {DEFAULT_BACKEND}; openvino needs raycxr-runtime[openvino])")
    p.add_argument("--threads", type=int, default=None, help="inference threads (default: all cores)")
    p.add_argument("--force", action="store_true",
                   help="also score images flagged as out of scope (they keep status 'flagged')")
    p.add_argument("--max-pixels", type=int, default=None,
                   help=f"refuse images declaring more pixels per frame, before decoding (default "
                        f"{default.max_pixels:,}; env RAYCXR_MAX_PIXELS)")
    p.add_argument("--max-decoded-mb", type=int, default=None,
                   help=f"refuse images whose decoded size would exceed this (default {default.max_bytes >> 20} MiB; "
                        "env RAYCXR_MAX_DECODED_BYTES)")
    p.add_argument("--allow-unverified-model", action="store_true",
                   help="load a model that carries no integrity digest (exported before digests existed)")


def _infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raycxr-infer",
        description="Score chest radiographs (DICOM, PNG, JPEG) with a raycxr ONNX classifier. "
                    "`raycxr-infer serve --help`: the HTTP service; `raycxr-infer dicom-node --help`: a DICOM node.")
    _common(p)
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write results here as they come: .json, .jsonl or .csv (default: JSON on "
                                 "standard output)")
    p.add_argument("--sr-dir", help="also write a DICOM Structured Report per scored DICOM into this folder "
                                    "(needs raycxr-runtime[sr])")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--workers", type=int, default=0,
                   help="read images in N isolated processes: a decoder that crashes or hangs fails only its file "
                        "(default 0: in this process)")
    p.add_argument("--image-timeout", type=float, default=120.0,
                   help="seconds one image may take to read with --workers (default 120)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each file (-vv: and its warnings)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--version", action="version", version=f"raycxr-runtime {__version__}")
    return p


def _serve_parser() -> argparse.ArgumentParser:
    from .server import DEFAULT_MAX_BYTES

    p = argparse.ArgumentParser(prog="raycxr-infer serve",
                                description="HTTP service (uvicorn): GET /health, GET /model, POST /predict.")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"largest accepted request body (default {DEFAULT_MAX_BYTES}, 32 MiB); larger gets 413")
    p.add_argument("--decode-workers", type=int, default=2,
                   help="isolated processes that decode uploads: at most this many decodes at once (default 2)")
    p.add_argument("--max-inflight", type=int, default=4, help="uploads held at once; more wait, then 503 (default 4)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a request body may stall before 408 (default 30)")
    p.add_argument("--worker-memory-mb", type=int, default=None,
                   help="address-space limit of each decode worker in MiB (default: none)")
    p.add_argument("-v", "--verbose", action="count", default=1, help="-vv: log warnings per request too")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return p


def _node_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycxr-infer dicom-node",
                                description="DICOM storage SCP: receives images, scores them, sends the Structured "
                                            "Report to --send-to (needs raycxr-runtime[dicom]).")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=11112, help="port (default 11112)")
    p.add_argument("--ae-title", default="RAYCXR", help="this node's AE title (default RAYCXR)")
    p.add_argument("--send-to", required=True, help="where the SRs go: HOST:PORT:AE_TITLE (a PACS or router)")
    p.add_argument("-v", "--verbose", action="count", default=1, help="-vv: debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return p


def _budget(args: argparse.Namespace) -> PixelBudget:
    base = get_pixel_budget()
    budget = PixelBudget(max_pixels=args.max_pixels or base.max_pixels,
                         max_bytes=(args.max_decoded_mb << 20) if args.max_decoded_mb else base.max_bytes)
    set_pixel_budget(budget)
    return budget


def _load(args: argparse.Namespace) -> Model:
    model = Model(args.model, threads=args.threads, backend=args.backend, verify=not args.allow_unverified_model)
    if model.kind != "classifier":
        raise ModelError(args.model, f"is an {model.kind} model; raycxr-infer needs a classifier (classifier.onnx)")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``raycxr-infer`` and ``python -m raycxr_runtime``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    if argv[:1] == ["dicom-node"]:
        return _node(argv[1:])
    args = _infer_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    quiet_pydicom()
    from .inference import OUTPUT_SUFFIXES, Predictor, ResultWriter, collect_inputs

    if args.out and Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        print(f"raycxr-infer: --out must end in {', '.join(OUTPUT_SUFFIXES)}, got {args.out}", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.workers < 0:
        print("raycxr-infer: --batch-size must be at least 1 and --workers at least 0", file=sys.stderr)
        return 2
    try:
        budget = _budget(args)
    except ValueError as exc:
        print(f"raycxr-infer: {exc}", file=sys.stderr)
        return 2
    if args.sr_dir:
        problem = _sr_dir_problem(args.sr_dir)
        if problem:
            print(f"raycxr-infer: --sr-dir {args.sr_dir}: {problem}", file=sys.stderr)
            return 2
    try:
        model = _load(args)
    except ModelError as exc:
        print(f"raycxr-infer: model {exc}", file=sys.stderr)
        return 2
    files, skipped = collect_inputs(args.inputs)
    if not files:
        print(f"raycxr-infer: no image files found in {', '.join(args.inputs)}"
              + (f" ({skipped} other files skipped)" if skipped else ""), file=sys.stderr)
        return 2
    try:  # opened before any scoring: a missing folder or a read-only place fails now, not after an hour
        writer = ResultWriter.open(args.out, model)
    except OSError as exc:
        print(f"raycxr-infer: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    n_sr, stopped = 0, None
    predictor = Predictor(model, batch_size=args.batch_size, force=args.force, budget=budget, workers=args.workers,
                          timeout=args.image_timeout if args.workers else None)
    try:
        with _progress(len(files), disable=args.quiet) as bar:
            for path, result in zip(files, predictor.iter_predictions(
                    files, progress=bar.update if bar is not None else None)):
                if args.sr_dir and result.probabilities is not None:
                    n_sr += _write_sr(path, result, model, args.sr_dir)
                writer.write(result)
    except (Exception, KeyboardInterrupt) as exc:  # keep what was scored; say why the run stopped
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
        logger.debug("run stopped", exc_info=True)
    finally:
        predictor.close()
        try:
            writer.close(stopped)
        except OSError as exc:
            print(f"raycxr-infer: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    counts = writer.counts
    done = sum(counts.values())
    if stopped:
        print(f"raycxr-infer: stopped after {done} of {len(files)} file(s): {stopped}; the results so far are in "
              f"{args.out or 'the output above'}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"raycxr-infer: {done} file(s): {counts['scored']} scored, {counts['flagged']} flagged, "
              f"{counts['error']} error(s)" + (f"; {skipped} non-image file(s) skipped" if skipped else "")
              + (f"; wrote {args.out}" if args.out else "")
              + (f"; {n_sr} SR(s) in {args.sr_dir}" if args.sr_dir else "")
              + f" (model {model.model_version})", file=sys.stderr)
    return 0


def _sr_dir_problem(folder: str) -> str | None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        return "structured reports need highdicom: pip install 'raycxr-runtime[sr]'"
    p = Path(folder)
    if p.exists() and not p.is_dir():
        return "exists and is not a folder"
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create it ({exc.strerror or exc})"
    if not os.access(p, os.W_OK):
        return "not writable"
    return None


def _write_sr(path: str, result: Any, model: Model, folder: str) -> int:
    from .sr import SRError, write_sr

    try:
        out = write_sr(path, result, model, folder)
    except SRError as exc:
        result.warnings.append(f"no structured report: {exc.reason}")
        return 0
    logger.debug("%s: SR written as %s", result.input, out.name)
    return 1


def _progress(total: int, disable: bool) -> Any:
    """A tqdm bar on stderr when tqdm is installed (it is optional for the runtime)."""
    if disable:
        return nullcontext(None)
    try:
        from tqdm import tqdm
    except ImportError:
        return nullcontext(None)
    return tqdm(total=total, desc="raycxr-infer", unit="image", file=sys.stderr, dynamic_ncols=True)


def _serve(argv: Sequence[str]) -> int:
    args = _serve_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    quiet_pydicom()
    if args.max_bytes < 1 or args.decode_workers < 0 or args.max_inflight < 1:
        print("raycxr-infer serve: --max-bytes and --max-inflight must be positive, --decode-workers at least 0",
              file=sys.stderr)
        return 2
    try:
        budget = _budget(args)
        model = _load(args)
    except (ModelError, ValueError) as exc:
        print(f"raycxr-infer serve: model {exc}" if isinstance(exc, ModelError) else f"raycxr-infer serve: {exc}",
              file=sys.stderr)
        return 2
    from .server import make_server

    try:
        server = make_server(model, host=args.host, port=args.port, max_bytes=args.max_bytes, force=args.force,
                             decode_workers=args.decode_workers, max_inflight=args.max_inflight,
                             body_timeout=args.body_timeout, budget=budget,
                             memory_limit=(args.worker_memory_mb << 20) if args.worker_memory_mb else None)
    except OSError as exc:
        print(f"raycxr-infer serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"raycxr-infer: serving {model.path.name} (model {model.model_version}, {model.backend}) on "
          f"http://{host}:{port}; Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _node(argv: Sequence[str]) -> int:
    args = _node_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    quiet_pydicom()
    try:
        from .dicom_node import DicomNode, parse_destination
    except ImportError as exc:
        print(f"raycxr-infer dicom-node: needs pynetdicom and highdicom: pip install 'raycxr-runtime[dicom]' ({exc})",
              file=sys.stderr)
        return 2
    try:
        budget = _budget(args)
        destination = parse_destination(args.send_to)
        model = _load(args)
    except (ModelError, ValueError) as exc:
        print(f"raycxr-infer dicom-node: {exc}", file=sys.stderr)
        return 2
    try:
        node = DicomNode(model, ae_title=args.ae_title, host=args.host, port=args.port, destination=destination,
                         force=args.force, budget=budget)
    except OSError as exc:
        print(f"raycxr-infer dicom-node: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    print(f"raycxr-infer: DICOM node {args.ae_title} on {args.host}:{node.port}, sending SRs to {args.send_to}; "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        node.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
