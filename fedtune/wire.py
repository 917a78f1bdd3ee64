"""What travels between ServerApp and ClientApp: record names, adapters as one array, and signed replies.

Every client reply is signed with the node's Ed25519 identity key over a digest of its whole content,
bound to the run (a nonce the server draws at start), the round, the protocol step (message type) and
the node's name. The server rejects a reply whose signature does not verify under the key it knows for
that node, which also rejects a reply replayed from another round, step or run.
"""

from __future__ import annotations

import hashlib
import json
import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.secure.session import Session

# Record and key names (Flower's hyphenated convention).
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
EXPERIMENT_HASH, SERVER_ROUND, CLIENT_KEY, DESCRIPTION = "experiment-hash", "server-round", "client-key", "description"
NUM_SAMPLED, RUN_NONCE, NODE_KEY = "num-sampled", "run-nonce", "node-key"
BASE_MODEL = "base-model"  # in every message: the server's base model (fedtune/model_fingerprint.py), for errors
SETTINGS = "settings"  # in a train message: the strategy's ClientSettings for this client (JSON)
SIGNATURE = "signature"
# Secure aggregation steps (message types) and their records.
SECAGG_KEYS, SECAGG_SHARES, SECAGG_UNMASK = "train.secagg_keys", "train.secagg_shares", "train.secagg_unmask"
SECAGG_AGREE = "train.secagg_agree"  # between upload and unmask: each client signs the unmask lists it is given
SECAGG_RING = "train.secagg_ring"  # SecAgg+ only, between keys and shares: each client reveals its ring secret
RING_REVEAL, RING_REVEALS = "ring-reveal", "ring-reveals"  # one client's revealed ring secret; all of U1's
BUNDLE, BUNDLES, IDENTITIES, SEALED, COMMITMENT = "bundle", "bundles", "identities", "sealed", "commitment"
SURVIVORS, DROPPED, REVEALED, MASKED = "survivors", "dropped", "revealed", "masked"
AGREEMENT, AGREEMENTS = "agreement", "agreements"  # one client's signature on the unmask lists; all of them (hex)
SHARE_COMMITMENTS, EXCLUDED = "share-commitments", "excluded"  # per-share commitments; peers a client left out
GROUPS = "groups"  # in a shares request: the fixed groups to mask within (contribution accounting), JSON
PREPARE_NEXT = "prepare-next"  # in a masked train message: also make the next round's keys (steps pipelined)


def adapter_record(adapter: dict[str, torch.Tensor]) -> ArrayRecord:
    """An adapter (or an update) as it travels: its tensors flattened end to end into one float32 array, under a
    key that lists their names and shapes in order.

    Flower sends every array of a message as objects of its own, and every object costs a request on each hop
    (ServerApp, SuperLink, SuperNode, worker, and back): one array rather than one per tensor (26 for MiniLM's
    LoRA and head) makes a deployed round shorter (README, "Flower apps and deployment").

    Raises:
        TypeError: A tensor is not float32 (adapters train and travel in float32).
    """
    others = sorted({str(t.dtype) for t in adapter.values()} - {str(torch.float32)})
    if others:
        raise TypeError(f"an adapter travels as float32; these tensors are {', '.join(others)}")
    index = json.dumps([[name, list(tensor.shape)] for name, tensor in adapter.items()])
    flat = [tensor.detach().reshape(-1) for tensor in adapter.values()]
    return ArrayRecord({index: torch.cat(flat) if flat else torch.zeros(0)})


def adapter_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The adapter :func:`adapter_record` made.

    Raises:
        ValueError: The record is not one float32 array with a well-formed index of distinct names whose shapes
            add up to the array's length (a malformed or hostile message).
    """
    if len(record) != 1:
        raise ValueError(f"an adapter travels as one array, not {len(record)}")
    ((index, array),) = record.items()
    layout = json.loads(index)
    if not (
        isinstance(layout, list)
        and all(isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) for entry in layout)
        and all(isinstance(entry[1], list) and all(type(d) is int and d >= 0 for d in entry[1]) for entry in layout)
    ):
        raise ValueError("the adapter's index is not a list of [name, shape] pairs")
    names, sizes = [name for name, _ in layout], [math.prod(shape) for _, shape in layout]
    if len(set(names)) != len(names):
        raise ValueError("the adapter's index names a tensor twice")
    if array.dtype != "float32" or len(array.shape) != 1 or array.shape[0] != sum(sizes):
        raise ValueError(
            f"the adapter's array is {array.dtype} {tuple(array.shape)}; its index needs float32 ({sum(sizes)},)"
        )
    flat = torch.from_numpy(array.numpy().copy())
    parts = torch.split(flat, sizes)
    return {name: part.reshape(shape).clone() for (name, shape), part in zip(layout, parts, strict=True)}


class RejectedReply(ValueError):
    """A reply the server must not use: unsigned, signed by another key, or bound to another step."""


def content_digest(content: RecordDict) -> bytes:
    """SHA-256 over every record of ``content`` except the signature, in a canonical order."""
    digest = hashlib.sha256()

    def add(*fields: str | bytes) -> None:
        for item in fields:
            data = item if isinstance(item, bytes) else item.encode()
            digest.update(len(data).to_bytes(8, "big") + data)

    for name in sorted(content.array_records):
        record = content.array_records[name]
        for key in sorted(record):
            array = record[key]
            add("array", name, key, array.dtype, repr(tuple(array.shape)), array.data)
    for kind, records in (("config", content.config_records), ("metric", content.metric_records)):
        for name in sorted(records):
            if kind == "config" and name == SIGNATURE:
                continue
            for key in sorted(records[name]):
                add(kind, name, key, repr(records[name][key]))
    return digest.digest()


def sign(content: RecordDict, signer: Identity, session: Session, message_type: str, client: str) -> RecordDict:
    """Attach the signature record to ``content`` (returned for chaining)."""
    payload = session.reply_signed_bytes(message_type, client, content_digest(content).hex())
    content.config_records[SIGNATURE] = ConfigRecord({NODE_KEY: signer.public_hex, SIGNATURE: signer.sign(payload)})
    return content


def verify(content: RecordDict, public_hex: str, session: Session, message_type: str, client: str) -> tuple[str, bytes]:
    """The hex content digest and the signature of a reply whose signature checks out.

    Raises:
        RejectedReply: No signature, a different key than ``public_hex``, or a signature over other content,
            another run, round or step.
    """
    record = content.config_records.get(SIGNATURE)
    if record is None:
        raise RejectedReply("the reply is not signed")
    if record.get(NODE_KEY) != public_hex:
        raise RejectedReply("the reply is signed by a key that is not this node's known identity key")
    digest = content_digest(content).hex()
    signature = record.get(SIGNATURE)
    payload = session.reply_signed_bytes(message_type, client, digest)
    if not isinstance(signature, bytes) or not identity.verify(public_hex, signature, payload):
        raise RejectedReply("bad signature (modified in transit, or replayed from another round, step or run)")
    return digest, signature


def payload_bytes(content: RecordDict) -> int:
    """Bytes of payload in a message: serialised arrays and their names (an adapter's name lists its tensors) plus
    config values (for the bytes-per-client log)."""
    arrays = sum(
        len(key) + len(array.data) for record in content.array_records.values() for key, array in record.items()
    )
    values = sum(
        len(v) if isinstance(v, bytes | str) else 8 for r in content.config_records.values() for v in r.values()
    )
    return arrays + values
