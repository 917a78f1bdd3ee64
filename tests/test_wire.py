"""Signed replies and how adapters travel (fedtune/wire.py), and identity keys (fedtune/secure/identity.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedtune import wire
from fedtune.secure import identity
from fedtune.secure.identity import Identity
from fedtune.secure.session import Session

NODE = Identity.generate()
SESSION = Session("run-nonce", 2)


def _reply() -> RecordDict:
    content = RecordDict(
        {
            wire.ARRAYS: wire.adapter_record({"lora_A": torch.arange(6.0).reshape(2, 3)}),
            wire.METRICS: MetricRecord({"train_loss": 1.5, "num_examples": 40.0}),
        }
    )
    return wire.sign(content, NODE, SESSION, "train", "hospital-a")


def test_a_signed_reply_verifies_and_its_digest_covers_the_content() -> None:
    digest, signature = wire.verify(_reply(), NODE.public_hex, SESSION, "train", "hospital-a")
    assert digest == wire.content_digest(_reply()).hex()
    assert identity.verify(NODE.public_hex, signature, SESSION.reply_signed_bytes("train", "hospital-a", digest))
    changed = _reply()
    changed.metric_records[wire.METRICS]["train_loss"] = 1.25
    assert wire.content_digest(changed).hex() != digest


@pytest.mark.parametrize(
    "session, step, client",
    [
        (Session("run-nonce", 1), "train", "hospital-a"),  # replay of an older round
        (Session("another-run", 2), "train", "hospital-a"),  # replay from another run
        (SESSION, "train.secagg_unmask", "hospital-a"),  # replay at another protocol step
        (SESSION, "train", "hospital-b"),  # presented as another node's reply
    ],
)
def test_a_replayed_reply_is_rejected(session: Session, step: str, client: str) -> None:
    with pytest.raises(wire.RejectedReply, match="bad signature"):
        wire.verify(_reply(), NODE.public_hex, session, step, client)


def test_tampered_updates_and_metrics_are_rejected() -> None:
    tampered = _reply()
    update = wire.adapter_of(tampered.array_records[wire.ARRAYS])
    update["lora_A"][0, 0] += 1e-3
    signature = tampered.config_records[wire.SIGNATURE]
    tampered = RecordDict(
        {
            wire.ARRAYS: wire.adapter_record(update),
            wire.METRICS: tampered.metric_records[wire.METRICS],
            wire.SIGNATURE: signature,
        }
    )
    with pytest.raises(wire.RejectedReply, match="bad signature"):
        wire.verify(tampered, NODE.public_hex, SESSION, "train", "hospital-a")
    inflated = _reply()
    inflated.metric_records[wire.METRICS]["num_examples"] = 4000.0  # a node claiming more weight than it signed
    with pytest.raises(wire.RejectedReply, match="bad signature"):
        wire.verify(inflated, NODE.public_hex, SESSION, "train", "hospital-a")


def test_forged_and_unsigned_replies_are_rejected() -> None:
    forger = Identity.generate()
    forged = wire.sign(_reply(), forger, SESSION, "train", "hospital-a")
    with pytest.raises(wire.RejectedReply, match="not this node's known identity key"):
        wire.verify(forged, NODE.public_hex, SESSION, "train", "hospital-a")
    forged.config_records[wire.SIGNATURE][wire.NODE_KEY] = NODE.public_hex  # claims the right key, wrong signature
    with pytest.raises(wire.RejectedReply, match="bad signature"):
        wire.verify(forged, NODE.public_hex, SESSION, "train", "hospital-a")
    unsigned = _reply()
    del unsigned.config_records[wire.SIGNATURE]
    with pytest.raises(wire.RejectedReply, match="not signed"):
        wire.verify(unsigned, NODE.public_hex, SESSION, "train", "hospital-a")


def test_signature_record_is_excluded_only_by_its_own_name() -> None:
    content = _reply()
    content.config_records["extra"] = ConfigRecord({"note": "added after signing"})
    with pytest.raises(wire.RejectedReply):
        wire.verify(content, NODE.public_hex, SESSION, "train", "hospital-a")


def test_identity_key_is_created_private_and_reloaded(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "hospital-a.pem"
    created = identity.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert identity.load_or_create(path).public_hex == created.public_hex
    trusted = tmp_path / "trusted.json"
    identity.add_trusted_key(trusted, "hospital-a", created.public_hex)
    assert identity.load_trusted_keys(trusted) == {"hospital-a": created.public_hex}
    trusted.write_text('{"hospital-a": "not-a-key"}')
    with pytest.raises(ValueError, match="fedtune identity"):
        identity.load_trusted_keys(trusted)


def test_an_identity_key_that_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "hospital-a.pem"
    identity.load_or_create(path)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        identity.load_or_create(path)


def test_an_adapter_travels_as_one_array_and_comes_back_bit_for_bit() -> None:
    adapter = {
        "layer.0.lora_A": torch.randn(4, 6),
        "layer.0.lora_B": torch.randn(6, 4) * 1e-30,  # subnormal-adjacent values survive too
        "head.bias": torch.tensor([float("-0.0"), 1.0, 3.5]),
        "scalar": torch.tensor(2.0),
    }
    record = wire.adapter_record(adapter)
    assert len(record) == 1  # one array: one object per hop on Flower's wire, not one per tensor
    back = wire.adapter_of(record)
    assert list(back) == list(adapter)
    for name, tensor in adapter.items():
        assert back[name].shape == tensor.shape and back[name].dtype == torch.float32
        assert torch.equal(back[name].view(torch.int32), tensor.view(torch.int32)), name
    assert wire.adapter_of(wire.adapter_record({})) == {}
    with pytest.raises(TypeError, match="float32; these tensors are torch.float64"):
        wire.adapter_record({"a": torch.zeros(2, dtype=torch.float64)})


def _record(index: object, values: torch.Tensor) -> ArrayRecord:
    return ArrayRecord({index if isinstance(index, str) else json.dumps(index): values})


@pytest.mark.parametrize(
    "record, reason",
    [
        (ArrayRecord({"a": torch.zeros(2), "b": torch.zeros(2)}), "one array, not 2"),
        (_record("not json", torch.zeros(2)), "Expecting value"),
        (_record({"a": [2]}, torch.zeros(2)), "list of \\[name, shape\\] pairs"),
        (_record([["a", [-2]]], torch.zeros(2)), "list of \\[name, shape\\] pairs"),
        (_record([["a", [2.0]]], torch.zeros(2)), "list of \\[name, shape\\] pairs"),
        (_record([["a", [2]], ["a", [1]]], torch.zeros(3)), "names a tensor twice"),
        (_record([["a", [2, 2]]], torch.zeros(3)), "needs float32 \\(4,\\)"),
        (_record([["a", [2]]], torch.zeros(2, dtype=torch.float64)), "float64 \\(2,\\); its index needs float32"),
        (_record([["a", [2]]], torch.zeros(1, 2)), "\\(1, 2\\); its index needs float32 \\(2,\\)"),
    ],
)
def test_a_malformed_adapter_record_is_refused(record: ArrayRecord, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        wire.adapter_of(record)
