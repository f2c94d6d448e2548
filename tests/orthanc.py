"""A real PACS for the tests: Orthanc (Debian package ``orthanc``, plugin ``orthanc-dicomweb``) on 127.0.0.1.

:func:`start_orthanc` writes a temporary configuration (free ports, its own storage and index folders, no
remote access, no authentication, the DICOMweb plugin when it is installed), starts the ``Orthanc`` binary
and waits until its REST API answers. :class:`Orthanc` is the handle: ``rest()`` calls the REST API,
``add_modality()`` registers a DICOM peer (such as the raycxr node) at run time, ``stop()`` ends it.

Tests use the ``orthanc`` fixture in ``conftest.py``; it skips with one line where the binary is missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    """A running Orthanc: ``http`` (REST base URL), ``dicom_port``, ``ae_title``, ``dicomweb`` (URL or None)."""

    process: subprocess.Popen
    http: str
    dicom_port: int
    ae_title: str
    folder: Path
    dicomweb: str | None = None
    log: Path = field(default_factory=Path)

    def rest(self, path: str, method: str = "GET", body: Any = None, raw: bool = False) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.http + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = r.read()
        return payload if raw else (json.loads(payload) if payload else None)

    def add_modality(self, name: str, ae_title: str, port: int, host: str = "127.0.0.1") -> None:
        """Register a DICOM peer so Orthanc can send to it (C-STORE) and accept from it."""
        self.rest(f"/modalities/{name}", "PUT", {"AET": ae_title, "Host": host, "Port": port})

    def upload(self, dicom: bytes) -> dict[str, Any]:
        return self.rest("/instances", "POST", dicom)

    def instances(self) -> list[str]:
        return self.rest("/instances")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_orthanc(folder: Path, *, ae_title: str = "ORTHANC", timeout: float = 60.0) -> Orthanc:
    """Start Orthanc with its configuration, storage and log in ``folder``; raises RuntimeError if it fails."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError("the Orthanc binary is not installed (Debian package 'orthanc')")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config: dict[str, Any] = {
        "Name": "raycxr-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckModalityHost": False,
        "UnknownSopClassAccepted": True,
        "HttpsVerifyPeers": False,
        "ConcurrentJobs": 2,
        "StableAge": 1,
        "Plugins": [],
        "DicomModalities": {},
    }
    dicomweb = None
    if DICOMWEB_PLUGIN.exists():
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False,
                              "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
        dicomweb = f"http://127.0.0.1:{http_port}/dicom-web"
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen([binary, str(cfg)], stdout=out, stderr=subprocess.STDOUT, cwd=folder)
    pacs = Orthanc(process, f"http://127.0.0.1:{http_port}", dicom_port, ae_title, folder, dicomweb, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with code {process.returncode}: {log.read_text()[-2000:]}")
        try:
            pacs.rest("/system")
            return pacs
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    pacs.stop()
    raise RuntimeError(f"Orthanc did not answer on {pacs.http} within {timeout:g} s: {log.read_text()[-2000:]}")
