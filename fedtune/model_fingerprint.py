"""What identifies a base model by its content, wherever its files lie: part of the experiment hash.

Nodes load the base model from their own disks, each at its own path (node config ``model-path``), so a path
says nothing about what a node trains on. The experiment hash records instead the SHA-256 of the model
directory's files (weights, config, tokenizer, chat template: every file but READMEs, licences and hidden
ones): nodes whose copies are identical agree with the server; a node with other weights, a corrupted
download or another tokenizer composes another experiment and is refused before it trains. A built-in
model is identified by its name: the pinned package that ships it fixes its files.

Hashing gigabytes takes a while (SHA-256 at about 0.8 GB/s on a 2-core machine), and Flower's default
isolation starts a process per message, so digests are kept in ``$FEDTUNE_CACHE/model-fingerprints.json`` on
the node's own disk, keyed by each file's path, size, modification and change times, device and inode (as
``git`` trusts its index; copying tools keep the size and modification time, not the rest): a file changed
in place is hashed again.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from fedtune.assets import BUILTIN_PREFIX, cache_dir
from fedtune.files import atomic_write

# Files that say nothing about what the model computes; every other file counts (weights, config, tokenizer,
# chat templates, subfolders): hashing too much costs a visible refusal, too little a silent divergence.
_IGNORED_NAMES = (".gitattributes", ".DS_Store")
_IGNORED_PREFIXES = ("README", "LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
_CACHE_NAME = "model-fingerprints.json"
_RECENT_NS = 2_000_000_000  # a file written in the last 2 s may still change within one timestamp tick
Stamp = tuple[str, str, int, int, int, int, int]  # relative name, resolved path, size, mtime, ctime, device, inode
_KNOWN: dict[tuple[Stamp, ...], str] = {}  # this process's digests, by the files' stamps


def model_files(directory: Path) -> list[Path]:
    """The files under ``directory`` that the fingerprint covers: all but READMEs, licences and hidden files."""
    files = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or path.name in _IGNORED_NAMES:
            continue
        if path.is_file() and not path.name.upper().startswith(_IGNORED_PREFIXES):
            files.append(path)
    return files


def fingerprint(directory: Path) -> str:
    """SHA-256 over the relative names, sizes and contents of :func:`model_files`.

    Raises:
        ValueError: ``directory`` holds no such files.
    """
    files = model_files(directory)
    if not files:
        raise ValueError(f"{directory} holds no model files.")
    stamps = tuple(_stamp(directory, path) for path in files)
    if stamps not in _KNOWN:  # every message composes the experiment: read the files once per process
        _KNOWN[stamps] = _digest(files, stamps)
    return _KNOWN[stamps]


def _stamp(directory: Path, path: Path) -> Stamp:
    # ctime, device and inode cannot be set by copying tools (rsync -a and cp -p keep size and mtime)
    status = path.stat()
    return (
        path.relative_to(directory).as_posix(),
        str(path.resolve()),
        status.st_size,
        status.st_mtime_ns,
        status.st_ctime_ns,
        status.st_dev,
        status.st_ino,
    )


def _digest(files: list[Path], stamps: tuple[Stamp, ...]) -> str:
    cache_path = cache_dir() / _CACHE_NAME
    cache = _read_cache(cache_path)
    total, changed, now = hashlib.sha256(), False, time.time_ns()
    for path, (name, key, size, *when) in zip(files, stamps, strict=True):
        kept = cache.get(key)
        if not (isinstance(kept, dict) and kept.get("stamp") == [size, *when] and isinstance(kept.get("sha256"), str)):
            with open(path, "rb") as handle:
                kept = {"stamp": [size, *when], "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
            if now - max(when[0], when[1]) > _RECENT_NS:  # not a file that may still be written
                cache[key], changed = kept, True
        total.update(f"{name}\0{size}\0{kept['sha256']}\n".encode())
    if changed:
        atomic_write(cache_path, json.dumps(cache, sort_keys=True).encode())
    return total.hexdigest()


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        cache = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none yet, or torn by a crash elsewhere: hash again
        return {}
    return cache if isinstance(cache, dict) else {}


def model_identity(model_path: str) -> str:
    """What the experiment hash records for ``model.path``: a built-in's name, or ``sha256:<fingerprint>`` of
    a local directory's files."""
    if model_path.startswith(BUILTIN_PREFIX):
        return model_path
    return f"sha256:{fingerprint(Path(model_path))}"
