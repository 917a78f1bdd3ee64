"""Cryptographic building blocks of secure aggregation, all from the ``cryptography`` package.

- X25519 key agreement, with HKDF-SHA256 deriving a separate 32-byte key per purpose (``info``).
- A ChaCha20 keystream (a CSPRNG) expanded from a 32-byte seed into uint32 masks.
- AES-256-GCM authenticated encryption for secret shares routed through the server.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

KEY_BYTES = 32
_NONCE_BYTES = 12


class AuthenticationError(ValueError):
    """A ciphertext failed authentication: wrong key, wrong context, or modified in transit."""


def x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 key pair as raw 32-byte strings."""
    private = X25519PrivateKey.generate()
    raw_private = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return raw_private, private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def x25519_public(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key shared with the owner of ``peer_public``, bound to ``info`` (purpose, run, round)."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


_zeros = b""  # ChaCha20's input, kept: a fresh buffer per stream made each mask cost 4x (its pages faulted in)


def keystream(seed: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random uint32 values from ChaCha20 keyed by ``seed`` (each seed is used once)."""
    global _zeros
    if len(seed) != KEY_BYTES:
        raise ValueError(f"A mask seed is {KEY_BYTES} bytes, got {len(seed)}.")
    if len(_zeros) < 4 * length:
        _zeros = bytes(4 * length)
    encryptor = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(memoryview(_zeros)[: 4 * length])
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32, copy=False)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM encryption: random nonce + ciphertext + tag; ``associated`` is authenticated too."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Decrypt what :func:`seal` produced.

    Raises:
        AuthenticationError: Wrong key, different ``associated`` data, or a modified ciphertext.
    """
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated)
    except (InvalidTag, ValueError) as error:
        raise AuthenticationError("A ciphertext failed authentication (wrong key, or modified in transit).") from error
