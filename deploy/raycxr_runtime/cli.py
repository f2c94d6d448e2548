"""``raycxr-infer``: score chest radiographs with an exported raycxr model, or serve it over HTTP.

    raycxr-infer --model classifier.onnx INPUT... [--out results.json|results.csv] [--batch-size 16] [--force]
    raycxr-infer serve --model classifier.onnx [--host 127.0.0.1] [--port 8080] [--max-bytes 33554432] [--force]

INPUTs are files or folders (searched recursively for DICOM, PNG, JPEG and TIFF). Without
``--out`` the JSON report goes to standard output. Exit status: 0 when the run completed (each
result has its own status), 2 for a usage problem, an unusable model or no input files.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import __version__
from .inference import quiet_pydicom
from .model import Model, ModelError

logger = logging.getLogger("raycxr_runtime")


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else
                                           logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raycxr-infer",
        description="Score chest radiographs (DICOM, PNG, JPEG) with a raycxr ONNX classifier. "
                    "Use `raycxr-infer serve --help` for the HTTP service.")
    p.add_argument("--model", required=True, help="classifier.onnx (or classifier.int8.onnx) from `raycxr export`")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write results here: .json or .csv (default: JSON on standard output)")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--force", action="store_true",
                   help="also score images flagged as out of scope (they keep status 'flagged')")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each file (-vv: and its warnings)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.add_argument("--version", action="version", version=f"raycxr-runtime {__version__}")
    return p


def _serve_parser() -> argparse.ArgumentParser:
    from .server import DEFAULT_MAX_BYTES

    p = argparse.ArgumentParser(prog="raycxr-infer serve",
                                description="HTTP service: GET /health, GET /model, POST /predict (one image).")
    p.add_argument("--model", required=True, help="classifier.onnx from `raycxr export`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                   help=f"largest accepted request body (default {DEFAULT_MAX_BYTES}, 32 MiB); larger gets 413")
    p.add_argument("--force", action="store_true", help="also score images flagged as out of scope")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    p.add_argument("-v", "--verbose", action="count", default=1, help="-vv: log warnings per request too")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    return p


def _load(path: str, threads: int | None) -> Model:
    model = Model(path, threads=threads)
    if model.kind != "classifier":
        raise ModelError(path, f"is an {model.kind} model; raycxr-infer needs a classifier (classifier.onnx)")
    return model


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``raycxr-infer`` and ``python -m raycxr_runtime``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return _serve(argv[1:])
    args = _infer_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    quiet_pydicom()
    if args.out and Path(args.out).suffix.lower() not in (".json", ".csv"):
        print(f"raycxr-infer: --out must end in .json or .csv, got {args.out}", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print(f"raycxr-infer: --batch-size must be at least 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model = _load(args.model, args.threads)
    except ModelError as exc:
        print(f"raycxr-infer: model {exc}", file=sys.stderr)
        return 2
    from .inference import Predictor, collect_inputs, summary, write_csv, write_json

    files, skipped = collect_inputs(args.inputs)
    if not files:
        print(f"raycxr-infer: no image files found in {', '.join(args.inputs)}"
              + (f" ({skipped} other files skipped)" if skipped else ""), file=sys.stderr)
        return 2
    predictor = Predictor(model, batch_size=args.batch_size, force=args.force)
    with _progress(len(files), disable=args.quiet) as bar:
        results = predictor.predict_files(files, progress=bar.update if bar is not None else None)
    try:
        if args.out and Path(args.out).suffix.lower() == ".csv":
            write_csv(results, model, args.out)
        elif args.out:
            write_json(results, model, args.out)
        else:
            sys.stdout.write(write_json(results, model, None) + "\n")
    except OSError as exc:
        print(f"raycxr-infer: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        counts = summary(results)
        print(f"raycxr-infer: {len(results)} file(s): {counts['scored']} scored, {counts['flagged']} flagged, "
              f"{counts['error']} error(s)" + (f"; {skipped} non-image file(s) skipped" if skipped else "")
              + (f"; wrote {args.out}" if args.out else "") + f" (model {model.model_version})", file=sys.stderr)
    return 0


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
    try:
        model = _load(args.model, args.threads)
    except ModelError as exc:
        print(f"raycxr-infer serve: model {exc}", file=sys.stderr)
        return 2
    if args.max_bytes < 1:
        print(f"raycxr-infer serve: --max-bytes must be positive, got {args.max_bytes}", file=sys.stderr)
        return 2
    from .server import make_server

    try:
        server = make_server(model, host=args.host, port=args.port, max_bytes=args.max_bytes, force=args.force)
    except OSError as exc:
        print(f"raycxr-infer serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"raycxr-infer: serving {model.path.name} (model {model.model_version}) on http://{host}:{port}; "
          "Ctrl-C stops", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
