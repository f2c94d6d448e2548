"""Decode once: a per-site cache of preprocessed images at the training resolution.

Reading a radiograph (DICOM decode, modality LUT, VOI, MONOCHROME1 inversion, the raycxr resize)
does not depend on the augmentation, yet without a cache every epoch does it again. A
:class:`DecodeCache` keeps the result, ``resize(read_image(path), size)``, for every image of a site
in memory-mapped numpy files, so later epochs (and every replica of the site on the same node) read
a ``(size, size)`` array and only the augmentation runs.

- **Where**: ``<cache dir>/<site>-<key>/`` (default cache dir: ``decode_cache/`` next to the site's
  manifest, so the pixels stay on the site's storage). Files: ``pixels.npy`` ``(N, size, size)``
  (uint8, uint16 or float32; created sparse, filled as images are first read), ``state.npy`` (1 =
  stored), ``digest.npy`` (BLAKE2b-128 of each file's bytes), ``stat.npy`` (size and mtime of the
  file when it was stored) and ``meta.json``.
- **Key**: the folder's ``key`` hashes the preprocessing settings (size, dtype, the reader and
  resize contract of :data:`raycxr_runtime.contract.PREPROCESSING`, the cache format version) and
  the site's list of image paths. Change any of them and a new cache is built.
- **Per file**: an entry is used when the file's size and mtime are those it was stored with;
  otherwise the file is hashed, and the entry is used if the content is the same (a copy or a
  ``touch``), rebuilt if not.
- **Quantisation**: uint16 (default) stores ``round(x * 65535)``; the reader's float32 in [0, 1] comes
  back within 1/131070. A miss returns the stored (quantised) value too, so the first epoch sees the
  same pixels as later ones. ``float32`` stores the reader's values exactly.
- **Quarantine**: unreadable files raise :class:`~raycxr.readers.ImageReadError` as without a cache
  (nothing is stored for them), so the dataset records them in the quarantine and skips them.

Several processes on one node may fill the same cache (site replicas): each entry is written by
whichever process reads the file first, pixels before its ``state`` flag; a race writes the same
bytes twice. Old folders of a site (other keys) are left in place; delete them to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raycxr_runtime.contract import PREPROCESSING

from .quarantine import pixel_problem
from .readers import ImageReadError, read_image, resize
from .schema import default

__all__ = ["CACHE_VERSION", "DTYPES", "DecodeCache", "cache_options", "open_cache"]

CACHE_VERSION = 1
DTYPES = {"uint8": 255.0, "uint16": 65535.0, "float32": None}  # dtype -> full scale (None: stored as is)
_OPEN: dict[str, DecodeCache] = {}  # one open cache per folder and process (datasets of a site share it)


def file_digest(path: str | os.PathLike[str]) -> np.ndarray:
    """BLAKE2b-128 of a file's bytes, as 16 uint8."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return np.frombuffer(h.digest(), dtype=np.uint8)


class DecodeCache:
    """Preprocessed images of one site at one size (see the module docstring).

    Args:
        root: the site's root; ``paths`` are relative to it (or absolute).
        paths: every image of the site, in manifest order (the cache's rows).
        size: the training resolution (side in pixels).
        folder: the cache folder (``<cache dir>/<site>-<key>``, see :func:`open_cache`).
        dtype: ``uint16`` (default), ``uint8`` or ``float32``.
    """

    def __init__(self, root: str | Path, paths: Sequence[str], size: int, folder: str | Path,
                 dtype: str = "uint16") -> None:
        if dtype not in DTYPES:
            raise ValueError(f"decode cache dtype must be one of {list(DTYPES)}, got '{dtype}'")
        self.root, self.size, self.dtype = Path(root), int(size), dtype
        self.scale = DTYPES[dtype]
        self.row = {str(p): i for i, p in enumerate(paths)}
        self.folder = Path(folder)
        self.stats = {"hits": 0, "misses": 0, "rebuilt": 0}
        n = len(self.row)
        if not (self.folder / "meta.json").is_file():
            self._create(n)
        self.pixels = np.load(self.folder / "pixels.npy", mmap_mode="r+")
        self.state = np.load(self.folder / "state.npy", mmap_mode="r+")
        self.digest = np.load(self.folder / "digest.npy", mmap_mode="r+")
        self.stat = np.load(self.folder / "stat.npy", mmap_mode="r+")
        # plain ndarray views of the same maps for the per-image hit check (numpy's memmap indexing is slow)
        self._pixels, self._state, self._stat = (np.asarray(a) for a in (self.pixels, self.state, self.stat))
        self._root = str(self.root)
        if self.pixels.shape != (n, self.size, self.size):
            raise ValueError(f"decode cache {self.folder}: holds {self.pixels.shape}, expected "
                             f"{(n, self.size, self.size)} (delete the folder)")

    def _create(self, n: int) -> None:
        """Build the empty files in a temporary folder and rename it into place (another process
        creating the same cache at the same time wins or loses the rename; both then use one folder)."""
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.folder.parent))
        try:
            np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.dtype(self.dtype),
                                      shape=(n, self.size, self.size)).flush()  # sparse until filled
            np.save(tmp / "state.npy", np.zeros(n, np.uint8))
            np.save(tmp / "digest.npy", np.zeros((n, 16), np.uint8))
            np.save(tmp / "stat.npy", np.zeros((n, 2), np.int64))
            (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "size": self.size,
                                                       "dtype": self.dtype, "images": n}, indent=1))
            os.rename(tmp, self.folder)
        except OSError:
            if not (self.folder / "meta.json").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def __len__(self) -> int:
        return len(self.row)

    def _decode(self, j: int) -> np.ndarray:
        a = np.asarray(self.pixels[j])
        return a.astype(np.float32) if self.scale is None else (a.astype(np.float32) / np.float32(self.scale))

    def _encode(self, image: np.ndarray) -> np.ndarray:
        if self.scale is None:
            return image.astype(np.float32)
        return np.rint(np.clip(image, 0.0, 1.0) * self.scale).astype(self.dtype)

    def image(self, path: str) -> np.ndarray:
        """The preprocessed ``(size, size)`` float32 image of ``path`` (a manifest path): from the cache
        when the file is unchanged, else read, stored and returned. Unreadable files raise
        :class:`~raycxr.readers.ImageReadError` and are not stored."""
        return self._decode(self._entry(path))

    def stored(self, path: str) -> np.ndarray:
        """As :meth:`image`, but the stored pixels as they are (uint8 / uint16 / float32, a copy): what a
        site ships when the trainer's device does the augmentation (``transforms.augment=device``)."""
        return self._pixels[self._entry(path)].copy()

    def _entry(self, path: str) -> int:
        """The row of ``path``, valid (read and stored first if it is missing or stale)."""
        j = self.row[str(path)]
        try:
            st = os.stat(os.path.join(self._root, path))
        except FileNotFoundError:
            st = None
        stamp = (st.st_size, st.st_mtime_ns) if st is not None else (-1, -1)
        if self._state[j] == 1 and self._stat[j, 0] == stamp[0] and self._stat[j, 1] == stamp[1]:
            self.stats["hits"] += 1
            return j
        full = self.root / path
        digest = file_digest(full) if st is not None else None
        if self.state[j] == 1 and digest is not None and np.array_equal(self.digest[j], digest):
            self.stat[j] = stamp  # same bytes, new mtime (a copy, a touch): still valid
            self.stats["hits"] += 1
            return j
        stale = self.state[j] == 1
        image = read_image(full)  # ImageReadError: the caller quarantines it
        problem = pixel_problem(image, constant=False)
        if problem is not None:  # NaN would be stored as arbitrary integers in a uint8/uint16 cache
            raise ImageReadError(full, problem)
        image = resize(image, self.size)
        self.pixels[j] = self._encode(image)
        self.digest[j] = digest
        self.stat[j] = stamp
        self.state[j] = 1  # last: another process reads the entry only once it is whole
        self.stats["rebuilt" if stale else "misses"] += 1
        return j

    def filled(self) -> int:
        """How many images are stored."""
        return int(np.count_nonzero(np.asarray(self.state) == 1))

    def flush(self) -> None:
        for a in (self.pixels, self.state, self.digest, self.stat):
            a.flush()


def cache_options(transforms: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``transforms.cache`` node as options (``{dir, dtype}``), or None when the cache is off."""
    c = transforms.get("cache")
    if not c:
        return None
    if isinstance(c, bool):
        c = {"enabled": True}
    c = {**default("transforms.cache"), **dict(c)}  # a partial node takes the other settings' defaults
    if not c["enabled"]:
        return None
    return {"dir": c["dir"], "dtype": str(c["dtype"])}


def cache_key(paths: Sequence[str], size: int, dtype: str) -> str:
    """The hash of everything that decides the cached pixels except the files' contents."""
    settings = {"version": CACHE_VERSION, "size": int(size), "dtype": dtype, "preprocessing": PREPROCESSING,
                "paths": hashlib.sha256("\n".join(map(str, paths)).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def open_cache(site_name: str, root: str | Path, manifest_path: str | Path, paths: Sequence[str], size: int, *,
               dir: str | None = None, dtype: str = "uint16") -> DecodeCache:
    """The site's cache for these settings (created if needed; one per folder in a process)."""
    base = Path(dir) if dir else Path(manifest_path).parent / "decode_cache"
    folder = base / f"{site_name}-{cache_key(paths, size, dtype)}"
    key = str(folder.resolve())
    if key not in _OPEN:
        _OPEN[key] = DecodeCache(root, paths, size, folder, dtype=dtype)
    return _OPEN[key]
