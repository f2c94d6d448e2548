"""``raycxr-infer``: score chest radiographs with an exported raycxr model, serve it over HTTP, or as a DICOM node.

    raycxr-infer --model classifier.onnx INPUT... [--out results.json|.jsonl|.csv] [--sr-dir DIR] [--workers N]
                 [--worker-memory-mb MB]
    raycxr-infer serve --model classifier.onnx [--host 127.0.0.1] [--port 8080] [--max-bytes 33554432]
    raycxr-infer dicom-node --model classifier.onnx --port 11112 --ae-title RAYCXR --send-to HOST:PORT:AET \
        [--spool-dir DIR] [--allow-ae AET[@HOST]] [--tls-cert C --tls-key K [--tls-ca CA]] [--send-tls]
    raycxr-infer dicomweb --model classifier.onnx --url https://pacs/dicom-web --study UID [--token T]
    raycxr-infer keygen --out publisher.pem          (an Ed25519 key pair for model signatures)
    raycxr-infer sign --key publisher.pem classifier.onnx...   (writes classifier.onnx.sig)

Every scoring command takes ``--trusted-key PUB.pem`` (repeatable) and ``--require-signature``.

INPUTs are files or folders (searched recursively for DICOM, PNG, JPEG and TIFF). Without
``--out`` the JSON report goes to standard output. Images are read in an isolated worker process
under a memory limit (``--workers``, default 1), so a decoder that crashes fails only its file.
Results are written as they come, so a run that stops early keeps what it scored. Exit status: 0
when the run completed (each result has its own status), 1 when it stopped early (the output says
so), 2 for a usage problem, an unusable model or no input files.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import ssl
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from . import __version__
from .inference import ERROR, Prediction, display_name, log_name, quiet_pydicom, scan_inputs
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
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB.pem",
                   help="the model publisher's Ed25519 public key: check the model's signature (<model>.sig) "
                        "with it; repeat for several keys (needs raycxr-runtime[sign])")
    p.add_argument("--require-signature", action="store_true",
                   help="refuse a model without a signature that verifies with a --trusted-key")


def _infer_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="raycxr-infer",
        description="Score chest radiographs (DICOM, PNG, JPEG) with a raycxr ONNX classifier. "
                    "`raycxr-infer serve --help`: the HTTP service; `raycxr-infer dicom-node --help`: a DICOM node; "
                    "`raycxr-infer dicomweb --help`: a study on a DICOMweb server; `keygen` / `sign`: model "
                    "signatures.")
    _common(p)
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", help="write results here as they come: .json, .jsonl or .csv (default: JSON on "
                                 "standard output)")
    p.add_argument("--sr-dir", help="also write a DICOM Structured Report per scored DICOM into this folder "
                                    "(needs raycxr-runtime[sr])")
    p.add_argument("--batch-size", type=int, default=16, help="images per model call (default 16)")
    p.add_argument("--workers", type=int, default=1,
                   help="read images in N isolated processes under a memory limit: a decoder that crashes, hangs or "
                        "runs out of memory fails only its file (default 1; 0 reads in this process, unprotected)")
    p.add_argument("--image-timeout", type=float, default=120.0,
                   help="seconds one image may take to read with --workers (default 120)")
    p.add_argument("--worker-memory-mb", type=int, default=None,
                   help="address-space limit of each reading process in MiB (default: 1024 + 8 x the decoded-size "
                        "budget; 0: none)")
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
    # against slow clients (slowloris): see docs/deployment.md, "HTTP service"
    p.add_argument("--body-deadline", type=float, default=300.0,
                   help="seconds a whole request body may take before 408 (default 300)")
    p.add_argument("--min-rate", type=float, default=32768,
                   help="bytes/s a body must average after --rate-grace, else 408; 0: no minimum (default 32768)")
    p.add_argument("--rate-grace", type=float, default=5.0,
                   help="seconds a body gets before --min-rate applies (default 5)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a request's headers (default 10)")
    p.add_argument("--per-client-uploads", type=int, default=None,
                   help="uploads at once per client address, more get 429 (default: half of --max-inflight, "
                        "at least 1)")
    p.add_argument("--max-connections", type=int, default=512,
                   help="connections at once; over it the oldest one with no request in progress is closed "
                        "(default 512)")
    p.add_argument("--forwarded-allow-ips", default=None,
                   help="comma-separated addresses of the TLS proxy whose X-Forwarded-For names the client (for "
                        "--per-client-uploads); default: trust none")
    p.add_argument("--token-file", default=None,
                   help="require 'Authorization: Bearer <token>' (except on /health), the token being this file's "
                        "first line; default: $RAYCXR_INFER_TOKEN if set, else no authentication")
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
    p.add_argument("--spool-dir", help="state folder for received images and the SR outbox, kept across restarts "
                                       "(default $XDG_STATE_HOME/raycxr-runtime/dicom-node-<AE title>)")
    p.add_argument("--allow-ae", action="append", metavar="AET[@HOST]",
                   help="a calling AE title allowed to connect, optionally only from HOST (repeat; default: any)")
    p.add_argument("--tls-cert", help="PEM certificate: the node listens with TLS (and presents it with --send-tls)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-ca", help="PEM CA certificates: clients must present a certificate signed by them; with "
                                    "--send-tls they also verify the destination")
    p.add_argument("--send-tls", action="store_true", help="send the SRs over TLS")
    p.add_argument("--retry-min", type=float, default=5.0, help="first back-off in seconds after a failed SR delivery "
                                                                "(default 5)")
    p.add_argument("--retry-max", type=float, default=300.0, help="longest back-off in seconds (default 300)")
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
    from .signing import SignatureError, load_trusted_keys

    try:
        keys = load_trusted_keys(args.trusted_key)
    except SignatureError as exc:
        raise ModelError(args.model, f"--trusted-key {exc}") from None
    model = Model(args.model, threads=args.threads, backend=args.backend, verify=not args.allow_unverified_model,
                  trusted_keys=keys, require_signature=args.require_signature)
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
    if argv[:1] == ["dicomweb"]:
        return _dicomweb(argv[1:])
    if argv[:1] == ["keygen"]:
        return _keygen(argv[1:])
    if argv[:1] == ["sign"]:
        return _sign(argv[1:])
    args = _infer_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    quiet_pydicom()
    from .inference import OUTPUT_SUFFIXES, Predictor, ResultWriter

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
    # every entry: (path, None) to score, (path, reason) to report; paths that are not UTF-8 stay as Python
    # gives them (surrogate escapes, PEP 383) so that they open, and are shown with display_name
    scan = scan_inputs(args.inputs)
    entries, skipped = scan.entries, scan.skipped
    if not entries:
        print(f"raycxr-infer: no image files found in {', '.join(log_name(i) for i in args.inputs)}"
              + (f" ({skipped} other files skipped)" if skipped else ""), file=sys.stderr)
        return 2
    files = [p for p, reason in entries if reason is None]
    try:  # opened before any scoring: a missing folder or a read-only place fails now, not after an hour
        writer = ResultWriter.open(args.out, model)
    except OSError as exc:
        print(f"raycxr-infer: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    n_sr, stopped = 0, None
    predictor = Predictor(model, batch_size=args.batch_size, force=args.force, budget=budget, workers=args.workers,
                          timeout=args.image_timeout if args.workers else None,
                          memory_limit=None if args.worker_memory_mb is None else args.worker_memory_mb << 20)
    try:
        with _progress(len(entries), disable=args.quiet) as bar:
            for path, result in _results(entries, files, predictor, model,
                                         bar.update if bar is not None else None):
                if args.sr_dir and result.probabilities is not None:
                    n_sr += _write_sr(path, result, model, args.sr_dir)
                writer.write(result)
    except (Exception, KeyboardInterrupt) as exc:  # keep what was scored; say why the run stopped
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else log_name(f"{type(exc).__name__}: {exc}")
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
        print(f"raycxr-infer: stopped after {done} of {len(entries)} file(s): {stopped}; the results so far are in "
              f"{args.out or 'the output above'}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"raycxr-infer: {done} file(s): {counts['scored']} scored, {counts['flagged']} flagged, "
              f"{counts['error']} error(s)" + (f"; {skipped} non-image file(s) skipped" if skipped else "")
              + (f"; wrote {args.out}" if args.out else "")
              + (f"; {n_sr} SR(s) in {args.sr_dir}" if args.sr_dir else "")
              + f" (model {model.model_version})", file=sys.stderr)
    return 0


NOT_UTF8_NOTE = "the file name is not valid UTF-8: its undecodable bytes are shown as \\xNN"


def _results(entries: list[tuple[str, str | None]], files: list[str], predictor: Any, model: Model,
             progress: Any) -> Any:
    """``(path, result)`` for every entry, in order: the predictor's results for the files, and an ``error``
    result with its reason for each entry that cannot be read (a dangling link, a link loop...), so that
    nothing found in a folder is missing from the results and counts."""
    names = [display_name(p) for p in files]
    scored = predictor.iter_predictions(files, names=names, progress=progress)
    for path, reason in entries:
        if reason is not None:
            result = Prediction(input=display_name(path), status=ERROR, warnings=[reason],
                                model_version=model.model_version)
            logger.info("%s: %s (%s)", log_name(path), ERROR, reason)
            if progress is not None:
                progress(1)
        else:
            result = next(scored)
        if result.input != path:
            result.warnings.insert(0, NOT_UTF8_NOTE)
        yield path, result


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
    """Write the SR of one scored result; a failure is recorded as its ``sr_error`` and never stops the run."""
    from .sr import SRError, write_sr

    try:
        write_sr(path, result, model, folder)
    except Exception as exc:  # the scored result is kept whatever the SR does
        # an unexpected error is named by its type only: its message may quote header values
        result.sr_error = exc.reason if isinstance(exc, SRError) else f"unexpected {type(exc).__name__}"
        logger.warning("%s: scored, but no structured report: %s", log_name(result.input), result.sr_error)
        return 0
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
    from .server import TOKEN_ENV, load_token, make_server

    try:
        token = load_token(args.token_file)
        server = make_server(model, host=args.host, port=args.port, max_bytes=args.max_bytes, force=args.force,
                             decode_workers=args.decode_workers, max_inflight=args.max_inflight,
                             body_timeout=args.body_timeout, budget=budget,
                             memory_limit=(args.worker_memory_mb << 20) if args.worker_memory_mb else None,
                             body_deadline=args.body_deadline, min_rate=args.min_rate, rate_grace=args.rate_grace,
                             header_timeout=args.header_timeout, per_client_uploads=args.per_client_uploads,
                             max_connections=args.max_connections, forwarded_allow_ips=args.forwarded_allow_ips,
                             token=token)
    except ValueError as exc:
        print(f"raycxr-infer serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"raycxr-infer serve: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    access = ("bearer token required except on /health" if token else
              f"no authentication: anyone who can reach this port can use it (--token-file or ${TOKEN_ENV})")
    print(f"raycxr-infer: serving {model.path.name} (model {model.model_version}, {model.backend}) on "
          f"http://{host}:{port} ({access}); Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)
    # uvicorn drains on SIGTERM, then raises it again once its own handler is gone: without this handler
    # that killed the process before server_close() stopped the decode workers (exit -15, not 0)
    signal.signal(signal.SIGTERM, lambda signum, frame: server.shutdown())
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
        from .dicom_node import DicomNode, TLSConfig, parse_allow, parse_destination
    except ImportError as exc:
        print(f"raycxr-infer dicom-node: needs pynetdicom and highdicom: pip install 'raycxr-runtime[dicom]' ({exc})",
              file=sys.stderr)
        return 2
    try:
        budget = _budget(args)
        destination = parse_destination(args.send_to)
        allow = parse_allow(args.allow_ae) if args.allow_ae else None
        if (args.tls_key or args.tls_ca) and not (args.tls_cert or args.send_tls):
            raise ValueError("--tls-key and --tls-ca need --tls-cert (TLS on the listening side) or --send-tls")
        tls_files = TLSConfig(*(Path(f) if f else None for f in (args.tls_cert, args.tls_key, args.tls_ca)))
        model = _load(args)
    except (ModelError, ValueError) as exc:
        print(f"raycxr-infer dicom-node: {exc}", file=sys.stderr)
        return 2
    try:
        node = DicomNode(model, ae_title=args.ae_title, host=args.host, port=args.port, destination=destination,
                         force=args.force, budget=budget, spool_dir=args.spool_dir, allow=allow,
                         tls=tls_files if args.tls_cert else None, send_tls=tls_files if args.send_tls else None,
                         retry_min=args.retry_min, retry_max=args.retry_max)
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"raycxr-infer dicom-node: cannot start on {args.host}:{args.port}: "
              f"{getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2
    # SIGTERM (systemd, docker stop, Kubernetes) drains like Ctrl-C: nothing acknowledged is lost
    signal.signal(signal.SIGTERM, lambda signum, frame: node.request_stop())
    print(f"raycxr-infer: DICOM node {args.ae_title} on {args.host}:{node.port}, sending SRs to {args.send_to}, "
          f"spool {node.spool.root}; Ctrl-C or SIGTERM stops", file=sys.stderr, flush=True)
    try:
        node.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        node.close()
    return 0


def _dicomweb_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycxr-infer dicomweb",
                                description="Score a study on a DICOMweb server: QIDO-RS lists its instances, "
                                            "WADO-RS retrieves the radiographs, STOW-RS stores one Structured "
                                            "Report per scored image back in the study (needs "
                                            "raycxr-runtime[dicomweb]).")
    _common(p)
    p.add_argument("--url", required=True, help="the DICOMweb service root, e.g. https://pacs.local/dicom-web")
    p.add_argument("--study", required=True, help="the StudyInstanceUID to score")
    p.add_argument("--token", default=None,
                   help="bearer token for the Authorization header (default: env RAYCXR_DICOMWEB_TOKEN, which "
                        "keeps it out of the process list)")
    p.add_argument("--out", help="also write the results here: .json, .jsonl or .csv (default: JSON on standard "
                                 "output)")
    p.add_argument("--no-store", action="store_true", help="score only: do not STOW the SRs back")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log each instance (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary")
    return p


def _dicomweb(argv: Sequence[str]) -> int:
    args = _dicomweb_parser().parse_args(argv)
    _setup_logging(args.verbose, args.quiet)
    quiet_pydicom()
    prog = "raycxr-infer dicomweb"
    from .dicomweb import DicomWebError, connect, score_study, token_from_env
    from .inference import OUTPUT_SUFFIXES, Predictor, ResultWriter

    if args.out and Path(args.out).suffix.lower() not in OUTPUT_SUFFIXES:
        print(f"{prog}: --out must end in {', '.join(OUTPUT_SUFFIXES)}, got {args.out}", file=sys.stderr)
        return 2
    try:
        import highdicom  # noqa: F401

        client = connect(args.url, token=token_from_env(args.token), timeout=args.timeout)
        budget = _budget(args)
        model = _load(args)
    except ImportError:
        print(f"{prog}: structured reports need highdicom: pip install 'raycxr-runtime[dicomweb]'", file=sys.stderr)
        return 2
    except (DicomWebError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"{prog}: model {exc}", file=sys.stderr)
        return 2
    try:
        writer = ResultWriter.open(args.out, model)
    except OSError as exc:
        print(f"{prog}: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    stopped, run = None, None
    predictor = Predictor(model, batch_size=1, force=args.force, budget=budget)
    try:
        run = score_study(client, args.study, model, predictor, store=not args.no_store, on_result=writer.write)
    except DicomWebError as exc:
        stopped = str(exc)
    except (Exception, KeyboardInterrupt) as exc:  # keep what was scored; say why the run stopped
        stopped = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
        logger.debug("run stopped", exc_info=True)
    finally:
        predictor.close()
        writer.close(stopped)
    if run is None:
        print(f"{prog}: {stopped}", file=sys.stderr)
        return 1 if sum(writer.counts.values()) else 2
    c = writer.counts
    if not args.quiet:
        print(f"{prog}: {run.found} instance(s): {c['scored']} scored, {c['flagged']} flagged, {c['error']} error(s)"
              f", {run.skipped} non-image skipped; " + ("SRs not stored (--no-store)" if args.no_store else
                                                        f"{run.sr_stored} SR(s) stored")
              + (f", {run.sr_failed} SR(s) failed" if run.sr_failed else "") + f" (model {model.model_version})",
              file=sys.stderr)
    return 1 if run.sr_failed else 0


def _keygen(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="raycxr-infer keygen",
                                description="Write a new Ed25519 key pair for model signatures: the private key "
                                            "(keep it with the publisher, offline) and the public key the "
                                            "runtime trusts (--trusted-key).")
    p.add_argument("--out", required=True, help="the private key file to write (PEM, mode 0600)")
    p.add_argument("--public", help="the public key file (default: <out stem>.pub.pem next to it)")
    args = p.parse_args(argv)
    from .signing import SignatureError, generate_key

    try:
        priv, pub, kid = generate_key(args.out, args.public)
    except (SignatureError, OSError) as exc:
        print(f"raycxr-infer keygen: {exc}", file=sys.stderr)
        return 2
    print(f"raycxr-infer: wrote {priv} (private: sign with it, keep it offline) and {pub} (public: "
          f"--trusted-key); key id {kid}", file=sys.stderr)
    return 0


def _sign(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="raycxr-infer sign",
                                description="Sign exported models: check each (digests, thresholds, a probe run), "
                                            "then write its detached Ed25519 signature <model>.sig.")
    p.add_argument("--key", required=True, help="the Ed25519 private key (PEM; raycxr-infer keygen)")
    p.add_argument("models", nargs="+", help="ONNX files from `raycxr export`")
    args = p.parse_args(argv)
    from .signing import SignatureError, load_private_key, sign_file

    try:
        key = load_private_key(args.key)
        for path in args.models:
            Model(path)  # never sign a file that would not load: corrupted, edited, NaN weights
            out = sign_file(path, key)
            print(f"raycxr-infer: signed {path} -> {out.name}", file=sys.stderr)
    except (SignatureError, ModelError) as exc:
        print(f"raycxr-infer sign: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
