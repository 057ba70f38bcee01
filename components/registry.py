"""The model registry: versioned model packages, a ``production`` pointer and a history.

Layout under the registry root (a local folder or any fsspec URI such as ``s3://bucket/reg``)::

    models/<version>/        config.json, model.safetensors, metrics.json, registry.json
    production.json          which version serves, since when, who promoted it, on what metrics
    history.jsonl            one JSON line per event: registered, promoted, rejected, rolled back

A version is ``<UTC time>-<first 10 hex of the weights' SHA-256>``; registering the same
weights twice returns the existing version. ``registry.json`` is written last, so a version
without it is an interrupted copy and is never listed. ``production.json`` is replaced in one
step (``os.replace`` locally, a single-object put on object stores), so readers see the old
pointer or the new one, never half of one.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec

from model.package_files import CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE

PACKAGE_FILES = (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, "train_metrics.json")
RECORD_FILE = "registry.json"
PRODUCTION_FILE = "production.json"
HISTORY_FILE = "history.jsonl"


class RegistryError(RuntimeError):
    """A version is unknown or incomplete, or the registry cannot be written."""


def default_actor() -> str:
    """Who acts, for the history: ``user@host``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelRegistry:
    """Model packages by version, on a local folder or an fsspec URI."""

    def __init__(self, root: str | Path) -> None:
        self.uri = str(root)
        self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        self.local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )
        self.fs.makedirs(self._path("models"), exist_ok=True)

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    # ---- versions ---------------------------------------------------------------------

    def versions(self) -> list[str]:
        """Every complete version, oldest first."""
        found = []
        for entry in self.fs.ls(self._path("models"), detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if self.fs.exists(self._path("models", name, RECORD_FILE)):
                found.append(name)
        return sorted(found)

    def record(self, version: str) -> dict[str, Any]:
        """What ``registry.json`` says of a version."""
        path = self._path("models", version, RECORD_FILE)
        if not self.fs.exists(path):
            known = ", ".join(self.versions()) or "none"
            raise RegistryError(f"no model version {version!r} in {self.uri} (known: {known})")
        return json.loads(self.fs.cat_file(path))

    def register(
        self,
        package_dir: str | Path,
        *,
        metrics: dict[str, Any] | None = None,
        run_id: str | None = None,
        actor: str | None = None,
    ) -> str:
        """Copy a model package in and return its version (the existing one for known
        weights)."""
        package_dir = Path(package_dir)
        weights = package_dir / WEIGHTS_FILE
        if not weights.is_file() or not (package_dir / CONFIG_FILE).is_file():
            raise RegistryError(f"{package_dir} is not a model package (config + weights)")
        sha = _sha256(weights)
        for version in self.versions():
            if version.endswith(f"-{sha[:10]}"):
                return version
        version = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{sha[:10]}"
        target = self._path("models", version)
        self.fs.makedirs(target, exist_ok=True)
        for name in PACKAGE_FILES:
            source = package_dir / name
            if source.is_file():
                self.fs.put_file(str(source), self._path("models", version, name))
        record = {
            "version": version,
            "sha256": sha,
            "registered_at": _now(),
            "registered_by": actor or default_actor(),
            "source": str(package_dir.resolve()),
            "run_id": run_id,
            "metrics": metrics or {},
        }
        self._write_json(self._path("models", version, RECORD_FILE), record)
        self._append_history({"event": "registered", "version": version, "run_id": run_id})
        return version

    def package_path(self, version: str, cache_dir: str | Path | None = None) -> Path:
        """A local folder holding the version's package: the registry's own folder when it is
        local, else a copy downloaded into ``cache_dir``."""
        self.record(version)  # raises for unknown versions
        source = self._path("models", version)
        if self.local:
            return Path(source)
        if cache_dir is None:
            raise RegistryError(f"registry {self.uri} is remote: give a cache_dir to download")
        target = Path(cache_dir) / version
        if not (target / RECORD_FILE).is_file():
            target.mkdir(parents=True, exist_ok=True)
            for name in [*PACKAGE_FILES, RECORD_FILE]:
                remote = f"{source}/{name}"
                if self.fs.exists(remote):
                    self.fs.get_file(remote, str(target / name))
        return target

    # ---- production pointer and history ------------------------------------------------

    def production(self) -> dict[str, Any] | None:
        """The production pointer (``version``, ``promoted_at``, ``promoted_by``, ``metrics``,
        ``decision``), or None before the first promotion."""
        path = self._path(PRODUCTION_FILE)
        if not self.fs.exists(path):
            return None
        return json.loads(self.fs.cat_file(path))

    def production_version(self) -> str | None:
        pointer = self.production()
        return None if pointer is None else pointer["version"]

    def promote(
        self,
        version: str,
        *,
        metrics: dict[str, Any] | None = None,
        decision: dict[str, Any] | None = None,
        run_id: str | None = None,
        actor: str | None = None,
    ) -> dict[str, Any]:
        """Point ``production`` at ``version`` and record who did it and why."""
        self.record(version)
        previous = self.production_version()
        pointer = {
            "version": version,
            "previous": previous,
            "promoted_at": _now(),
            "promoted_by": actor or default_actor(),
            "run_id": run_id,
            "metrics": metrics or {},
            "decision": decision or {},
        }
        if previous != version:
            self._write_json(self._path(PRODUCTION_FILE), pointer)
            self._append_history(
                {"event": "promoted", "version": version, "previous": previous, "run_id": run_id}
                | {"by": pointer["promoted_by"], "metrics": pointer["metrics"]}
            )
        return self.production() or pointer

    def reject(
        self,
        version: str,
        *,
        reasons: list[str],
        run_id: str | None = None,
        actor: str | None = None,
    ) -> None:
        """Record that the gate refused ``version`` and why."""
        self._append_history(
            {"event": "rejected", "version": version, "reasons": reasons, "run_id": run_id}
            | {"by": actor or default_actor()}
        )

    def history(self) -> list[dict[str, Any]]:
        """Every event, oldest first."""
        path = self._path(HISTORY_FILE)
        if not self.fs.exists(path):
            return []
        text = self.fs.cat_file(path).decode()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # ---- writing -------------------------------------------------------------------------

    def _write_json(self, path: str, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, indent=2, sort_keys=True) + "\n"
        if self.local:  # write beside, then rename over: readers never see half a file
            directory = os.path.dirname(path)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as handle:
                handle.write(data)
            os.replace(tmp, path)
        else:  # one object put is atomic on object stores
            self.fs.pipe_file(path, data.encode())

    def _append_history(self, event: dict[str, Any]) -> None:
        line = json.dumps({"at": _now(), **event}, sort_keys=True) + "\n"
        path = self._path(HISTORY_FILE)
        if self.local:
            with open(path, "a") as handle:
                handle.write(line)
        else:  # object stores cannot append: read, add, put (one writer per night)
            old = self.fs.cat_file(path) if self.fs.exists(path) else b""
            self.fs.pipe_file(path, old + line.encode())
