"""BLS aggregate signatures for the global consistency quorum (blspy's ``PopSchemeMPL``).

Why: the default consistency check asks every site for proof that floor(2n/3) + 1 of
the cohort signed the identical survivor set before it reveals a share. With one
Ed25519 signature per signer that is ~2n/3 verifications per site (6,667 at
n = 10,000). With BLS, the server adds the signers' signatures into one G2 element and
a site checks it with one ``FastAggregateVerify`` (two pairings, whatever n is) after
adding the signers' public keys (cheap G1 additions in C).

Rogue keys: adding public keys is only sound if no one can choose a key as a function
of another's (pk_rogue = g^x - pk_target makes pk_target + pk_rogue = g^x, which signs
for both). The proof-of-possession scheme (IETF BLS draft, ``PopSchemeMPL``) defeats it:
a key is accepted only with a signature on the key itself under its own secret key,
which no one can make for pk_rogue without knowing pk_target's secret. Every key is
checked (PoP and identity binding) before it is ever added; nothing here implements a
curve or field operation: blspy does.

Identity: the Ed25519 identity key stays the root of trust (the pinned roster lists
Ed25519 keys). A site's BLS key is bound to its identity by an Ed25519 signature over
(:data:`LABEL_BINDING`, run id, BLS public key), sent with its key advertisement
together with the PoP. The binding is per *run*, not per round: a per-round binding
would cost every site one Ed25519 verification per peer per round, exactly the O(n)
this module removes. Freshness comes from the signed statement instead, which covers
the round context (run, round, cohort, parameters, mode) and the whole survivor set.

Key lifetime: one BLS key per (identity, run), derived from the identity key with
HKDF (:func:`run_secret`), so the train and evaluation instances of a site, and a site
that lost its per-run state, present the same key and peers verify it once; a leaked
key of an old run (its binding names that run) is worthless in a later one. Each
round keeps the key it advertised among its secrets (``_RoundSecrets.bls_sk``, saved in
the client's state like the X25519 secrets). Peers verify each (identity, run, key,
PoP, binding) once and keep the parsed key in a process-wide cache keyed by those
bytes (:func:`bound_key`): parsing a G1 key costs ~60 us and a PoP check ~1.2 ms.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from blspy import G1Element, G2Element, PopSchemeMPL, PrivateKey
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgs_flower.secagg import identity
from sgs_flower.secagg.errors import MalformedMessageError, SignatureError
from sgs_flower.secagg.memo import memo_by_identity

PUBLIC_KEY_BYTES = 48  # a compressed G1 point
SIGNATURE_BYTES = 96  # a compressed G2 point (a signature, a PoP or an aggregate)
SECRET_BYTES = 32
#: A roster entry: BLS public key || proof of possession || Ed25519 binding signature.
ENTRY_BYTES = PUBLIC_KEY_BYTES + SIGNATURE_BYTES + identity.SIGNATURE_BYTES

LABEL_KEY = b"sgs-flower/bls-consistency-key/v1"
LABEL_BINDING = b"sgs-flower/bls-key-binding/v1"

CACHE_LIMIT = 1 << 17  # verified keys kept per process (oldest forgotten first)
_verified: OrderedDict[tuple[bytes, int, bytes], G1Element] = OrderedDict()
# Digests of the entries verified (binding and PoP) by this site, which the Flower mod
# keeps in the site's own Context.state: a deployed site runs each message in a new
# process, and without them it would check every peer's binding and PoP again at every
# roster and unmask stage (~1.3 ms per peer: 13 s per message at n = 10,000). Only the
# site writes its Context.state; the server never sees or sets it.
DIGEST_BYTES = 32  # full SHA-256: the server may choose both entries of a colliding pair
_trusted: OrderedDict[bytes, None] = OrderedDict()


def _entry_digest(identity_key: bytes, run_id: int, blob: bytes) -> bytes:
    return hashlib.sha256(LABEL_BINDING + identity_key + struct.pack(">Q", run_id) + blob).digest()


# The last blob joined by verified_digests or merged by trust_verified, and the count it
# holds: sites driven in one process save and load the same n digests at every message,
# and joining or merging them each time was O(n) per site and message (O(n^2) a round).
_last_blob: list[bytes] = [b""]


def verified_digests() -> bytes:
    """The digests of every entry this process verified, oldest first (for the site's
    state; :func:`trust_verified` in the next process)."""
    if len(_last_blob[0]) != len(_trusted) * DIGEST_BYTES:
        _last_blob[0] = b"".join(_trusted)
    return _last_blob[0]


def verified_count() -> int:
    """How many entry digests :func:`verified_digests` would return (without joining them)."""
    return len(_trusted)


def trust_verified(blob: bytes) -> None:
    """Entries this site verified in an earlier process (:func:`verified_digests`, read
    back from its own state): their binding and PoP are not checked again, only parsed."""
    if len(blob) % DIGEST_BYTES:
        raise MalformedMessageError(f"verified BLS key digests must be {DIGEST_BYTES}-byte records")
    if blob == _last_blob[0] and len(blob) == len(_trusted) * DIGEST_BYTES:
        return  # this process holds exactly these digests already
    for i in range(0, len(blob), DIGEST_BYTES):
        _trusted[blob[i : i + DIGEST_BYTES]] = None
    while len(_trusted) > CACHE_LIMIT:
        _trusted.popitem(last=False)


def run_secret(ident: bytes, run_id: int) -> bytes:
    """The site's BLS secret key for ``run_id`` (32 bytes), derived from its Ed25519
    identity key: HKDF-SHA256 under its own label and the run id gives the seed of the
    scheme's KeyGen. Deterministic, so every instance of the site in a run (train and
    evaluation rounds, a restored state) advertises the same key."""
    seed = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=LABEL_KEY + struct.pack(">Q", run_id)).derive(ident)
    return bytes(PopSchemeMPL.key_gen(seed))


def binding_statement(run_id: int, public: bytes) -> bytes:
    """What a site's identity key signs to own a BLS key in a run."""
    return LABEL_BINDING + struct.pack(">Q", run_id) + public


def advertisement(ident: bytes, run_id: int, secret: bytes) -> tuple[bytes, bytes, bytes]:
    """(BLS public key, proof of possession, identity binding) for the key advertisement."""
    return _advertisement(ident, run_id, secret)


@memo_by_identity(4)
def _advertisement(ident: bytes, run_id: int, secret: bytes) -> tuple[bytes, bytes, bytes]:
    # cached: a pure function of the site's key and the run; a PoP costs ~0.4 ms
    sk = _secret(secret)
    public = bytes(sk.get_g1())
    return public, bytes(PopSchemeMPL.pop_prove(sk)), identity.sign(ident, binding_statement(run_id, public))


def _secret(secret: bytes) -> PrivateKey:
    if len(secret) != SECRET_BYTES:
        raise MalformedMessageError(f"a BLS secret key is {SECRET_BYTES} bytes, got {len(secret)}")
    try:
        return PrivateKey.from_bytes(secret)
    except ValueError as exc:
        raise MalformedMessageError(f"a BLS secret key is invalid: {exc}") from exc


def sign(secret: bytes, statement: bytes) -> bytes:
    """The 96-byte BLS signature of ``statement`` (the PoP scheme's signing DST)."""
    return bytes(PopSchemeMPL.sign(_secret(secret), statement))


def entry(public: bytes, pop: bytes, binding: bytes) -> bytes:
    """The roster entry the server forwards for one cohort member (:data:`ENTRY_BYTES`)."""
    return public + pop + binding


def bound_key(identity_key: bytes, run_id: int, blob: bytes, node: int) -> G1Element:
    """The parsed BLS public key of a roster entry, after the checks that make adding it
    to others sound: its length, a valid (non-identity) G1 point, its proof of possession
    (defeats rogue keys) and its binding to ``identity_key`` for this run (only the site
    holding that identity could have advertised it). Any failure is a typed error naming
    ``node``. Verified once per (identity, run, entry) bytes and cached in the process."""
    key = (identity_key, run_id, blob)
    hit = _verified.get(key)
    if hit is not None:
        return hit
    if len(blob) != ENTRY_BYTES:
        raise MalformedMessageError(f"BLS key entry of node {node} must be {ENTRY_BYTES} bytes, got {len(blob)}")
    digest = _entry_digest(identity_key, run_id, blob)
    if digest in _trusted:  # this site checked these very bytes in an earlier process
        return _remember(key, _parse_public(blob[:PUBLIC_KEY_BYTES], node))
    pk = _check(identity_key, run_id, blob, node)
    _trust(digest)
    return _remember(key, pk)


def _check(identity_key: bytes, run_id: int, blob: bytes, node: int) -> G1Element:
    """The checks of :func:`bound_key` on an entry of the right length, touching no
    cache (so threads may run it: :func:`prefetch`)."""
    public, pop = blob[:PUBLIC_KEY_BYTES], blob[PUBLIC_KEY_BYTES : PUBLIC_KEY_BYTES + SIGNATURE_BYTES]
    binding = blob[PUBLIC_KEY_BYTES + SIGNATURE_BYTES :]
    if not identity.verify(identity_key, binding, binding_statement(run_id, public)):
        raise SignatureError(
            f"node {node}'s BLS key is not bound to its identity key for this run (the binding signature does not verify)"
        )
    pk = _parse_public(public, node)
    try:
        proof = G2Element.from_bytes(pop)
    except ValueError as exc:
        raise MalformedMessageError(f"node {node}'s proof of possession is not a valid point: {exc}") from exc
    if not PopSchemeMPL.pop_verify(pk, proof):
        raise SignatureError(
            f"node {node}'s BLS key carries no valid proof of possession (a rogue key?); refused"
        )
    return pk


def _trust(digest: bytes) -> None:
    _trusted[digest] = None
    while len(_trusted) > CACHE_LIMIT:
        _trusted.popitem(last=False)


#: Below this many unchecked entries the checks run in the caller's thread.
PARALLEL_MIN = 64


def prefetch(entries: Sequence[tuple[bytes, int, bytes]]) -> int:
    """Check the (identity key, run id, entry) triples not yet checked by this process,
    in parallel threads, and cache those that pass every check of :func:`bound_key`;
    returns how many were checked. Nothing is refused here: an entry that fails stays
    unchecked, and the caller's own :func:`bound_key` call names it in its typed error.

    Why: the first round of a run checks every member's key (a PoP verification,
    ~1.3-1.7 ms each: 13-17 s at n = 10,000, on the server and at each site), and
    blspy's pairings and libsodium release the GIL, so threads use every core the
    machine has (the server's were idle while one core checked them)."""
    todo = []
    for identity_key, run_id, blob in entries:
        if (identity_key, run_id, blob) in _verified or len(blob) != ENTRY_BYTES:
            continue
        digest = _entry_digest(identity_key, run_id, blob)
        if digest not in _trusted:
            todo.append((identity_key, run_id, blob, digest))
    if len(todo) < PARALLEL_MIN:
        return 0
    workers = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
    if workers == 1:
        return 0

    def check(item: tuple[bytes, int, bytes, bytes]) -> G1Element | None:
        try:
            return _check(item[0], item[1], item[2], -1)
        except (SignatureError, MalformedMessageError):
            return None

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(check, todo, chunksize=max(1, len(todo) // (4 * workers))))
    for (identity_key, run_id, blob, digest), pk in zip(todo, results, strict=True):
        if pk is not None:  # the caches are written here, in the caller's thread only
            _trust(digest)
            _remember((identity_key, run_id, blob), pk)
    return len(todo)


def _parse_public(public: bytes, node: int) -> G1Element:
    try:
        pk = G1Element.from_bytes(public)
    except ValueError as exc:
        raise MalformedMessageError(f"node {node}'s BLS key is not a valid point: {exc}") from exc
    if pk == G1Element():
        raise SignatureError(f"node {node}'s BLS key is the identity point (it would sign for no one); refused")
    return pk


def _remember(key: tuple[bytes, int, bytes], pk: G1Element) -> G1Element:
    _verified[key] = pk
    while len(_verified) > CACHE_LIMIT:
        _verified.popitem(last=False)
    return pk


def key_table(
    entries: tuple[tuple[int, bytes], ...], identities: dict[int, bytes], run_id: int
) -> dict[int, G1Element]:
    """Every cohort member's checked BLS key (:func:`bound_key`), by node id. The entries
    must name exactly the members of the identity table, each once (a member without a
    key could not be counted; a key for a non-member is a lie). Memoised by object
    identity: the n clients of an in-process round share one table, so the round costs
    O(n) dictionary work, not O(n^2)."""
    return _key_table(entries, identities, run_id)


@memo_by_identity(8)
def _key_table(
    entries: tuple[tuple[int, bytes], ...], identities: dict[int, bytes], run_id: int
) -> dict[int, G1Element]:
    table: dict[int, G1Element] = {}
    seen: dict[bytes, int] = {}
    prefetch([(identities[node], run_id, bytes(blob)) for node, blob in entries if node in identities])
    for node, blob in entries:
        if node not in identities:
            raise MalformedMessageError(f"BLS key table names node {node}, which has no identity in this round")
        if node in table:
            raise MalformedMessageError(f"BLS key table names node {node} twice")
        public = bytes(blob[:PUBLIC_KEY_BYTES])
        if public in seen:  # one key under two identities would let one signature count twice
            raise MalformedMessageError(f"nodes {seen[public]} and {node} present the same BLS key")
        seen[public] = node
        table[node] = bound_key(identities[node], run_id, bytes(blob), node)
    if len(table) != len(identities):
        missing = sorted(set(identities) - set(table))[:8]
        raise MalformedMessageError(f"BLS key table lacks the keys of nodes {missing}")
    return table


def parse_signature(blob: bytes, what: str) -> G2Element:
    """A 96-byte G2 point (checked to be on the curve and in the subgroup), or
    :class:`MalformedMessageError` naming ``what``."""
    if len(blob) != SIGNATURE_BYTES:
        raise MalformedMessageError(f"{what} must be {SIGNATURE_BYTES} bytes, got {len(blob)}")
    try:
        return G2Element.from_bytes(bytes(blob))
    except ValueError as exc:
        raise MalformedMessageError(f"{what} is not a valid G2 point: {exc}") from exc


def aggregate(signatures: Sequence[G2Element]) -> G2Element:
    """The sum of the signatures (one 96-byte signature for all of them)."""
    return PopSchemeMPL.aggregate(list(signatures))


def verify(public: G1Element, statement: bytes, signature: G2Element) -> bool:
    return bool(PopSchemeMPL.verify(public, statement, signature))


def signers_key(table: dict[int, G1Element], signers: frozenset[int]) -> G1Element:
    """The sum of the ``signers``' keys (each a distinct key of ``table``: the caller
    checked the list), which is what ``FastAggregateVerify`` verifies against.

    Why not sum the signers' keys: a quorum is at least two thirds of the cohort and in
    practice nearly all of it, so the table's total (summed once per table object, which
    the in-process sites of a round share) minus the few keys that did not sign costs
    O(n - |signers|) G1 additions per site instead of O(|signers|)."""
    absent = table.keys() - signers
    if len(absent) >= len(signers):
        return _sum(table[v] for v in signers)
    key = _table_total(table)
    for v in absent:
        key = key + table[v].negate()
    return key


def _sum(points: Iterable[G1Element]) -> G1Element:
    total = G1Element()
    for p in points:
        total = total + p
    return total


@memo_by_identity(8)
def _table_total(table: dict[int, G1Element]) -> G1Element:
    return _sum(table.values())


def verify_signers(
    table: dict[int, G1Element], signers: frozenset[int], statement: bytes, signature: G2Element
) -> bool:
    """Whether ``signature`` is the aggregate of one signature on ``statement`` by each of
    ``signers`` (keys PoP-checked by :func:`bound_key`, so the sum of their keys cannot
    hide a rogue key): the same check as ``FastAggregateVerify`` over their keys, two
    pairings, with the keys summed by :func:`signers_key`."""
    if not signers:
        return False
    return verify(signers_key(table, signers), statement, signature)


def fast_aggregate_verify(publics: Sequence[G1Element], statement: bytes, signature: G2Element) -> bool:
    """Whether ``signature`` is the aggregate of one signature on ``statement`` by each
    key in ``publics`` (every key PoP-checked before: :func:`bound_key`). Two pairings
    and len(publics) G1 additions, all in blspy's C++."""
    if not publics:
        return False
    return bool(PopSchemeMPL.fast_aggregate_verify(list(publics), statement, signature))


def clear_cache() -> None:
    """Forget every verified key and digest (tests, and benchmarks timing a cold site)."""
    _verified.clear()
    _trusted.clear()
    _last_blob[0] = b""


@contextmanager
def separate_caches() -> Iterator[None]:
    """Run the body with this process's caches of verified keys and digests empty, and
    give the caller's back after. Why: a deployed site answers each message in a process
    of its own, which knows only the digests its own store hands back
    (:func:`trust_verified`); sites driven in one process
    (:mod:`sgs_flower.driver.inprocess`) would otherwise reuse each other's, and the
    server's, checks, and a benchmark would time less than a site does."""
    global _verified, _trusted, _last_blob
    saved = _verified, _trusted, _last_blob
    _verified, _trusted, _last_blob = OrderedDict(), OrderedDict(), [b""]
    try:
        yield
    finally:
        _verified, _trusted, _last_blob = saved
