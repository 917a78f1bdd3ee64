"""What identifies a base model by its content, wherever its files lie: part of the experiment hash.

Nodes load the base model from their own disks, each at its own path (node config ``model-path``), so a path
says nothing about what a node trains on. The experiment hash records instead the SHA-256 of the model
directory's files (weights, config, tokenizer): nodes whose copies are identical agree with the server; a
node with other weights, a corrupted download or another tokenizer composes another experiment and is
refused before it trains. A built-in model is identified by its name: the pinned package that ships it
fixes its files.

Hashing gigabytes takes a while (SHA-256 at about 0.8 GB/s on a 2-core machine), and Flower's default
isolation starts a process per message, so digests are kept in ``$FEDTUNE_CACHE/model-fingerprints.json`` on
the node's own disk, keyed by each file's path, size and modification time (as ``git`` trusts its index): a
file changed in place gets a new modification time and is hashed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedtune.assets import BUILTIN_PREFIX, cache_dir
from fedtune.files import atomic_write

# The files that determine what a Hugging Face model directory computes; READMEs, licences and code do not.
_MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".gguf")
_CACHE_NAME = "model-fingerprints.json"
_KNOWN: dict[tuple[tuple[str, int, int], ...], str] = {}  # this process's digests, by the files' stamps


def fingerprint(directory: Path) -> str:
    """SHA-256 over the names, sizes and contents of the model files directly in ``directory``.

    Raises:
        ValueError: ``directory`` holds no model files.
    """
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _MODEL_FILE_SUFFIXES)
    if not files:
        raise ValueError(f"{directory} holds no model files ({', '.join(_MODEL_FILE_SUFFIXES)}).")
    stamps = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if stamps not in _KNOWN:  # every message composes the experiment: look at the files only once
        _KNOWN[stamps] = _digest(files, stamps)
    return _KNOWN[stamps]


def _digest(files: list[Path], stamps: tuple[tuple[str, int, int], ...]) -> str:
    cache_path = cache_dir() / _CACHE_NAME
    cache = _read_cache(cache_path)
    total, changed = hashlib.sha256(), False
    for path, (key, size, mtime) in zip(files, stamps, strict=True):
        kept = cache.get(key)
        if kept is None or kept["stamp"] != [size, mtime]:
            with open(path, "rb") as handle:
                kept = {"stamp": [size, mtime], "sha256": hashlib.file_digest(handle, "sha256").hexdigest()}
            cache[key], changed = kept, True
        total.update(f"{path.name}\0{size}\0{kept['sha256']}\n".encode())
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
