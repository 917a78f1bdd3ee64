"""Secure aggregation protocol (fedtune/secure/masking.py), run in-process between simulated parties.

The reference for every aggregate is the float64 weighted sum of the plaintext updates, computed here
independently of the fixed-point code.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import secrets

import numpy as np
import pytest
import torch
from scipy import stats

from fedtune.secure import masking, shamir
from fedtune.secure.fixed_point import FixedPoint
from fedtune.secure.identity import Identity
from fedtune.secure.masking import SecureAggregation
from fedtune.secure.session import ProtocolError, RingReveal, Session, view_digest

CONFIG = SecureAggregation(threshold=0.6, value_range=1.0, max_examples=1000)
RING = SecureAggregation(threshold=0.6, value_range=1.0, max_examples=1000, neighbours=4)  # SecAgg+
SESSION = Session("run-nonce", 3)


class Round:
    """n clients through steps 1-2 of a round; uploads and unmasking are driven by each test."""

    def __init__(self, num_clients: int, config: SecureAggregation = CONFIG, seed: int = 0) -> None:
        self.names = [f"hospital-{i:02d}" for i in range(num_clients)]
        self.identities = {n: Identity.generate() for n in self.names}
        self.public = {n: i.public_hex for n, i in self.identities.items()}
        self.session, self.config = SESSION, config
        self.states, self.bundles = {}, []
        for name in self.names:
            state, bundle = masking.advertise_keys(SESSION, name, self.identities[name])
            self.states[name], self.bundles = state, [*self.bundles, bundle]
        self.ring = None  # on a ring, every client's revealed ring secret
        if config.uses_ring(num_clients):
            self.ring = {
                n: masking.reveal_ring(self.states[n], self.bundles, self.public, self.identities[n], config)
                for n in self.names
            }
        self.sealed, self.commitments, self.committed = {}, {}, {}
        for name in self.names:
            self.sealed[name], self.commitments[name], self.committed[name] = masking.share_keys(
                self.states[name], self.bundles, self.public, config, self.ring
            )
        generator = torch.Generator().manual_seed(seed)
        self.updates = {
            n: {
                "lora_A": torch.randn(4, 8, generator=generator) * 0.05,
                "lora_B": torch.randn(8, 2, generator=generator) * 0.05,
            }
            for n in self.names
        }
        self.weights = {n: 10 + 7 * i for i, n in enumerate(self.names)}
        self.code = config.fixed_point(num_clients, unit_weights=False)

    def routed(self, name: str, survivors: list[str]) -> tuple[dict[str, bytes], dict[str, str]]:
        """The shares and share commitments dealt to ``name``, as the server routes them."""
        dealers = [v for v in survivors if name in self.sealed[v]]
        return {v: self.sealed[v][name] for v in dealers}, {v: self.committed[v][name] for v in dealers}

    def upload(self, name: str, survivors: list[str]) -> np.ndarray:
        sealed, committed = self.routed(name, survivors)
        encoded = self.code.encode(self.updates[name], self.weights[name])
        masked, excluded = masking.mask_update(self.states[name], sealed, committed, survivors, encoded)
        assert excluded == []
        return masked

    def reference(self, names: list[str]) -> dict[str, torch.Tensor]:
        return {k: sum(self.updates[n][k].double() * self.weights[n] for n in names) for k in self.updates[names[0]]}

    def reveal(self, name: str, survivors: list[str], dropped: list[str]) -> dict[str, dict[str, str]]:
        """The consistency check as an honest server runs it (every survivor signs these lists), then what
        ``name`` reveals."""
        agreements = {n: masking.agree(self.states[n], survivors, dropped, self.identities[n]) for n in survivors}
        return masking.reveal_shares(self.states[name], survivors, dropped, agreements)

    def unmask(self, uploads: dict[str, np.ndarray], revealers: list[str]) -> np.ndarray:
        survivors, dropped = sorted(uploads), sorted(set(self.commitments) - set(uploads))
        revealed = {n: self.reveal(n, survivors, dropped) for n in revealers}
        bundles = {b.client: b for b in self.bundles}
        total, liars = masking.unmask(
            self.session, uploads, bundles, self.commitments, revealed, self.config, self.committed, {}, self.ring
        )
        assert liars == []
        return total


def test_unmasked_sum_equals_the_plaintext_weighted_sum_within_the_stated_bound() -> None:
    parties = Round(5)
    uploads = {n: parties.upload(n, parties.names) for n in parties.names}
    summed, total_weight = parties.code.decode(
        parties.unmask(uploads, parties.names), parties.updates[parties.names[0]]
    )
    reference = parties.reference(parties.names)
    assert total_weight == sum(parties.weights.values())
    bound = parties.code.error_bound(5, total_weight)
    for key in reference:
        assert (summed[key] / total_weight - reference[key] / total_weight).abs().max() <= bound
    assert bound < 1e-6  # the bound itself is far below float32 resolution of these updates


# n=5, t=3: up to n - t = 2 may drop. With 9 clients on a ring of 4 neighbours each group has 5 members
# and t=3, so any 2 may drop as well (each group loses at most 2).
DROPOUT_CASES = [(5, CONFIG, 1), (5, CONFIG, 2), (9, RING, 1), (9, RING, 2)]


@pytest.mark.parametrize("num_clients, config, dropouts", DROPOUT_CASES)
def test_dropouts_after_upload_still_give_the_exact_aggregate(
    num_clients: int, config: SecureAggregation, dropouts: int
) -> None:
    parties = Round(num_clients, config)
    uploads = {n: parties.upload(n, parties.names) for n in parties.names}
    revealers = parties.names[dropouts:]  # the first ones vanish before revealing their shares
    exact = sum(parties.code.encode(parties.updates[n], parties.weights[n]) for n in parties.names)
    assert np.array_equal(parties.unmask(uploads, revealers), exact.astype(np.uint32))


@pytest.mark.parametrize("num_clients, config, dropouts", DROPOUT_CASES)
def test_dropouts_between_sharing_and_upload_are_unmasked_exactly(
    num_clients: int, config: SecureAggregation, dropouts: int
) -> None:
    parties = Round(num_clients, config)
    survivors = parties.names[dropouts:]
    uploads = {n: parties.upload(n, parties.names) for n in survivors}  # masks still include the dropped peers
    exact = sum(parties.code.encode(parties.updates[n], parties.weights[n]) for n in survivors)
    assert np.array_equal(parties.unmask(uploads, survivors), exact.astype(np.uint32))


def test_more_than_n_minus_t_dropouts_fail_the_round_cleanly() -> None:
    parties = Round(5)
    uploads = {n: parties.upload(n, parties.names) for n in parties.names}
    with pytest.raises(ProtocolError, match="3 are needed"):
        parties.unmask(uploads, parties.names[:2])  # only 2 of 5 reveal; t = 3
    survivors = parties.names[:2]  # 3 dropped before uploading: the clients themselves refuse to reveal
    with pytest.raises(ProtocolError, match="fewer than the threshold"):
        masking.agree(parties.states[survivors[0]], survivors, parties.names[2:], parties.identities[survivors[0]])


def test_a_single_masked_update_is_indistinguishable_from_uniform() -> None:
    parties = Round(3)
    parties.updates[parties.names[0]] = {"lora_A": torch.zeros(64, 256), "lora_B": torch.zeros(1)}
    code = parties.code
    sealed, committed = parties.routed(parties.names[0], parties.names)
    encoded = code.encode(parties.updates[parties.names[0]], 1)
    upload, _ = masking.mask_update(parties.states[parties.names[0]], sealed, committed, parties.names, encoded)
    # A constant (all-zero) input is the worst case: any structure left would show in the byte histogram.
    counts = np.bincount(upload.view(np.uint8), minlength=256)
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.kstest(upload / 2**32, "uniform").pvalue > 1e-3


def test_server_asking_for_both_masks_of_a_client_is_refused() -> None:
    parties = Round(5)
    for name in parties.names:
        parties.upload(name, parties.names)
    with pytest.raises(ProtocolError, match="both masks"):
        masking.agree(
            parties.states[parties.names[0]], parties.names, [parties.names[1]], parties.identities[parties.names[0]]
        )


def test_forged_or_replayed_round_keys_are_rejected() -> None:
    parties = Round(3)
    impostor = Identity.generate()
    state, forged = masking.advertise_keys(SESSION, parties.names[1], impostor)
    bundles = [parties.bundles[0], forged, parties.bundles[2]]
    with pytest.raises(ProtocolError, match="not signed by its known identity key"):
        masking.share_keys(parties.states[parties.names[0]], bundles, parties.public, CONFIG)
    next_round = Session(SESSION.run_nonce, SESSION.server_round + 1)
    state, own = masking.advertise_keys(next_round, parties.names[0], parties.identities[parties.names[0]])
    with pytest.raises(ProtocolError, match="not signed"):  # the peers' round-3 keys replayed in round 4
        masking.share_keys(state, [own, *parties.bundles[1:]], parties.public, CONFIG)
    with pytest.raises(ProtocolError, match="own round keys unchanged"):  # and its own
        masking.share_keys(state, parties.bundles, parties.public, CONFIG)


def test_a_tampered_misdirected_or_uncommitted_share_leaves_its_dealer_out_not_its_recipient() -> None:
    """A client that cannot use a peer's share does not mask with that peer and says so; it stays in the round."""
    parties = Round(3)
    a, b, c = parties.names
    tampered = bytearray(parties.sealed[b][a])
    tampered[20] ^= 1
    wrong_commitment = {b: parties.committed[b][c], c: parties.committed[c][a]}  # b's commitment for c
    cases = [
        ({b: bytes(tampered), c: parties.sealed[c][a]}, {b: parties.committed[b][a], c: parties.committed[c][a]}),
        ({b: parties.sealed[b][c], c: parties.sealed[c][a]}, {b: parties.committed[b][a], c: parties.committed[c][a]}),
        ({b: parties.sealed[b][a], c: parties.sealed[c][a]}, wrong_commitment),
        ({c: parties.sealed[c][a]}, {c: parties.committed[c][a]}),  # b's share withheld
    ]
    for sealed, committed in cases:
        state = copy.deepcopy(parties.states[a])
        _, excluded = masking.mask_update(state, sealed, committed, parties.names, np.zeros(3, np.uint32))
        assert excluded == [b] and b not in state.shares


def test_a_wrong_revealed_share_is_caught_and_its_revealer_left_out() -> None:
    parties = Round(5)
    uploads = {n: parties.upload(n, parties.names) for n in parties.names}
    revealed = {n: parties.reveal(n, parties.names, []) for n in parties.names}
    liar = parties.names[0]
    share = bytearray.fromhex(revealed[liar]["seed"][parties.names[1]])
    share[-1] ^= 1
    revealed[liar]["seed"][parties.names[1]] = share.hex()
    bundles = {b.client: b for b in parties.bundles}
    total, liars = masking.unmask(
        SESSION, uploads, bundles, parties.commitments, revealed, CONFIG, parties.committed, {}
    )
    exact = sum(parties.code.encode(parties.updates[n], parties.weights[n]) for n in parties.names)
    assert liars == [liar] and np.array_equal(total, exact.astype(np.uint32))  # 4 honest revealers, t = 3


def test_threshold_at_or_below_one_half_is_refused() -> None:
    with pytest.raises(ValueError, match="secure.threshold"):
        SecureAggregation(threshold=0.5)
    assert SecureAggregation(threshold=0.6).min_survivors(10) == 6
    assert SecureAggregation(threshold=0.6).min_survivors(2) == 2


def test_fixed_point_refuses_out_of_range_values_and_weights_instead_of_clipping() -> None:
    code = FixedPoint.for_round(value_range=0.5, max_weight=100, num_clients=4)
    with pytest.raises(ValueError, match="secure.value_range"):
        code.encode({"w": torch.tensor([0.6])}, 1)
    with pytest.raises(ValueError, match="secure.max_examples"):
        code.encode({"w": torch.tensor([0.1])}, 101)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="NaN or infinite"):
            code.encode({"w": torch.tensor([0.1, bad])}, 1)
    with pytest.raises(ValueError, match="lower secure.max_examples"):
        FixedPoint.for_round(value_range=1.0, max_weight=2**30, num_clients=4)


def test_fixed_point_sum_at_the_extremes_does_not_overflow() -> None:
    code = FixedPoint.for_round(value_range=0.5, max_weight=100, num_clients=4)
    for sign in (1.0, -1.0):
        encoded = [code.encode({"w": torch.tensor([sign * 0.5])}, 100) for _ in range(4)]
        summed, weight = code.decode(sum(encoded).astype(np.uint32), {"w": torch.zeros(1)})
        assert weight == 400
        assert abs(summed["w"].item() - sign * 200.0) <= 4 / (2 * code.scale)


def test_shamir_any_t_shares_reconstruct_and_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=3, num_shares=5)
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), 3) == secret
    with pytest.raises(shamir.ShareError, match="3 are needed"):
        shamir.combine(shares[:2], 3)


def test_ring_neighbourhoods_are_symmetric_of_size_k_and_agreed_by_everyone() -> None:
    parties = Round(12, RING)
    names, bundles = parties.names, {b.client: b for b in parties.bundles}
    peers = RING.peers(bundles, parties.ring)
    assert all(len(peers[name]) == 4 and name not in peers[name] for name in names)
    assert all(a in peers[b] for a in names for b in peers[a])
    assert RING.peers(dict(reversed(list(bundles.items()))), parties.ring) == peers  # everyone: the same graph
    assert CONFIG.peers(bundles)[names[0]] == frozenset(names[1:])
    first_five = {name: bundles[name] for name in names[:5]}
    assert SecureAggregation(neighbours=4).peers(first_five)[names[0]] == frozenset(names[1:5])  # complete


def test_the_ring_is_ordered_by_secrets_revealed_after_the_round_is_fixed() -> None:
    """The keys the server forwards do not fix the ring: each client's ring secret, committed to in its keys and
    revealed only for the round's set of keys, does; another secret for one client gives another ring."""
    parties = Round(12, RING)
    bundles = {b.client: b for b in parties.bundles}
    rings = set()
    for _ in range(3):  # the same keys, one client's secret drawn again (a new round of the same clients)
        secret = secrets.token_bytes(32)
        ring = {**parties.ring, parties.names[0]: dataclasses.replace(parties.ring[parties.names[0]], secret=secret)}
        rings.add(tuple(sorted((k, tuple(sorted(v))) for k, v in RING.peers(bundles, ring).items())))
    assert len(rings) == 3
    with pytest.raises(ProtocolError, match="ring secret of every client"):
        RING.peers(bundles)


def test_a_client_reveals_its_ring_secret_for_one_set_of_clients_and_checks_everyone_elses() -> None:
    """Shown a second U1 in a round it refuses (the server would pick the set after seeing the secrets), and it
    deals no shares over a U1 it did not reveal for, nor with a secret that misses its commitment or was
    revealed for another U1."""
    parties = Round(8, RING)
    victim = parties.names[0]
    state = parties.states[victim]
    fewer = parties.bundles[:-1]
    with pytest.raises(ProtocolError, match="already revealed its ring secret"):
        masking.reveal_ring(state, fewer, parties.public, parties.identities[victim], RING)
    again = masking.reveal_ring(state, parties.bundles, parties.public, parties.identities[victim], RING)
    assert again == parties.ring[victim]  # the same set again: the same answer
    fresh = copy.deepcopy(state)
    with pytest.raises(ProtocolError, match="other clients than those"):
        masking.share_keys(fresh, fewer, parties.public, RING, parties.ring)
    other = parties.names[1]
    wrong_secret = {**parties.ring, other: dataclasses.replace(parties.ring[other], secret=bytes(32))}
    with pytest.raises(ProtocolError, match=f"ring secret of {other}"):
        masking.share_keys(copy.deepcopy(state), parties.bundles, parties.public, RING, wrong_secret)
    view = view_digest(SESSION, fewer)  # a secret revealed for another set of clients
    elsewhere = RingReveal(other, parties.ring[other].secret, b"")
    elsewhere = dataclasses.replace(
        elsewhere, signature=parties.identities[other].sign(elsewhere.signed_bytes(SESSION, view))
    )
    with pytest.raises(ProtocolError, match=f"ring secret of {other} was not revealed by it"):
        masking.share_keys(
            copy.deepcopy(state), parties.bundles, parties.public, RING, {**parties.ring, other: elsewhere}
        )
    missing = {k: v for k, v in parties.ring.items() if k != other}
    with pytest.raises(ProtocolError, match="ring secret of every client"):
        masking.share_keys(copy.deepcopy(state), parties.bundles, parties.public, RING, missing)


def test_with_neighbourhoods_a_client_shares_and_masks_only_with_its_peers() -> None:
    parties = Round(9, RING)
    for name in parties.names:
        assert set(parties.sealed[name]) == set(RING.peers({b.client: b for b in parties.bundles}, parties.ring)[name])
    uploads = {n: parties.upload(n, parties.names) for n in parties.names}
    exact = sum(parties.code.encode(parties.updates[n], parties.weights[n]) for n in parties.names)
    assert np.array_equal(parties.unmask(uploads, parties.names), exact.astype(np.uint32))


def test_odd_or_tiny_neighbourhoods_are_refused() -> None:
    for value in (1, 3):
        with pytest.raises(ValueError, match="secure.neighbours"):
            SecureAggregation(neighbours=value)


def test_a_client_reveals_only_for_the_unmask_lists_it_signed_and_t_of_its_peers_signed_too() -> None:
    """The consistency check: a server that tells clients different stories of who dropped cannot gather t
    signatures on two of them (honest clients sign one per round), so no client reveals for either."""
    parties = Round(5)
    for name in parties.names:
        parties.upload(name, parties.names)
    a, b, c, d, e = parties.names
    story, other = ([a, b, c], [d, e]), ([a, b, d], [c, e])
    signed = {n: masking.agree(parties.states[n], *story, parties.identities[n]) for n in (a, b)}
    with pytest.raises(ProtocolError, match="already signed other unmask lists"):
        masking.agree(parties.states[a], *other, parties.identities[a])
    with pytest.raises(
        ProtocolError, match="2 of the peers this client masked with signed these unmask lists, 3 are needed"
    ):
        masking.reveal_shares(parties.states[a], *story, signed)
    forged = {**signed, c: parties.identities[a].sign(masking.agreement_bytes(SESSION, c, "x"))}
    with pytest.raises(ProtocolError, match="2 of the peers this client masked with signed"):
        masking.reveal_shares(parties.states[a], *story, forged)
    signed[c] = masking.agree(parties.states[c], *story, parties.identities[c])
    assert masking.reveal_shares(parties.states[a], *story, signed)["mask_key"].keys() == {d, e}
    with pytest.raises(ProtocolError, match="not the unmask lists this node signed"):
        masking.reveal_shares(parties.states[a], *other, signed)
