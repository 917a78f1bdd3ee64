"""What code a node runs (fedtune/app_code.py): the bundle `flwr run` ships of this repository has the digest
of the installed code, and any change to its code, however small, changes the digest and is named."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from fedtune import app_code

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rewritten(fab: bytes, path: str, content: bytes) -> bytes:
    """The bundle with ``path`` holding ``content`` instead."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as source, zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            target.writestr(info, content if info.filename == path else source.read(info))
    return out.getvalue()


def test_the_bundle_of_this_repository_carries_the_installed_code() -> None:
    fab = build_fab_from_disk(REPO_ROOT)
    installed, shipped = app_code.installed_files(), app_code.bundle_files(fab)
    assert app_code.digest(shipped) == app_code.digest(installed)
    assert {"fedtune/client_app.py", "strategies/fedavg.py", "conf/config.yaml"} <= set(shipped)

    changed = app_code.bundle_files(_rewritten(fab, "fedtune/client_app.py", shipped["fedtune/client_app.py"] + b"#"))
    assert app_code.digest(changed) != app_code.digest(installed)
    assert app_code.differences(installed, changed) == ["fedtune/client_app.py"]
    docs = app_code.bundle_files(_rewritten(fab, "README.md", b"other words"))
    assert app_code.digest(docs) == app_code.digest(installed)  # documentation is not code that runs

    missing = {path: content for path, content in shipped.items() if path != "strategies/median.py"}
    assert app_code.differences(installed, missing) == ["strategies/median.py"]
