"""Key agreement, key derivation and share encryption, composed from standard parts.

- X25519 for both key pairs of a client: ``c`` keys (share encryption) and ``s`` keys
  (pairwise masks), as in Bonawitz et al. 2017.
- HKDF-SHA256 turns every raw secret into a full 256-bit key. Its ``info`` binds a
  label, the round context (run, round, cohort, graph and, for masks, the digest of
  the global model and config the client received) and the pair of clients, so a key
  is never reused across rounds, pairs or purposes.
- AES-256-GCM encrypts shares; its associated data binds the context, the sender and
  the receiver, so a share cannot be replayed into another round or re-routed.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sgs_flower.secagg.errors import MalformedMessageError, ShareDecryptionError
from sgs_flower.secagg.memo import memo_by_identity

PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12

LABEL_PAIRWISE = b"sgs-flower/pairwise-mask/v1"
LABEL_SELF = b"sgs-flower/self-mask/v1"
LABEL_SHARE = b"sgs-flower/share-encryption/v1"
LABEL_COMMIT = b"sgs-flower/self-mask-commitment/v1"
LABEL_CONTEXT = b"sgs-flower/round-context/v1"
LABEL_ADVERTISE = b"sgs-flower/advertise-signature/v2"
LABEL_CONSISTENCY = b"sgs-flower/consistency-signature/v2"
LABEL_RETRY = b"sgs-flower/retry-context/v1"


_U64 = struct.Struct(">Q").pack
_U64_PAIR = struct.Struct(">QQ").pack


def node_bytes(node_id: int) -> bytes:
    """A node id as 8 big-endian bytes (Flower node ids are unsigned 64-bit)."""
    return _U64(node_id)


def pack_nodes(nodes: Iterable[int]) -> bytes:
    """Node ids as concatenated 8-byte big-endian words (what :func:`node_bytes` gives
    one at a time), packed in one C call: survivor sets and cohorts of 10,000 are hashed
    by every client, and a Python loop over them made the round O(n^2) in process."""
    return np.fromiter(nodes, dtype=np.uint64).astype(">u8").tobytes()


def unpack_nodes(blob: bytes) -> tuple[int, ...]:
    """The node ids of :func:`pack_nodes`, in one C call; a length that is not whole
    8-byte ids is a :class:`MalformedMessageError`."""
    if len(blob) % 8:
        raise MalformedMessageError(f"a packed node list must be whole 8-byte ids, got {len(blob)} bytes")
    return tuple(np.frombuffer(blob, dtype=">u8").tolist())


def round_context(
    version: str,
    run_id: int,
    round_id: int,
    cohort: Iterable[int],
    degree: int,
    threshold: int,
    field_bits: int,
    vector_length: int,
    graph_seed: bytes,
    bound_digest: bytes,
    consistency: str = "global",
) -> bytes:
    """SHA-256 over everything a round's keys must be bound to.

    ``consistency`` is the round's consistency quorum ("global" or "neighbourhood"): it
    is in the context that every advertisement and consistency signature covers, so a
    server that announces one mode to some sites and the other to others gets
    advertisements that do not verify across the two groups (refused at the roster,
    before any share is made).

    ``bound_digest`` is the digest of the global model and round config *as this party
    holds them*. A server that sends one client a different model gives that client a
    different context, so its masks do not cancel and the server learns garbage.
    """
    return _round_context(version, run_id, round_id, tuple(cohort), degree, threshold, field_bits,
                          vector_length, bytes(graph_seed), bytes(bound_digest), consistency)


@memo_by_identity(32)
def _round_context(
    version: str, run_id: int, round_id: int, cohort: tuple[int, ...], degree: int, threshold: int,
    field_bits: int, vector_length: int, graph_seed: bytes, bound_digest: bytes, consistency: str,
) -> bytes:
    # cached: a pure function that every in-process client of a round recomputes
    h = hashlib.sha256(LABEL_CONTEXT)
    cohort_list = sorted(cohort)
    h.update(struct.pack(">I", len(version)) + version.encode())
    h.update(struct.pack(">QQIIII", run_id, round_id, degree, threshold, field_bits, vector_length))
    h.update(struct.pack(">I", len(cohort_list)) + pack_nodes(cohort_list))
    h.update(struct.pack(">I", len(graph_seed)) + graph_seed)
    h.update(struct.pack(">I", len(bound_digest)) + bound_digest)
    mode = consistency.encode()
    h.update(struct.pack(">I", len(mode)) + mode)
    return h.digest()


def round_contexts(setup: Any, seed: bytes, bound_digest: bytes) -> tuple[bytes, bytes]:
    """(mask context, share context) of a round from its Setup message.

    Masks are keyed by the full context, model digest included: a client that received
    a different model masks with keys its neighbours do not share, so the pairwise
    masks do not cancel and the server's sum is garbage, which the count coordinate
    then reports. Share encryption is keyed by the protocol parameters alone, so that
    such a client's shares still authenticate, the round runs to its end, and the
    inconsistency is *reported* as one instead of surfacing as an unexplained abort.
    Nothing is lost by this: shares are revealed to the server by design.
    """
    args = (
        setup.version, setup.run_id, setup.round_id, setup.cohort, setup.degree, setup.threshold,
        setup.field_bits, setup.vector_length, seed,
    )
    mode = setup.consistency
    return round_context(*args, bound_digest, mode), round_context(*args, b"", mode)


def retry_context(mask_context: bytes, attempt: int, spec_digest: bytes) -> bytes:
    """The mask context of a retry of the masked input: the round's mask context (model
    digest included), the attempt number and the digest of the retry's spec, under their
    own label. Masks derived from it are independent of the round's (HKDF with another
    ``info``), and two sites given different retry specs mask with keys that do not
    cancel."""
    h = hashlib.sha256(LABEL_RETRY)
    h.update(struct.pack(">I", len(mask_context)) + mask_context)
    h.update(struct.pack(">I", attempt))
    h.update(struct.pack(">I", len(spec_digest)) + spec_digest)
    return h.digest()


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def private_bytes(sk: X25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    return sk.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_private_key(raw: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(raw)


def agree(sk: X25519PrivateKey, peer_public: bytes, peer: int) -> bytes:
    """X25519 with a peer's advertised key; a malformed or low-order key is refused."""
    if len(peer_public) != PUBLIC_KEY_BYTES:
        raise MalformedMessageError(
            f"public key of node {peer} must be {PUBLIC_KEY_BYTES} bytes, got {len(peer_public)}"
        )
    try:
        return sk.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # all-zero shared secret: a low-order point
        raise MalformedMessageError(f"public key of node {peer} is invalid: {exc}") from exc


def derive(secret: bytes, label: bytes, context: bytes, *parts: int) -> bytes:
    """HKDF-SHA256(secret) -> 32-byte key, bound to label, context and the node ids."""
    ids = _U64_PAIR(*parts) if len(parts) == 2 else b"".join(map(_U64, parts))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=label + context + ids).derive(secret)


def pairwise_mask_key(shared: bytes, context: bytes, u: int, v: int) -> bytes:
    """The pairwise-mask PRG key of {u, v}; symmetric, so both ends derive the same."""
    lo, hi = (u, v) if u < v else (v, u)
    return derive(shared, LABEL_PAIRWISE, context, lo, hi)


def self_mask_key(b_u: bytes, context: bytes, u: int) -> bytes:
    """The self-mask PRG key of client u from its secret seed b_u."""
    return derive(b_u, LABEL_SELF, context, u)


def self_mask_commitment(b_u: bytes, run_id: int, round_id: int, u: int) -> bytes:
    """A hiding commitment to b_u (b_u is 256 random bits), so the server can check a
    reconstruction. It deliberately omits the model digest: a reconstruction must
    verify even for a client that saw an inconsistent model, so that inconsistency is
    reported as such rather than as a corrupt share."""
    return hashlib.sha256(LABEL_COMMIT + struct.pack(">QQQ", run_id, round_id, u) + b_u).digest()


def share_key(shared: bytes, context: bytes, u: int, v: int) -> bytes:
    lo, hi = (u, v) if u < v else (v, u)
    return derive(shared, LABEL_SHARE, context, lo, hi)


def _aad(context: bytes, sender: int, receiver: int) -> bytes:
    return context + _U64_PAIR(sender, receiver)


def encrypt_share(key: bytes, plaintext: bytes, context: bytes, sender: int, receiver: int) -> bytes:
    """AES-256-GCM with a random nonce; returns nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, _aad(context, sender, receiver))


def decrypt_share(key: bytes, blob: bytes, context: bytes, sender: int, receiver: int) -> bytes:
    """Authenticate and decrypt a share; any tampering raises :class:`ShareDecryptionError`."""
    if len(blob) < NONCE_BYTES + 16:
        raise ShareDecryptionError(f"share ciphertext from node {sender} is truncated ({len(blob)} bytes)")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], _aad(context, sender, receiver))
    except InvalidTag as exc:
        raise ShareDecryptionError(
            f"share ciphertext from node {sender} to node {receiver} failed authentication: "
            "it was tampered with, re-routed or replayed from another round"
        ) from exc


def advertise_statement(share_context: bytes, node: int, c_pk: bytes, s_pk: bytes, commitment: bytes) -> bytes:
    """What a node signs when it advertises its round keys: the round's parameters (the
    share context covers version, run, round, cohort, degree, threshold, field, vector
    length and graph seed), its node id and both public keys, so a server can neither
    swap a key nor move the advertisement to another node, round or run."""
    return LABEL_ADVERTISE + share_context + _U64(node) + c_pk + s_pk + commitment


def consistency_statement(share_context: bytes, survivors: Iterable[int]) -> bytes:
    """What a survivor signs at the consistency check: the round and the whole survivor
    set (each client signs the set it was sent, so two sets never share a signature)."""
    return _consistency_statement(share_context, tuple(survivors))


@memo_by_identity(8)
def _consistency_statement(share_context: bytes, survivors: tuple[int, ...]) -> bytes:
    members = sorted(survivors)
    return LABEL_CONSISTENCY + share_context + struct.pack(">I", len(members)) + pack_nodes(members)
