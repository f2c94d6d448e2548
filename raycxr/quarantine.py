"""Quarantine: images that could not be read are recorded with the reason, never silently dropped.

A quarantine is a JSON Lines file, one object per skipped image::

    {"site": "vindr", "image_id": "a1b2", "path": "images/a1b2.dcm", "reason": "...", "time": "..."}

:meth:`Quarantine.record` appends one line immediately with a single ``write`` on a descriptor
opened with ``O_APPEND``, so data-loader workers in several processes can record into the same
file without interleaving their lines (POSIX appends on a local file system; on NFS appends are
not atomic, so give each process its own file there). :meth:`Quarantine.entries` reads the file
back, de-duplicated by ``(site, image_id)`` with the last record winning (an image retried and
failing again for a new reason shows the new reason). With ``path=None`` the quarantine lives in
memory only, in the current process.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .readers import ImageReadError

__all__ = ["Quarantine", "QuarantineEntry", "pixel_problem", "safe_read"]

logger = logging.getLogger(__name__)

CSV_COLUMNS = ("site", "image_id", "path", "reason", "time")
MAX_REASON_CHARS = 4000  # keep lines short: a reason is a diagnosis, not a log dump


@dataclass(frozen=True)
class QuarantineEntry:
    """One skipped image. ``time`` is ISO 8601 in UTC."""

    site: str
    image_id: str
    path: str
    reason: str
    time: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuarantineEntry:
        # Unknown keys are ignored and missing ones left empty, so older/newer files stay readable.
        return cls(**{f.name: str(d.get(f.name) or "") for f in fields(cls)})


class Quarantine:
    """Record of the images a site's loaders skipped, and why (see module docstring)."""

    def __init__(self, path: str | os.PathLike[str] | None, site: str = "") -> None:
        self.path = Path(path) if path is not None else None
        self.site = site
        self._memory: list[QuarantineEntry] = []
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"Quarantine(path={str(self.path) if self.path else None!r}, site={self.site!r})"

    def record(self, image_id: str, path: str | os.PathLike[str], reason: str) -> None:
        """Record one skipped image now (appended and flushed to the file, or kept in memory)."""
        reason = str(reason)
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        entry = QuarantineEntry(
            site=self.site,
            image_id=str(image_id),
            path=str(path),
            reason=reason,
            time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        )
        if self.path is None:
            self._memory.append(entry)
            return
        line = (json.dumps(asdict(entry), ensure_ascii=False) + "\n").encode("utf-8")
        # One os.write on an O_APPEND descriptor: the kernel positions and writes the whole line
        # atomically with respect to other appenders; a buffered file object could split it.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
            while written < len(line):  # short writes do not happen on regular files, but be exact
                written += os.write(fd, line[written:])
        finally:
            os.close(fd)

    def entries(self) -> list[QuarantineEntry]:
        """All recorded images, de-duplicated by ``(site, image_id)``, last record winning."""
        latest: dict[tuple[str, str], QuarantineEntry] = {}
        for entry in [*self._read_file(), *self._memory]:
            key = (entry.site, entry.image_id)
            latest.pop(key, None)  # re-insert so the order follows the latest record
            latest[key] = entry
        return list(latest.values())

    def __len__(self) -> int:
        return len(self.entries())

    def image_ids(self) -> set[str]:
        return {e.image_id for e in self.entries()}

    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write the de-duplicated entries as CSV (for a site's data manager); returns the path."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for entry in self.entries():
                writer.writerow(asdict(entry))
        return out

    def _read_file(self) -> list[QuarantineEntry]:
        if self.path is None or not self.path.is_file():
            return []
        out: list[QuarantineEntry] = []
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    d = json.loads(line)
                    if not isinstance(d, dict) or not d.get("image_id"):
                        raise ValueError("not an entry object")
                except ValueError as exc:
                    # A writer killed mid-line must not make the whole quarantine unreadable.
                    logger.warning("%s:%d: skipping malformed quarantine line (%s)", self.path, lineno, exc)
                    continue
                out.append(QuarantineEntry.from_dict(d))
        return out


def pixel_problem(image: np.ndarray, *, constant: bool = True) -> str | None:
    """Why a decoded image cannot be trained on, or None: non-finite pixels (NaN / inf, which reach the
    loss as NaN and stop a run far from the file), or (``constant``) one value everywhere (no content)."""
    a = np.asarray(image)
    bad = int(a.size - np.count_nonzero(np.isfinite(a)))
    if bad:
        return f"non-finite pixel values: {bad} of {a.size} pixels are NaN or infinite after decoding"
    if constant and a.size and float(a.max()) == float(a.min()):
        return f"constant image: every pixel is {float(a.min()):.4g} after decoding (no content)"
    return None


def safe_read(
    reader: Callable[[str | os.PathLike[str]], np.ndarray],
    path: str | os.PathLike[str],
    image_id: str,
    quarantine: Quarantine,
) -> np.ndarray | None:
    """``reader(path)``, or ``None`` after recording the image in ``quarantine``.

    :class:`~raycxr.readers.ImageReadError` (a property of the file) and non-finite pixels are
    quarantined; anything else is a bug or an environment problem and propagates.
    """
    try:
        image = reader(path)
    except ImageReadError as exc:
        quarantine.record(image_id, str(path), exc.reason)
        return None
    problem = pixel_problem(image, constant=False)
    if problem is not None:
        quarantine.record(image_id, str(path), problem)
        return None
    return image
