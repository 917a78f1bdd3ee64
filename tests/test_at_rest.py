"""Encryption at rest of adapters and checkpoints: round trips, tamper detection, key handling, the CLI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from fedtune import cli
from fedtune.ledger import Ledger
from fedtune.run_dir import Checkpoint, RunDir
from fedtune.secure import at_rest
from fedtune.secure.at_rest import HEADER, DecryptionError
from fedtune.secure.identity import Identity

MARKER = b"PATIENT-RECORD-MARKER-" + bytes(range(42))  # 64 distinctive bytes
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _secret_file(tmp_path: Path, name: str = "adapter_model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(b"header" + MARKER * 3 + b"trailer")
    return path


def _encrypted(tmp_path: Path) -> tuple[Path, bytes]:
    source = _secret_file(tmp_path)
    plaintext = source.read_bytes()
    [target] = at_rest.encrypt_path(source, KEY, remove_source=True)
    return target, plaintext


def test_round_trip_restores_the_bytes_and_removes_sources_on_request(tmp_path: Path) -> None:
    target, plaintext = _encrypted(tmp_path)
    assert (
        target == tmp_path / "adapter_model.safetensors.enc" and not (tmp_path / "adapter_model.safetensors").exists()
    )
    assert target.read_bytes().startswith(HEADER)
    assert at_rest.decrypt_path(target, KEY, remove_source=True) == [tmp_path / "adapter_model.safetensors"]
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == plaintext and not target.exists()


def test_checkpoint_written_by_run_dir_loads_back_equal(tmp_path: Path) -> None:
    adapter = {"layer.lora_A.weight": torch.randn(4, 8), "layer.lora_B.weight": torch.randn(8, 4)}
    saved = RunDir(tmp_path / "run")
    saved.checkpoints.mkdir(parents=True)
    path = saved.save_checkpoint(Checkpoint(3, adapter, {"momentum": [1.0, 2.0]}, "hash"))
    assert at_rest.encrypt_path(saved.checkpoints, KEY, remove_source=True) == [path.with_name(path.name + ".enc")]
    assert list(saved.checkpoints.iterdir()) == [path.with_name(path.name + ".enc")]
    at_rest.decrypt_path(saved.checkpoints, KEY)
    loaded = RunDir(tmp_path / "run").latest_checkpoint("hash")
    assert loaded.round == 3 and loaded.strategy_state == {"momentum": [1.0, 2.0]}
    assert loaded.adapter.keys() == adapter.keys()
    assert all(torch.equal(loaded.adapter[name], tensor) for name, tensor in adapter.items())


def test_directory_with_two_files_and_a_subdirectory(tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    (folder / "nested").mkdir(parents=True)
    contents = {folder / "adapter_config.json": b'{"r": 8}', folder / "nested" / "weights.bin": MARKER}
    for path, data in contents.items():
        path.write_bytes(data)
    written = at_rest.encrypt_path(folder, KEY)
    assert sorted(written) == sorted(path.with_name(path.name + ".enc") for path in contents)
    assert at_rest.encrypt_path(folder, KEY) == sorted(written)  # .enc files are never encrypted again
    for path in contents:
        path.unlink()
    assert sorted(at_rest.decrypt_path(folder, KEY)) == sorted(contents)
    assert {path: path.read_bytes() for path in contents} == contents


def test_ciphertext_hides_the_plaintext_and_every_encryption_uses_a_fresh_nonce(tmp_path: Path) -> None:
    source = _secret_file(tmp_path)
    at_rest.encrypt_file(source, tmp_path / "a.enc", KEY)
    at_rest.encrypt_file(source, tmp_path / "b.enc", KEY)
    first, second = (tmp_path / "a.enc").read_bytes(), (tmp_path / "b.enc").read_bytes()
    assert MARKER not in first and MARKER[:16] not in first
    assert first != second and first[len(HEADER) : len(HEADER) + 12] != second[len(HEADER) : len(HEADER) + 12]
    assert len(first) == len(HEADER) + 12 + source.stat().st_size + 16


def test_wrong_key_raises_and_writes_nothing(tmp_path: Path) -> None:
    target, _ = _encrypted(tmp_path)
    with pytest.raises(DecryptionError, match="could not be decrypted: wrong key or the file was modified"):
        at_rest.decrypt_path(target, OTHER_KEY, remove_source=True)
    assert sorted(tmp_path.iterdir()) == [target]  # no plaintext, no temporary file, ciphertext kept


@pytest.mark.parametrize("part", ["header", "nonce", "ciphertext", "tag"])
def test_one_flipped_byte_anywhere_is_detected(tmp_path: Path, part: str) -> None:
    target, _ = _encrypted(tmp_path)
    data = bytearray(target.read_bytes())
    offset = {"header": 3, "nonce": len(HEADER) + 5, "ciphertext": len(HEADER) + 12 + 10, "tag": len(data) - 1}[part]
    data[offset] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(DecryptionError):
        at_rest.decrypt_path(target, KEY)
    assert sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("keep", [1, len(HEADER) + 20, -1])
def test_truncated_file_is_detected(tmp_path: Path, keep: int) -> None:
    target, _ = _encrypted(tmp_path)
    target.write_bytes(target.read_bytes()[:keep])
    with pytest.raises(DecryptionError):
        at_rest.decrypt_path(target, KEY)
    assert sorted(tmp_path.iterdir()) == [target]


def test_a_file_in_another_format_is_named_as_such(tmp_path: Path) -> None:
    target = _secret_file(tmp_path, "adapter_model.safetensors.enc")
    with pytest.raises(DecryptionError, match="not a fedtune-encrypted file"):
        at_rest.decrypt_path(target, KEY)


def test_paths_with_nothing_to_do_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        at_rest.encrypt_path(tmp_path / "missing", KEY)
    with pytest.raises(FileNotFoundError, match="no .enc files"):
        at_rest.decrypt_path(tmp_path, KEY)
    with pytest.raises(ValueError, match="lacks the .enc suffix"):
        at_rest.decrypt_path(_secret_file(tmp_path), KEY)


def test_keygen_writes_a_0600_key_and_never_overwrites(tmp_path: Path) -> None:
    key_file = tmp_path / "fedtune.key"
    at_rest.generate_key(key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key = at_rest.load_key(key_file=key_file)
    assert len(key) == 32
    with pytest.raises(FileExistsError, match="never overwritten"):
        at_rest.generate_key(key_file)
    assert at_rest.load_key(key_file=key_file) == key
    at_rest.generate_key(tmp_path / "second.key")
    assert at_rest.load_key(key_file=tmp_path / "second.key") != key


def test_key_from_an_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_TEST_KEY", KEY.hex() + "\n")
    assert at_rest.load_key(key_env="FEDTUNE_TEST_KEY") == KEY
    monkeypatch.delenv("FEDTUNE_TEST_KEY")
    with pytest.raises(ValueError, match="environment variable FEDTUNE_TEST_KEY is not set"):
        at_rest.load_key(key_env="FEDTUNE_TEST_KEY")


@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"), ("zz" * 32, "hex-encoded"), ("ab" * 16, "16-byte key")],
)
def test_bad_key_files_are_named_without_showing_their_content(tmp_path: Path, content: str, message: str) -> None:
    key_file = tmp_path / "bad.key"
    key_file.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        at_rest.load_key(key_file=key_file)
    assert str(key_file) in str(error.value) and (not content or content not in str(error.value))


def test_exactly_one_key_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        at_rest.load_key()
    with pytest.raises(ValueError, match="exactly one"):
        at_rest.load_key(key_file=tmp_path / "k", key_env="K")
    with pytest.raises(ValueError, match="does not exist; create one with `fedtune keygen"):
        at_rest.load_key(key_file=tmp_path / "k")


def test_cli_round_trip_never_prints_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "fedtune.key"
    assert cli.main(["keygen", str(key_file)]) == 0
    key_hex = key_file.read_text().strip()
    folder = tmp_path / "adapter"
    folder.mkdir()
    _secret_file(folder)
    assert cli.main(["encrypt", str(folder), "--key-file", str(key_file), "--remove-plaintext"]) == 0
    assert [path.name for path in folder.iterdir()] == ["adapter_model.safetensors.enc"]
    monkeypatch.setenv("FEDTUNE_KEY", key_hex)
    assert cli.main(["decrypt", str(folder), "--key-env", "FEDTUNE_KEY", "--remove-encrypted"]) == 0
    assert [path.name for path in folder.iterdir()] == ["adapter_model.safetensors"]
    assert cli.main(["keygen", str(key_file)]) == 1
    assert cli.main(["decrypt", str(folder), "--key-env", "FEDTUNE_MISSING"]) == 1
    output = capsys.readouterr()
    assert output.out.splitlines()[1:] == [
        str(folder / "adapter_model.safetensors.enc"),
        str(folder / "adapter_model.safetensors"),
    ]
    assert "fedtune: " in output.err and "FEDTUNE_MISSING" in output.err
    for text in (output.out, output.err):
        assert key_hex not in text and key_hex.upper() not in text


def test_cli_wrong_key_exits_1_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target, _ = _encrypted(tmp_path)
    wrong = tmp_path / "wrong.key"
    wrong.write_text(OTHER_KEY.hex())
    assert cli.main(["decrypt", str(target), "--key-file", str(wrong)]) == 1
    output = capsys.readouterr()
    assert output.out == ""
    plain = target.name.removesuffix(".enc")
    assert output.err == (
        f"fedtune: {target} could not be decrypted: wrong key or the file was modified "
        f"(or it is not this run's {plain}: moved, swapped or from another run).\n"
    )
    assert OTHER_KEY.hex() not in output.err
    assert sorted(path.name for path in tmp_path.iterdir()) == [target.name, "wrong.key"]


def test_cli_requires_a_key_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as error:
        cli.main(["encrypt", str(tmp_path)])
    assert error.value.code == 2
    assert os.listdir(tmp_path) == []


def test_an_encrypted_file_cannot_be_swapped_within_a_run_or_taken_from_another_run(tmp_path: Path) -> None:
    """The associated data binds each file to its path in the run and to the run (its ledger's first entry)."""
    runs = []
    for name in ("run-a", "run-b"):
        run = RunDir(tmp_path / name)
        run.checkpoints.mkdir(parents=True)
        Ledger(run.path, Identity.generate()).append("start", 0, config_hash=name)
        for server_round in (1, 2):
            run.save_checkpoint(Checkpoint(server_round, {"w": torch.full((2,), float(server_round))}, {}, "hash"))
        at_rest.encrypt_path(run.checkpoints, KEY, remove_source=True)
        runs.append(run)
    first, second = (runs[0].checkpoints / f"round-000{r}.pt.enc" for r in (1, 2))
    swapped = {path: path.read_bytes() for path in (first, second)}
    first.write_bytes(swapped[second])
    second.write_bytes(swapped[first])
    for path in (first, second):
        with pytest.raises(DecryptionError, match="moved, swapped or from another run"):
            at_rest.decrypt_path(path, KEY)
    other_run = runs[1].checkpoints / "round-0001.pt.enc"
    first.write_bytes(other_run.read_bytes())  # the same file name, from another run: a rollback
    with pytest.raises(DecryptionError, match="moved, swapped or from another run"):
        at_rest.decrypt_path(first, KEY)
    first.write_bytes(swapped[first])  # back in its place, it decrypts
    assert at_rest.decrypt_path(first, KEY) == [first.with_name("round-0001.pt")]
