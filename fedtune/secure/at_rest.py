"""Encryption at rest of a run's outputs: the exported adapter and the per-round checkpoints.

``fedtune encrypt runs/<date_time>/adapter --key-file key`` replaces each file ``x`` by ``x.enc``,
AES-256-GCM encrypted, so a stolen disk or backup does not reveal the trained adapter (which can leak
facts about the training records). File format: the header ``FEDTUNE-AESGCM-2\\n``, a random 96-bit
nonce, then ciphertext and the 16-byte tag. The associated data binds the header, the file's name (its
path inside the run directory, e.g. ``checkpoints/round-0003.pt``) and the run (the hash of its ledger's
first entry), so an encrypted file cannot be swapped for another one of the run, nor for the same file of
another run. Any change to a file, a truncated file, a moved or swapped file or a wrong key is detected,
and decryption then writes nothing.

Not protected: a process or person holding the key, the files while they are decrypted for use, and
metadata (file names, sizes, modification times). Files are limited to 2 GiB each.

The key is 32 random bytes written hex-encoded on one line by ``fedtune keygen KEY_FILE`` (mode 0600).
Keep it apart from the encrypted files and their backups, e.g. as a key file readable only by the
service account or in an environment variable filled from a secret manager (``--key-env VAR``). The
key never appears in messages or logs; losing it loses the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune.files import atomic_write, create_private
from fedtune.ledger import LEDGER, Ledger

HEADER = b"FEDTUNE-AESGCM-2\n"
SUFFIX = ".enc"
_KEY_BYTES, _NONCE_BYTES, _TAG_BYTES = 32, 12, 16
_MAX_BYTES = 2**31 - 1 - _TAG_BYTES  # AESGCM's limit per message


class DecryptionError(ValueError):
    """A file is not fedtune-encrypted, or the key is wrong, or the file was modified or truncated."""


def generate_key(path: Path) -> None:
    """Write a fresh random 256-bit key, hex-encoded on one line, to a new file with mode 0600.

    Raises:
        FileExistsError: ``path`` exists; a key is never overwritten (that would lose the old one).
    """
    try:
        create_private(path, (AESGCM.generate_key(bit_length=256).hex() + "\n").encode("ascii"))
    except FileExistsError:
        raise FileExistsError(f"{path} already exists; a key file is never overwritten, choose another path.") from None


def load_key(key_file: str | Path | None = None, key_env: str | None = None) -> bytes:
    """The 32-byte key from exactly one source: a key file or an environment variable (hex text).

    Raises:
        ValueError: No source or both, the source is missing or empty, or it holds no valid key.
    """
    if (key_file is None) == (key_env is None):
        raise ValueError("give exactly one key source: a key file or an environment variable.")
    if key_file is not None:
        source = f"key file {key_file}"
        try:
            text = Path(key_file).read_text(encoding="ascii")
        except FileNotFoundError:
            raise ValueError(f"{source} does not exist; create one with `fedtune keygen {key_file}`.") from None
        except (OSError, UnicodeDecodeError):
            raise ValueError(f"{source} could not be read as ASCII text.") from None
    else:
        source = f"environment variable {key_env}"
        text = os.environ.get(str(key_env), "")
    if not text.strip():
        state = "empty" if key_file is not None else "not set or empty"
        raise ValueError(f"{source} is {state}; it must hold a key written by `fedtune keygen`.")
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError(
            f"{source} does not hold a hex-encoded key (64 hex characters, as `fedtune keygen` writes)."
        ) from None
    if len(key) != _KEY_BYTES:
        raise ValueError(f"{source} holds a {len(key)}-byte key; AES-256 needs {_KEY_BYTES} bytes (64 hex characters).")
    return key


def bound_to(path: Path) -> bytes:
    """The associated data of the plaintext file ``path``: the header, the file's path inside its run
    directory (the nearest folder above it holding a ledger; else its bare name) and that run's first
    ledger entry hash (empty outside a run), each length-prefixed."""
    resolved = path.resolve()
    run = next((folder for folder in resolved.parents if (folder / LEDGER).is_file()), None)
    name = resolved.relative_to(run).as_posix() if run is not None else resolved.name
    entries = Ledger(run).entries() if run is not None else []
    fields = [name, entries[0]["hash"] if entries else ""]
    return HEADER + b"".join(len(f.encode()).to_bytes(4, "big") + f.encode() for f in fields)


def encrypt_file(source: Path, target: Path, key: bytes) -> None:
    """Write ``source`` encrypted to ``target`` (atomically: ``target`` is complete or untouched), bound to
    ``source``'s name and run (:func:`bound_to`)."""
    if source.stat().st_size > _MAX_BYTES:
        raise ValueError(f"{source} is larger than 2 GiB, the limit of one encrypted file.")
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, source.read_bytes(), bound_to(source))
    atomic_write(target, HEADER + nonce + ciphertext)


def decrypt_file(source: Path, target: Path, key: bytes) -> None:
    """Write ``source`` decrypted to ``target``; nothing is written unless the whole file authenticates as
    the file ``target`` of its run.

    Raises:
        DecryptionError: Not a fedtune-encrypted file, a wrong key, a modified or truncated file, or one that
            was encrypted under another name or in another run (swapped or rolled back).
    """
    data = source.read_bytes()
    if not data.startswith(HEADER):
        raise DecryptionError(f"{source} is not a fedtune-encrypted file (no FEDTUNE-AESGCM-2 header).")
    modified = (
        f"{source} could not be decrypted: wrong key or the file was modified "
        f"(or it is not this run's {target.name}: moved, swapped or from another run)."
    )
    body = data[len(HEADER) :]
    if len(body) < _NONCE_BYTES + _TAG_BYTES:
        raise DecryptionError(modified)
    try:
        plaintext = AESGCM(key).decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], bound_to(target))
    except InvalidTag:
        raise DecryptionError(modified) from None
    atomic_write(target, plaintext)


def encrypt_path(path: Path, key: bytes, remove_source: bool = False) -> list[Path]:
    """Encrypt a file ``x`` to ``x.enc``, or every regular file under a directory (``.enc`` files are skipped).

    Returns the written files; ``remove_source`` deletes each plaintext file once its ``.enc`` is written.
    """
    sources = _files(Path(path), encrypted=False)
    return _convert(sources, lambda s: s.with_name(s.name + SUFFIX), encrypt_file, key, remove_source)


def decrypt_path(path: Path, key: bytes, remove_source: bool = False) -> list[Path]:
    """Decrypt a file ``x.enc`` to ``x``, or every ``.enc`` file under a directory.

    Returns the written files; ``remove_source`` deletes each ``.enc`` file once it is decrypted.
    """
    sources = _files(Path(path), encrypted=True)
    return _convert(sources, lambda s: s.with_name(s.name.removesuffix(SUFFIX)), decrypt_file, key, remove_source)


def _convert(
    sources: list[Path],
    target_of: Callable[[Path], Path],
    convert: Callable[[Path, Path, bytes], None],
    key: bytes,
    remove_source: bool,
) -> list[Path]:
    """``convert`` each source to its target, deleting the source afterwards if asked; returns the targets."""
    written = []
    for source in sources:
        target = target_of(source)
        convert(source, target, key)
        written.append(target)
        if remove_source:
            source.unlink()
    return written


def _files(path: Path, encrypted: bool) -> list[Path]:
    """Regular files (no symbolic links) to process: ``path`` itself, or the matching files under it."""
    action = "decrypt" if encrypted else "encrypt"
    if path.is_file() and not path.is_symlink():
        if path.name.endswith(SUFFIX) != encrypted:
            raise ValueError(
                f"{path} {'lacks' if encrypted else 'already has'} the {SUFFIX} suffix; nothing to {action}."
            )
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a file nor a directory.")
    found = []
    for folder, _, names in os.walk(path):  # does not follow symbolic links to directories
        for name in names:
            file = Path(folder) / name
            if file.is_file() and not file.is_symlink() and name.endswith(SUFFIX) == encrypted:
                found.append(file)
    if not found:
        raise FileNotFoundError(f"{path} holds no {'.enc ' if encrypted else 'unencrypted '}files to {action}.")
    return sorted(found)
