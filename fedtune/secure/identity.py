"""Long-term identity keys (Ed25519): each node signs its replies, the server checks them.

A node's private key stays on the node (node config ``identity-key``, a PEM file; created with mode 0600
on first use if absent). The server knows the public keys either from a trusted list the operators
exchanged beforehand (``federation.trusted_keys``: a JSON file ``{"hospital-a": "<hex public key>"}``,
written by ``fedtune identity``) or, without one, pins the key each node presents when the run starts
(trust on first use) and refuses a different key for that node for the rest of the run, resume included.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from fedtune.files import create_private


class Identity:
    """A node's Ed25519 signing key.

    Args:
        private_key: The private key.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private_key = private_key
        self.public_hex = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    def sign(self, data: bytes) -> bytes:
        """An Ed25519 signature of ``data``."""
        return self._private_key.sign(data)

    @classmethod
    def generate(cls) -> Identity:
        """A fresh random identity (tests, and :func:`load_or_create`)."""
        return cls(Ed25519PrivateKey.generate())


def load_or_create(path: Path) -> Identity:
    """The identity stored at ``path`` (PEM, PKCS#8), created with mode 0600 if the file does not exist.

    Raises:
        ValueError: The file is not an Ed25519 private key, or others than its owner may read or write it.
    """
    if path.is_file():
        if path.stat().st_mode & 0o077:
            raise ValueError(
                f"{path} can be read or written by other users than its owner; a private key must not be. "
                f"Run `chmod 600 {path}` (and consider the key exposed if others could read it)."
            )
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key; create one with `fedtune identity`.")
        return Identity(key)
    identity = Identity.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    create_private(path, identity._private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return identity


def verify(public_hex: str, signature: bytes, data: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``data`` by the key ``public_hex``."""
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex)).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_trusted_keys(path: str | Path) -> dict[str, str]:
    """Node name -> hex public key, from a JSON file.

    Raises:
        ValueError: The file is not a JSON object of names to 64-hex-digit keys.
    """
    keys = json.loads(Path(path).read_text())
    if not isinstance(keys, dict) or not all(
        isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in keys.values()
    ):
        raise ValueError(f"{path} must map node names to hex Ed25519 public keys, as `fedtune identity` writes.")
    return {str(name): value for name, value in keys.items()}


def add_trusted_key(path: str | Path, name: str, public_hex: str) -> None:
    """Add (or replace) ``name``'s public key in the trusted-keys file at ``path``."""
    target = Path(path)
    keys = load_trusted_keys(target) if target.is_file() else {}
    keys[name] = public_hex
    target.write_text(json.dumps(keys, indent=2, sort_keys=True) + "\n")
