"""The server's side of securely aggregated training rounds (protocol: fedtune/secure/masking.py; the
client's side: fedtune/secure_client.py).

A round has five steps with the sampled clients: round keys, encrypted shares, training with masked
upload, agreement (every uploader signs the unmask lists: the consistency check), unmasking (a SecAgg+ ring
round has a sixth, the ring step, between keys and shares). The steps before training do not depend on the
round's model, so they are pipelined: a client's train reply carries its keys for the next round, and its
unmask reply its encrypted shares for it. A steady round is then three exchanges (train, agree, unmask)
instead of five; a round whose sampled clients did not all prepare that way (the first, the first after a
resume, one after a dropout) runs every step. On a ring only the keys are pipelined and a steady round
takes five exchanges (ring, shares, train, agree, unmask): a ring secret, once
revealed for a set of clients, binds its client to that set, so it is asked for only when the round
starts, from the clients that are still there.
The server only ever holds masked uploads and their unmasked sum; clients that drop out before the
upload or before unmasking are handled while at least t of them remain.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedtune import wire
from fedtune.adapters import AdapterState, l2_norm
from fedtune.channel import Client, GroupSum, RoundAbandoned, RoundFailedError
from fedtune.contribution.groups import Groups
from fedtune.secure import fixed_point, identity, masking, primitives
from fedtune.secure.masking import COMMITMENTS_HEX, SecureAggregation, unmask
from fedtune.secure.session import KeyBundle, ProtocolError, RingReveal, Session, view_digest
from fedtune.transport import Reply, Transport

logger = logging.getLogger("fedtune")

T = TypeVar("T")
Step = Callable[[list[Client], str, Callable[[Client], RecordDict]], list[Reply]]  # one exchange of a round


@dataclass(frozen=True)
class MaskedSum:
    """What the server learns from a secure round: the sum, the total weight, and who contributed."""

    weighted_sum: AdapterState  # float64: sum of weight * update over the contributors
    total_weight: int
    error_bound: float  # per coordinate, of weighted_sum / total_weight against the plaintext mean
    uploads: list[Reply]  # the contributors' masked uploads (metrics in the clear, update masked)
    round_size: int  # |U1|: the clients whose round keys were verified (each client's DP noise share is for them)
    upload_bytes: float  # mean bytes a contributor sent in this round's messages
    exchanges: int  # message exchanges the round took (3 when its keys and shares came pipelined, 5 on a ring)
    groups: list[GroupSum] | None = None  # each fixed group's sum, when masked within groups


@dataclass(frozen=True)
class _Keys:
    """Step 1 of a round done (and, on a ring, the ring step): verified round keys (U1) and ring secrets."""

    session: Session
    bundles: dict[str, KeyBundle]
    ring: dict[str, RingReveal] | None  # every client's verified ring secret (ring rounds), else None


@dataclass(frozen=True)
class _Setup(_Keys):
    """Steps 1 and 2 of a round done: verified round keys (U1), and the shares and commitments of U2."""

    sealed: dict[str, dict[str, bytes]]  # sender -> receiver -> encrypted share
    commitments: dict[str, bytes]  # sender -> commitment to its self-mask seed
    share_commitments: dict[str, dict[str, str]]  # sender -> receiver -> commitments to the two shares it dealt


class SecureRounds:
    """Runs masked rounds for the ServerApp and carries the next round's pipelined keys and shares.

    Args:
        transport: The run's transport (its run nonce binds every step).
    """

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.secure: SecureAggregation = transport.experiment.secure
        self._prepared: _Keys | None = None  # the next round's, made during this one

    def collect(
        self,
        sampled: list[Client],
        train_content: Callable[[Client], RecordDict],
        layout: AdapterState,
        server_round: int,
        unit_weights: bool,
        next_sampled: list[Client] | None,
        groups: Groups | None = None,
    ) -> MaskedSum:
        """One round with ``sampled``; ``train_content`` builds each client's train message, and ``layout`` holds
        the tensors each client uploads (its shapes and order fix the masked vector).

        ``next_sampled`` are the clients of the next round (None after the last): they make that round's
        keys and shares during this one. With ``groups`` (contribution accounting) each client masks only
        with the members of its fixed group, every group must keep its own t at every step, and the result
        holds each group's sum as well as the total.

        Raises:
            RoundFailedError: Before any upload, fewer clients shared keys than the round needs (t, and
                ``federation.min_train_clients``); nothing was revealed and the round can be run again.
            RoundAbandoned: After uploads, too few uploaded (checked before anything is unmasked), too few
                revealed their shares, or unmasking failed. The uploads are spent: the round is not retried.
                Also on a ring, before uploads, when a client did not reveal its ring secret.
        """
        session = Session(self.transport.run_nonce, server_round)
        sent: Counter[str] = Counter()
        exchanges = 0

        def step(targets: list[Client], message_type: str, content: Callable[[Client], RecordDict]) -> list[Reply]:
            nonlocal exchanges
            exchanges += 1
            replies = self.transport.send(targets, message_type, content, server_round)
            sent.update({reply.client.key: wire.payload_bytes(reply.content) for reply in replies})
            return replies

        prepared, self._prepared = self._prepared, None
        made = set(prepared.sealed if isinstance(prepared, _Setup) else prepared.bundles) if prepared else set()
        if prepared is None or prepared.session != session or made != _keys(sampled):
            prepared = None  # not made, or not by every sampled client: set this round up from its first step
        if isinstance(prepared, _Setup):
            setup = prepared
        else:
            keys = prepared if prepared is not None else self._round_keys(step, sampled, session)
            round_clients = [c for c in sampled if c.key in keys.bundles]
            setup = self._share(step, round_clients, self._fix_ring(step, round_clients, keys), groups)
        quorum = _Quorum(self.secure, setup.bundles, groups, self.transport.experiment.federation.min_train_clients)
        quorum.require(setup.sealed, server_round, "shared their keys")
        survivors = sorted(setup.sealed)
        next_session = Session(self.transport.run_nonce, server_round + 1)
        # Pipelining needs every next-round client in this round; otherwise the next round runs every step.
        pipelining = next_sampled is not None and _keys(next_sampled) <= _keys(sampled)
        next_clients = _keys(next_sampled) if pipelining else set()

        def masked_train(client: Client) -> RecordDict:
            content = train_content(client)
            config = content.config_records[wire.CONFIG]
            config[wire.SURVIVORS], config[wire.PREPARE_NEXT] = json.dumps(survivors), client.key in next_clients
            config[wire.NUM_SAMPLED] = len(setup.bundles)  # the round's size as every client verified it
            dealers = [v for v in survivors if client.key in setup.sealed[v]]
            content.config_records[wire.SEALED] = ConfigRecord({v: setup.sealed[v][client.key] for v in dealers})
            content.config_records[wire.SHARE_COMMITMENTS] = ConfigRecord(
                {v: setup.share_commitments[v][client.key] for v in dealers}
            )
            return content

        length = fixed_point.num_slots(layout)

        def read_upload(reply: Reply) -> tuple[Reply, np.ndarray, set[str]]:
            array = reply.content.array_records[wire.MASKED]["0"].numpy()
            if array.dtype != np.uint32 or array.shape != (length,):
                raise ProtocolError(f"a masked upload must be {length} uint32 values, got {array.dtype} {array.shape}")
            dict(reply.content.metric_records[wire.METRICS])  # present, or the reply is malformed
            excluded = set(json.loads(str(reply.content.config_records[wire.CONFIG][wire.EXCLUDED])))
            if not excluded <= set(survivors) - {reply.client.key}:
                raise ProtocolError("it left out clients that are not its peers in this round")
            return reply, array, excluded

        train_replies = step([c for c in sampled if c.key in setup.sealed], "train", masked_train)
        accepted = _accepted(train_replies, read_upload, server_round)
        # A client whose shares a peer could not open or check did not get that peer's mask: it counts as dropped.
        bad_dealers = set().union(*(excluded for _, _, excluded in accepted.values()))
        if bad_dealers:
            logger.warning(
                "Round %d: %s dealt shares their peers could not use; left out", server_round, sorted(bad_dealers)
            )
        uploads = [reply for name, (reply, _, _) in accepted.items() if name not in bad_dealers]
        masked = {name: array for name, (_, array, _) in accepted.items() if name not in bad_dealers}
        excluded_by = {name: excluded for name, (_, _, excluded) in accepted.items() if name in masked}
        # Every condition for using the sum is checked before anything is unmasked: a sum revealed and then
        # discarded could be subtracted from another one.
        quorum.require(masked, server_round, "uploaded a masked update", RoundAbandoned)
        uploaders = sorted(masked)
        dropped = sorted(set(survivors) - set(uploaders))
        next_keys = _accepted(
            [r for r in uploads if r.client.key in next_clients],
            lambda reply: _read_bundle(reply, next_session),
            server_round,
            "next-round keys",
        )
        preparing = pipelining and set(next_keys) == next_clients
        next_ring = self.secure.uses_ring(len(next_keys))  # only the keys are pipelined (module docstring)
        unmask_fields = {wire.SURVIVORS: json.dumps(uploaders), wire.DROPPED: json.dumps(dropped)}
        # The consistency check: every uploader signs these lists before anyone reveals (masking.agree).
        lists = masking.lists_digest(session, uploaders, dropped)
        agree_replies = step(
            [r.client for r in uploads], wire.SECAGG_AGREE, lambda c: _request(ConfigRecord(unmask_fields))
        )
        agreements = _accepted(agree_replies, _agreement_reader(session, lists), server_round, "agreement")
        quorum.require(agreements, server_round, "signed the unmask lists", RoundAbandoned, only_t=True)
        unmask_fields[wire.AGREEMENTS] = json.dumps({name: signature.hex() for name, signature in agreements.items()})
        next_fields = {}
        if preparing and not next_ring:  # the next round's clients get its keys and answer with their shares
            next_fields = _keys_message({c.key: c.public_key for c in next_sampled}, next_keys, groups)

        def unmask_request(client: Client) -> RecordDict:
            fields = {**unmask_fields, **next_fields} if client.key in next_clients else unmask_fields
            return RecordDict({wire.CONFIG: ConfigRecord(fields)})

        unmask_replies = step([r.client for r in uploads], wire.SECAGG_UNMASK, unmask_request)
        revealed = _accepted(unmask_replies, _read_revealed, server_round)
        if preparing:
            preparers = [r for r in unmask_replies if r.client.key in next_clients]
            if next_ring:  # the keys of those still here (the next round starts from its first step otherwise)
                self._prepared = _Keys(next_session, {r.client.key: next_keys[r.client.key] for r in preparers}, None)
            else:
                self._prepared = self._dealt(
                    preparers, _Keys(next_session, next_keys, None), "next-round shares", groups
                )
        quorum.require(revealed, server_round, "revealed their shares", RoundAbandoned, only_t=True)
        received = (session, masked, setup.bundles, setup.commitments, revealed, self.secure, setup.share_commitments)
        try:
            group_totals, liars = None, []
            if groups is None:
                total, liars = unmask(*received, excluded_by, setup.ring)
            else:  # each group unmasked on its own: the server learns the groups' sums and nothing finer
                group_totals = []
                for group in groups:
                    uploaders = tuple(sorted(set(group) & set(masked)))
                    if uploaders:  # the whole group: its members who dropped had masks to remove too
                        group_total, group_liars = unmask(*received, excluded_by, within=group)
                        group_totals.append((uploaders, group_total))
                        liars += group_liars
                total = np.sum([t for _, t in group_totals], axis=0, dtype=np.uint32)  # mod 2^32, as one sum
        except (ProtocolError, primitives.AuthenticationError, KeyError, ValueError) as error:
            raise RoundAbandoned(f"Round {server_round}: unmasking failed ({error})") from error
        if liars:
            logger.warning(
                "Round %d: %s revealed shares that do not match their commitments; left out", server_round, liars
            )
        if dropped:
            logger.warning("Round %d: removed the masks of %s, who dropped out before uploading", server_round, dropped)
        code = self.secure.fixed_point(len(setup.bundles), unit_weights)
        weighted_sum, total_weight = code.decode(total, layout)
        problem = self._implausible(weighted_sum, total_weight, len(uploads), len(setup.bundles), unit_weights, code)
        group_sums = None
        if group_totals is not None:
            group_sums = [GroupSum(members, *code.decode(sum_, layout)) for members, sum_ in group_totals]
            for group in group_sums:  # a group's sum must be plausible too, not only the total
                why = self._implausible(
                    group.weighted_sum,
                    int(group.total_weight),
                    len(group.members),
                    len(setup.bundles),
                    unit_weights,
                    code,
                )
                if problem is None and why is not None:
                    problem = f"group {list(group.members)}: {why}"
        if problem is not None:
            raise RoundAbandoned(
                f"Round {server_round}: the unmasked sum is not one that honest clients can produce ({problem}); "
                "it is not applied",
                revealed=len(uploads),
                round_size=len(setup.bundles),
            )
        return MaskedSum(
            weighted_sum,
            total_weight,
            code.error_bound(len(uploads), total_weight),
            uploads,
            len(setup.bundles),
            sum(sent[key] for key in uploaders) / len(uploaders),
            exchanges,
            group_sums,
        )

    def _round_keys(self, step: Step, sampled: list[Client], session: Session) -> _Keys:
        """Step 1 as its own exchange (when not pipelined into the previous round).

        Raises:
            RoundFailedError: Too few clients sent keys.
        """
        bundles = _accepted(
            step(sampled, wire.SECAGG_KEYS, lambda c: RecordDict()),
            lambda reply: _read_bundle(reply, session),
            session.server_round,
        )
        _require(len(bundles), self.secure.round_minimum(len(bundles)), session.server_round, "sent round keys")
        return _Keys(session, bundles, None)

    def _fix_ring(self, step: Step, clients: list[Client], keys: _Keys) -> _Keys:
        """The ring step with ``clients`` (those of ``keys``) on a ring; ``keys`` as they are otherwise.

        Raises:
            RoundAbandoned: A client of U1 did not reveal its ring secret. Nothing was uploaded, but the round
                cannot go on without it, nor be run again over other clients: the others' secrets are out, and
                they reveal them for this U1 only (fedtune/secure/uploads.py). The run goes on.
        """
        if not self.secure.uses_ring(len(keys.bundles)):
            return keys
        config = ConfigRecord(_keys_message({c.key: c.public_key for c in clients}, keys.bundles))
        replies = step(clients, wire.SECAGG_RING, lambda c: _request(config))
        server_round = keys.session.server_round
        ring = _accepted(replies, _ring_reader(keys.session, keys.bundles), server_round, "ring secret")
        if set(ring) != set(keys.bundles):
            raise RoundAbandoned(
                f"Round {server_round}: {sorted(set(keys.bundles) - set(ring))} did not reveal their ring secrets; "
                "the ring cannot be ordered without them, so the round is abandoned before anyone trains and the "
                "run goes on."
            )
        return _Keys(keys.session, keys.bundles, ring)

    def _share(self, step: Step, clients: list[Client], keys: _Keys, groups: Groups | None) -> _Setup:
        """Step 2 as its own exchange with ``clients`` (those of ``keys``), masking within ``groups`` if any."""
        fields = _keys_message({c.key: c.public_key for c in clients}, keys.bundles, groups)
        if keys.ring is not None:
            fields[wire.RING_REVEALS] = json.dumps({name: reveal.to_json() for name, reveal in keys.ring.items()})
        config = ConfigRecord(fields)
        return self._dealt(step(clients, wire.SECAGG_SHARES, lambda c: _request(config)), keys, "reply", groups)

    def _dealt(self, replies: list[Reply], keys: _Keys, what: str, groups: Groups | None) -> _Setup:
        """The set-up of ``keys`` from replies that carry encrypted shares (malformed ones logged, left out)."""
        peers = self.secure.peers(keys.bundles, keys.ring, groups)
        shared = _accepted(replies, _shares_reader(peers), keys.session.server_round, what)
        return _Setup(
            keys.session,
            keys.bundles,
            keys.ring,
            {name: shares for name, (shares, _, _) in shared.items()},
            {name: commitment for name, (_, commitment, _) in shared.items()},
            {name: committed for name, (_, _, committed) in shared.items()},
        )

    def _implausible(
        self,
        weighted_sum: AdapterState,
        total_weight: int,
        contributors: int,
        round_size: int,
        unit_weights: bool,
        code: fixed_point.FixedPoint,
    ) -> str | None:
        """Why no set of ``contributors`` honest clients could have produced this sum, or None if they could.

        Honest clients encode values within ``±value_range`` and weights within 1..``max_examples`` (exactly 1
        with unit weights), and under organisation-level DP clip their updates; a masked upload cannot be
        range-checked, so a client that breaks these rules shows up here, in the sum, or not at all.
        """
        lowest, highest = (
            (contributors, contributors) if unit_weights else (contributors, contributors * code.max_weight)
        )
        if not lowest <= total_weight <= highest:
            return f"total weight {total_weight}, outside [{lowest}, {highest}] for {contributors} clients"
        rounding = contributors / (2 * code.scale)  # per coordinate
        largest = max(float(t.abs().max()) for t in weighted_sum.values())
        if largest > total_weight * code.value_range + rounding:
            return f"a value of magnitude {largest:.4g} lies outside ±(total weight x secure.value_range)"
        organisation = self.transport.experiment.privacy.organisation
        if organisation is not None:
            dimension = sum(t.numel() for t in weighted_sum.values())
            norm = l2_norm(weighted_sum)
            bound = organisation.sum_norm_bound(contributors, round_size, dimension) + rounding * dimension**0.5
            if norm > bound:
                return f"L2 norm {norm:.4g} above {bound:.4g}, the most {contributors} clipped and noised updates reach"
        return None


class _Quorum:
    """How many clients each step of a round needs: t of the round (of each group, when masked within groups),
    and the run's ``federation.min_train_clients`` in all."""

    def __init__(
        self, secure: SecureAggregation, bundles: dict[str, KeyBundle], groups: Groups | None, minimum: int
    ) -> None:
        self.minimum = minimum
        if groups is None:
            self.parts = [(None, set(bundles), secure.round_minimum(len(bundles)))]
        else:  # a group's t is of its members in the round, as each member computes it
            present = [set(group) & set(bundles) for group in groups]
            self.parts = [
                (list(group), p, secure.min_survivors(len(p))) for group, p in zip(groups, present, strict=True) if p
            ]

    def require(
        self,
        names: Iterable[str],
        server_round: int,
        what: str,
        error: type[RuntimeError] = RoundFailedError,
        only_t: bool = False,
    ) -> None:
        """Raise ``error`` unless ``names`` hold every part's t (and, unless ``only_t``, the run's minimum)."""
        names = set(names)
        for group, members, threshold in self.parts:
            where = "" if group is None else f" of group {group}"
            _require(len(names & members), threshold, server_round, f"{what}{where}", error)
        if not only_t:
            _require(len(names), self.minimum, server_round, what, error)


def _keys(clients: list[Client]) -> set[str]:
    return {c.key for c in clients}


def _request(config: ConfigRecord) -> RecordDict:
    return RecordDict({wire.CONFIG: config})


def _keys_message(
    identities: dict[str, str], bundles: dict[str, KeyBundle], groups: Groups | None = None
) -> dict[str, str]:
    """What a client needs to deal its shares: every round client's signed keys and identity key (and the
    fixed groups, when it is to mask within its own)."""
    fields = {
        wire.BUNDLES: json.dumps([bundles[name].to_json() for name in sorted(bundles)]),
        wire.IDENTITIES: json.dumps(identities),
    }
    if groups is not None:
        fields[wire.GROUPS] = json.dumps([list(group) for group in groups])
    return fields


def _read_bundle(reply: Reply, session: Session) -> KeyBundle:
    bundle = KeyBundle.from_json(str(reply.content.config_records[wire.CONFIG][wire.BUNDLE]))
    if bundle.client != reply.client.key:
        raise ProtocolError(f"keys announced for {bundle.client}")
    bundle.verify(session, reply.client.public_key)
    return bundle


def _ring_reader(session: Session, bundles: dict[str, KeyBundle]) -> Callable[[Reply], RingReveal]:
    view = view_digest(session, bundles.values())

    def read(reply: Reply) -> RingReveal:
        reveal = RingReveal.from_json(str(reply.content.config_records[wire.CONFIG][wire.RING_REVEAL]))
        if reveal.client != reply.client.key:
            raise ProtocolError(f"a ring secret revealed for {reveal.client}")
        reveal.verify(session, view, reply.client.public_key, bundles[reveal.client])
        return reveal

    return read


def _shares_reader(
    peers: dict[str, frozenset[str]],
) -> Callable[[Reply], tuple[dict[str, bytes], bytes, dict[str, str]]]:
    def read(reply: Reply) -> tuple[dict[str, bytes], bytes, dict[str, str]]:
        shares = {name: bytes(value) for name, value in reply.content.config_records[wire.SEALED].items()}
        committed = {name: str(value) for name, value in reply.content.config_records[wire.SHARE_COMMITMENTS].items()}
        commitment = reply.content.config_records[wire.CONFIG][wire.COMMITMENT]
        group = peers[reply.client.key]
        if set(shares) != group or not isinstance(commitment, bytes) or len(commitment) != 32:
            raise ProtocolError("not one encrypted share per peer and a 32-byte commitment")
        if set(committed) != group | {reply.client.key} or not all(
            len(c) == COMMITMENTS_HEX for c in committed.values()
        ):
            raise ProtocolError("not one pair of share commitments per member of its group")
        return shares, commitment, committed

    return read


def _accepted(replies: list[Reply], read: Callable[[Reply], T], server_round: int, what: str = "reply") -> dict[str, T]:
    """``read`` applied to each reply; what it cannot read is logged and left out (the round goes on)."""
    accepted = {}
    for reply in replies:
        try:
            accepted[reply.client.key] = read(reply)
        except (KeyError, TypeError, ValueError, ProtocolError) as error:  # ProtocolError is a ValueError
            logger.warning("Round %d: %s of %s rejected: %s", server_round, what, reply.client.key, error)
    return accepted


def _agreement_reader(session: Session, lists: str) -> Callable[[Reply], bytes]:
    def read(reply: Reply) -> bytes:
        signature = reply.content.config_records[wire.CONFIG][wire.AGREEMENT]
        payload = masking.agreement_bytes(session, reply.client.key, lists)
        if not isinstance(signature, bytes) or not identity.verify(reply.client.public_key, signature, payload):
            raise ProtocolError("its signature is not on the unmask lists it was sent")
        return signature

    return read


def _read_revealed(reply: Reply) -> dict[str, dict[str, str]]:
    revealed = json.loads(str(reply.content.config_records[wire.CONFIG][wire.REVEALED]))
    if set(revealed) != {"seed", "mask_key"} or not all(
        isinstance(shares, dict) and all(isinstance(v, str) for v in shares.values()) for shares in revealed.values()
    ):
        raise ProtocolError("revealed shares must be two maps of client name to hex share")
    return revealed


def _require(
    count: int, needed: int, server_round: int, what: str, error: type[RuntimeError] = RoundFailedError
) -> None:
    if count >= needed:
        return
    if error is RoundFailedError:
        then = "nothing was uploaded or revealed. Resume with resume=true once nodes are back."
    else:
        then = "the round is abandoned and the run goes on (its uploads are spent: nodes upload once per round)."
    raise error(f"Round {server_round}: {count} clients {what}, {needed} are needed; {then}")
