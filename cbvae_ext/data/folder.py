"""The dataset folder as a set of files: its format marker, file checksums, the output lock and the swap-in.

Reading side: ``read_manifest`` checks the format marker and version; ``file_checksums`` records each
dataset file's size and sha256 in ``manifest.json`` at build time and ``verify_files`` compares them
whenever a folder is opened, so a file edited after the build (a re-sorted ``metadata.parquet``, a
truncated ``maps.npy``) is refused instead of silently pairing maps with another study's metadata.
``maps.npy`` is large (about 3.7 GB for the full v7 build), so opening checks its size and a hash of
``SAMPLE_BLOCKS`` evenly spaced blocks; its full sha256 is recorded too (``python -m cbvae_ext.data
info`` checks it).

Writing side: ``output_lock`` holds an exclusive ``fcntl.flock`` on ``.OUT.lock`` beside ``OUT`` for a
whole build (the kernel releases it when the process exits or is killed), so a second build into the
same ``OUT`` is refused; under it, the temporary ``.OUT.partial-*`` and ``.OUT.old-*`` siblings are
provably stale and are cleaned (``clean_stale``). A symlinked ``OUT`` is resolved first
(``resolve_out``): the target folder is replaced and the link stays.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import DataError
from .sources import file_sha256

__all__ = [
    "DATASET_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "OPTIONAL_FILES",
    "SAMPLE_BLOCKS",
    "HashingWriter",
    "check_dataset_files",
    "clean_stale",
    "file_checksums",
    "is_ours",
    "output_lock",
    "read_manifest",
    "rebuild_fix",
    "resolve_out",
    "sampled_sha256",
    "verify_files",
]

logger = logging.getLogger(__name__)

DATASET_FILES = ("maps.npy", "metadata.parquet", "mask.nii.gz", "manifest.json")
#: Files a build may add (``terms.npz``: NeuroQuery's term tf-idf, with ``neuroquery_dir``).
OPTIONAL_FILES = ("terms.npz",)
#: Format marker and version of a dataset folder's manifest. 2 added the topic columns; 3 the file checksums
#: (``files``), the schema fingerprint and the kernel's ``kernel_fwhm_mm`` (was ``fwhm_mm``).
FORMAT_NAME = "cbvae-dataset"
FORMAT_VERSION = 3
#: Files hashed only by sample when a folder is opened (full sha256 by ``data info``).
_SAMPLED = ("maps.npy",)
#: Blocks of ``_BLOCK`` bytes hashed from a sampled file: evenly spaced from its first to its last byte.
SAMPLE_BLOCKS = 4096
_BLOCK = 4096


def rebuild_fix(path: Path) -> str:
    return f"rebuild it: python -m cbvae_ext.data build --out {path} --force (with the options it was built with)"


def sampled_sha256(path: Path) -> str:
    """sha256 of a file's size and ``SAMPLE_BLOCKS`` evenly spaced blocks (the whole file when it is small)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * _BLOCK:
            digest.update(f.read())
        else:
            for offset in np.linspace(0, size - _BLOCK, SAMPLE_BLOCKS).astype(np.int64):
                f.seek(int(offset))
                digest.update(f.read(_BLOCK))
    return digest.hexdigest()


class HashingWriter:
    """A binary file that hashes what is written through it (``maps.npy``'s full sha256 without re-reading it)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.digest = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        return self.f.write(data)


def file_checksums(folder: Path, names: list[str], known: Mapping[str, str] | None = None) -> dict[str, dict]:
    """``{name: {"size", "sha256"[, "sampled_sha256"]}}`` of the dataset files in ``folder``.

    Args:
        folder: the (temporary) dataset folder.
        names: the files to record.
        known: full sha256 already computed while writing, by name (skips re-reading the file).
    """
    out = {}
    for name in names:
        path = folder / name
        record: dict[str, Any] = {"size": path.stat().st_size, "sha256": (known or {}).get(name) or file_sha256(path)}
        if name in _SAMPLED:
            record["sampled_sha256"] = sampled_sha256(path)
        out[name] = record
    return out


def verify_files(path: Path, manifest: Mapping[str, Any], full: bool = False) -> None:
    """Compare the folder's files with the checksums in its manifest.

    Args:
        path: dataset folder.
        manifest: its ``manifest.json`` (already checked by ``read_manifest``).
        full: hash ``maps.npy`` whole instead of by sample (seconds for a full build).

    Raises:
        DataError: a file is missing, or its size or checksum differs from the manifest's.
    """
    for name in OPTIONAL_FILES:
        if name not in manifest["files"] and (path / name).exists():
            raise DataError(
                f"dataset folder {path} holds {name}, which its manifest.json does not list (added after the build); "
                f"remove it, or {rebuild_fix(path)}"
            )
    for name, record in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise DataError(f"dataset folder {path} lacks {name}, which its manifest.json lists; {rebuild_fix(path)}")
        size = file.stat().st_size
        if size != record["size"]:
            changed = f"is {size} bytes where manifest.json records {record['size']}"
        elif name in _SAMPLED and not full:
            changed = "" if sampled_sha256(file) == record["sampled_sha256"] else "has another sampled sha256"
        else:
            changed = "" if file_sha256(file) == record["sha256"] else "has another sha256"
        if changed:
            if changed.startswith("has"):
                changed += " than manifest.json records"
            raise DataError(f"dataset folder {path}: {name} {changed} (edited after the build); {rebuild_fix(path)}")


def _bad_manifest(path: Path, why: str) -> DataError:
    return DataError(f"dataset folder {path} has a malformed manifest.json ({why}); {rebuild_fix(path)}")


def read_manifest(path: Path) -> dict[str, Any]:
    """``manifest.json`` of a dataset folder of the current format, its entries type-checked.

    Raises:
        DataError: unreadable JSON, not a dataset manifest, another format version, or malformed entries.
    """
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(
            f"dataset folder {path} has an unreadable manifest.json ({str(err).splitlines()[0]}); {rebuild_fix(path)}"
        ) from err
    if not isinstance(manifest, dict) or not is_ours_manifest(manifest):
        raise DataError(f"{path / 'manifest.json'} is not a cbvae dataset manifest; {rebuild_fix(path)}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise DataError(
                f"dataset folder {path} has format version {version}, newer than this cbvae_ext reads "
                f"({FORMAT_VERSION}); update cbvae_ext or {rebuild_fix(path)}"
            )
        raise DataError(
            f"dataset folder {path} has format version {version!r}, from an older cbvae_ext (this one reads "
            f"{FORMAT_VERSION}: file checksums, schema fingerprint); {rebuild_fix(path)}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not set(DATASET_FILES[:3]) <= files.keys():
        raise _bad_manifest(path, f"'files' must list {', '.join(DATASET_FILES[:3])}")
    for name, record in files.items():
        if name not in DATASET_FILES + OPTIONAL_FILES or not isinstance(record, dict):
            raise _bad_manifest(path, f"'files' entry {name!r}")
        wanted = ("size", "sha256", "sampled_sha256") if name in _SAMPLED else ("size", "sha256")
        if not all(isinstance(record.get(k), int if k == "size" else str) for k in wanted):
            raise _bad_manifest(path, f"'files' entry {name!r} needs {', '.join(wanted)}")
    for key, kind in (("schema", dict), ("n_maps", int), ("grid", dict), ("kernel", dict), ("cache_key", str)):
        if not isinstance(manifest.get(key), kind):
            raise _bad_manifest(path, f"'{key}' must be a {kind.__name__}")
    return manifest


def check_dataset_files(path: str | Path, full_check: bool = False) -> dict[str, Any]:
    """The manifest of a dataset folder of this format whose files match their recorded checksums.

    For readers that open a dataset's files themselves (``load_dataset_info`` calls it first).

    Args:
        path: dataset folder.
        full_check: hash ``maps.npy`` whole instead of its size and sampled hash.

    Raises:
        DataError: one line naming the file and the fix (rebuild).
    """
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest, full=full_check)
    return manifest


def is_ours_manifest(manifest: Mapping[str, Any]) -> bool:
    """Whether a parsed manifest was written by this builder (any format version).

    Format-1 folders predate the marker: they are recognised by ``format_version`` 1 together with the
    builder's ``cache_key``, ``grid`` and ``schema`` entries.
    """
    if manifest.get("format") == FORMAT_NAME:
        return True
    return manifest.get("format_version") == 1 and {"cache_key", "grid", "schema"} <= manifest.keys()


def is_ours(out: Path) -> bool:
    """Whether ``out`` is provably a dataset folder written by this builder (its manifest's format marker)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and is_ours_manifest(manifest)


def resolve_out(out: Path) -> Path:
    """The folder a build writes: ``out`` itself, or the target of a symlinked ``out`` (the link is kept)."""
    return Path(os.path.realpath(out)) if out.is_symlink() else out


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.OUT.lock`` beside ``out`` exclusively for a build; refuse when another build holds it.

    The lock file is removed on exit. A process that opened it just before it was removed would lock an
    orphaned file, so the lock only counts when the path still names the locked file.

    Raises:
        DataError: another build holds the lock, or the parent folder is not writable.
    """
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise DataError(
                    f"another build is writing {out} (process {holder}, lock {path.name}); wait for it to finish "
                    "or choose another --out"
                ) from None
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError as err:
        raise DataError(f"output folder {out.parent} is not writable ({err.strerror}); choose another --out") from err
    try:
        yield
    finally:
        with suppress(OSError):
            os.unlink(path)
        os.close(fd)


def clean_stale(out: Path) -> None:
    """Under the output lock: drop every ``.OUT.partial-*`` left by a killed build, and undo a build killed
    between its two renames (``out`` moved aside to ``.OUT.old-*``): put the previous build back, or drop it.
    """
    for stale in sorted(out.parent.glob(f".{out.name}.partial-*")):
        _remove(stale)
        logger.info("removed %s, left by an interrupted build", stale.name)
    for stale in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists() and not stale.is_symlink() and is_ours(stale):
            stale.rename(out)
            logger.warning("restored %s from %s, left by an interrupted build", out, stale.name)
        else:
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_symlink():  # older builds moved a symlinked OUT aside as a link
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)
