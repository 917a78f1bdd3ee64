"""Which code a node runs: a digest of fedtune's Python files, its strategies and its configs, computed the
same way from this installation and from a Flower app bundle (FAB), so that a site can check that a run ships
exactly the code it installed, and a long-lived worker (fedtune/worker.py) refuses to run a bundle that differs
from the code it has loaded."""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import fedtune
import strategies
from fedtune.config import conf_dir

# What runs on a node, as the bundle's paths start (pyproject.toml's fab-include, less the README).
_CODE = (("fedtune/", ".py"), ("strategies/", ".py"), ("conf/", ".yaml"))


def _is_code(path: str) -> bool:
    return any(path.startswith(prefix) and path.endswith(suffix) for prefix, suffix in _CODE)


def digest(files: Mapping[str, bytes]) -> str:
    """One SHA-256 over the code files among ``files`` (bundle path -> content), in path order."""
    total = hashlib.sha256()
    for path in sorted(p for p in files if _is_code(p)):
        total.update(hashlib.sha256(path.encode()).digest() + hashlib.sha256(files[path]).digest())
    return total.hexdigest()


def _tree(root: Path, prefix: str, suffix: str) -> Iterable[tuple[str, bytes]]:
    for path in sorted(root.rglob(f"*{suffix}")):
        if "__pycache__" not in path.parts:
            yield prefix + path.relative_to(root).as_posix(), path.read_bytes()


def installed_files() -> dict[str, bytes]:
    """This installation's code files under the paths a bundle gives them (a wheel's ``fedtune/conf`` is
    ``conf/``, as in the source tree the bundle is made from)."""
    package, conf = Path(fedtune.__file__).parent, conf_dir()
    files = {
        path: content
        for path, content in _tree(package, "fedtune/", ".py")
        if not path.startswith("fedtune/conf/")  # a wheel's copy of conf/ (YAML only, so never matched anyway)
    }
    files.update(_tree(Path(strategies.__file__).parent, "strategies/", ".py"))
    files.update(_tree(conf, "conf/", ".yaml"))
    return files


def bundle_files(fab: bytes) -> dict[str, bytes]:
    """The files of a Flower app bundle (a zip archive)."""
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        return {info.filename: archive.read(info) for info in archive.infolist() if not info.is_dir()}


def differences(installed: Mapping[str, bytes], shipped: Mapping[str, bytes]) -> list[str]:
    """The code paths that only one side has or that differ, sorted (for an error message)."""
    paths = {p for p in (*installed, *shipped) if _is_code(p)}
    return sorted(p for p in paths if installed.get(p) != shipped.get(p))
