"""Pytest plugin: a real Azurite blob service for tests.

Enable with ``pytest_plugins = ["tests.azurite"]`` in ``tests/conftest.py``.
Azurite comes from the repo's ``package.json`` (``npm ci`` -> ./node_modules).

Fixtures:
- ``azurite`` (session): starts ``node_modules/.bin/azurite-blob`` on a free
  127.0.0.1 port (in-memory, silent), yields an :class:`AzuriteServer`.
- ``azure_container`` (function): a fresh, uniquely named container; yields an
  :class:`AzureContainer` (a ``str`` equal to the container name, with
  ``.name`` and ``.connection_string``), deleted afterwards.

When Azurite is missing or fails to start, tests are skipped with the reason,
except under ``CI=true`` where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
AZURITE_BLOB = ROOT / "node_modules" / ".bin" / "azurite-blob"
ACCOUNT_NAME = "devstoreaccount1"
# Azurite's well-known development key (public, documented by Microsoft; not a secret)
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
START_TIMEOUT_S = 30.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"Azurite is required in CI (CI=true): {reason}", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class AzuriteServer:
    host: str
    port: int
    account_name: str = ACCOUNT_NAME
    account_key: str = ACCOUNT_KEY

    @property
    def blob_endpoint(self) -> str:
        return f"http://{self.host}:{self.port}/{self.account_name}"

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;"
            f"AccountName={self.account_name};"
            f"AccountKey={self.account_key};"
            f"BlobEndpoint={self.blob_endpoint};"
        )


class AzureContainer(str):
    """The container name (a ``str``) plus how to reach it."""

    connection_string: str

    def __new__(cls, name: str, connection_string: str) -> AzureContainer:
        obj = super().__new__(cls, name)
        obj.connection_string = connection_string
        return obj

    @property
    def name(self) -> str:
        return str(self)


def _wait_until_up(proc: subprocess.Popen, port: int, log_path: Path) -> str | None:
    """None when Azurite answers HTTP, else the reason it did not."""
    deadline = time.monotonic() + START_TIMEOUT_S
    url = f"http://127.0.0.1:{port}/{ACCOUNT_NAME}?comp=list"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"azurite-blob exited with code {proc.returncode}: {_tail(log_path)}"
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return None
        except urllib.error.HTTPError:
            return None  # any HTTP answer (e.g. 403 without auth) means it is up
        except OSError:
            time.sleep(0.1)
    return f"azurite-blob did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f}s: {_tail(log_path)}"


def _tail(path: Path, limit: int = 800) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return "(no output)"
    return text[-limit:] or "(no output)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="session")
def azurite() -> Iterator[AzuriteServer]:
    binary = Path(os.environ.get("AZURITE_BLOB_BIN", AZURITE_BLOB))
    if not binary.exists():
        _unavailable(
            f"Azurite not installed ({binary} missing); run `npm ci` (or `npm install`) in {ROOT}"
        )
    if shutil.which("node") is None:
        _unavailable("Azurite needs Node.js, and `node` is not on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="azurite-"))
    log_path = workdir / "azurite.log"
    proc = None
    reason = None
    for _attempt in range(3):  # a free port can be taken between probe and bind
        port = _free_port()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    str(binary),
                    "--blobHost", "127.0.0.1",
                    "--blobPort", str(port),
                    "--skipApiVersionCheck",
                    "--disableTelemetry",
                    "--inMemoryPersistence",
                    "--silent",
                    "--loose",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        reason = _wait_until_up(proc, port, log_path)
        if reason is None:
            break
        _stop(proc)
        proc = None
    if proc is None:
        shutil.rmtree(workdir, ignore_errors=True)
        _unavailable(f"Azurite failed to start: {reason}")
    try:
        yield AzuriteServer(host="127.0.0.1", port=port)
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def azure_container(azurite: AzuriteServer) -> Iterator[AzureContainer]:
    from azure.storage.blob import BlobServiceClient

    name = f"test-{uuid.uuid4().hex[:20]}"
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    service.create_container(name)
    try:
        yield AzureContainer(name, azurite.connection_string)
    finally:
        try:
            service.delete_container(name)
        except Exception:
            pass
        service.close()
