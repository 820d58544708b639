"""The protocol's messages, defined once for both sides, and their byte encoding.

Every message carries the protocol version, run id, round id and stage, and the sender
(client to server) or recipient (server to client), so a receiver can reject anything
stale, replayed or mis-addressed before looking at its payload. The Flower glue moves
these messages as bytes (:func:`encode` / :func:`decode`); the in-process driver moves
the objects themselves.

Byte format: 4-byte magic, 4-byte big-endian header length, a canonical JSON header
(bytes fields as base64), then for a masked input the vector packed densely at the
field's width b (:func:`pack_words`: about m * b / 8 bytes for m coordinates, whatever
b is). A masked input declares its ``field_bits``; the server checks it against the
round's. The upload is b / 32 of the float32 update (0.5x for a 16-bit field).

Pipelining (``sgs-secagg+/3``): a server-to-client Flower message carries one or two
*parts*, each a complete message of this module with its own header. The first part
(``stage`` / ``payload``) belongs to the round the exchange serves; the optional second
(``next-stage`` / ``next-payload``) sets up the following round ahead of time and may
only be one of :data:`PIPELINED_STAGES` (a :class:`Setup` riding on a consistency
request, a :class:`KeyRoster` riding on an unmask request) for the same run and round
+ 1. The client's reply carries the first part's answer in ``payload`` and the second's
in ``next-payload`` (or, if the site refused it, a short ``next-error`` naming the check).
Each part is decoded with the same size limits as a single message.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from dataclasses import dataclass, field, fields
from enum import IntEnum
from typing import Any, ClassVar

import numpy as np

from sgs_flower.secagg.errors import MalformedMessageError
from sgs_flower.secagg.memo import memo_by_identity

# /4: the masked vector's layout changed (failure counters outside DP, the flag coordinate
# under DP: issue 18), so a /3 peer is refused at its first message, not at the vector.
# /5: the setup announces the consistency quorum (global by default, or per neighbourhood:
# issue 21, where an unmask request carries only the recipient's neighbours' signatures,
# which a /4 site would refuse as too few), and the round context binds it; the masked
# vector travels packed at the round's width b (issue 21), and masked inputs declare it.
# /6: the global consistency quorum is one BLS aggregate signature (issue 30): a global
# round's advertisement carries a BLS key with its proof of possession and identity
# binding, the key roster every member's, the unmask request one aggregate and its
# signers, which a /5 site could not check: a /5 peer is refused at its first message.
# /7: input validation (issue 31): the consistency request may carry the survivors'
# masked-input digests, the consistency reply a bound proof and its identity signature,
# the unmask request evidence against cheaters (sgs_flower.secagg.input_validation).
# /8: what every recipient of a stage gets alike (the cohort, the identity and BLS key
# tables, the survivor set and its proof: :data:`SHARED_FIELDS`) travels in a shared part
# of its own, beside each recipient's own part (issue 30), which a /7 site cannot read.
PROTOCOL_VERSION = "sgs-secagg+/8"
CRYPTO_SUITE = (
    "X25519+HKDF-SHA256+AES-256-GCM(shares)+AES-256-CTR(masks)+Shamir-GF(2^31-1)+Ed25519(identities)"
    "+BLS12-381-PoP(global consistency)+BLS12-381-Bulletproofs(input validation)"
)
MAGIC = b"SGS2"
SHARED_MAGIC = b"SGSs"  # a shared part (:func:`encode_parts`): a header, no tail

# Keys of the Flower messages that carry the protocol, shared by strategies/ and clients/.
RECORD_KEY = "sgs.secagg"  # ConfigRecord: stage number and encoded protocol message
SPEC_KEY = "sgs.spec"  # ConfigRecord: the round's UpdateSpec (masked-input stage only)
VECTOR_KEY = "sgs.vector"  # ArrayRecord: the masked vector (masked-input replies only)
RAW_STYPE = "sgs.raw-le"  # Flower Array serialisation of the vector: raw little-endian words
PACKED_STYPE = "sgs.packed-le"  # ...: the words packed at the field's width (pack_words), as uint8
FIELD_STAGE = "stage"
FIELD_PAYLOAD = "payload"
FIELD_VECTOR = "vector"
# Masked-input replies: the names (never the values) of the train metrics in the
# vector's metric slots, in slot order, so the server can label their secure means.
FIELD_METRIC_NAMES = "metric-names"
FIELD_METRICS_LEFT_OUT = "metrics-left-out"
# Pipelining: the second part of a message (the next round's setup), and in a reply its
# answer or the site's refusal of it (the check's name, never a value of the site's).
FIELD_NEXT_STAGE = "next-stage"
FIELD_NEXT_PAYLOAD = "next-payload"
FIELD_NEXT_ERROR = "next-error"
# /8: the shared part of the first and of the second part (:func:`encode_parts`)
FIELD_SHARED = "shared"
FIELD_NEXT_SHARED = "next-shared"
MAX_PARTS = 2  # parts per message: this round's, and at most one of the next round's
MAX_ERROR_TEXT = 1024  # characters of a next-error text kept

# Size limits checked before anything is parsed or allocated. A client's own policy
# (sgs_flower.secagg.policy) is usually stricter; these bound what decoding may cost.
MAX_HEADER_BYTES = 16 << 20
MAX_LIST_ITEMS = 1 << 20
MAX_VECTOR_WORDS = (1 << 31) - 1


class Stage(IntEnum):
    """The stage a message belongs to (numbering of DESIGN.md section 3)."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    CONSISTENCY = 4
    UNMASK = 5
    RETRY = 6  # only after UNMASK, only when the unmasked sum held out-of-range values


#: Retries of one round's masked input a site answers at most (docs/protocol.md, "Retry").
MAX_RETRIES = 2


#: Stages of round r + 1 that may ride on round r's exchanges (and on which of them):
#: its keys are advertised during r's consistency check, shared during r's unmask.
PIPELINED_STAGES = {Stage.ADVERTISE_KEYS: Stage.CONSISTENCY, Stage.SHARE_KEYS: Stage.UNMASK}


@dataclass(frozen=True)
class NeighbourKeys:
    """A neighbour's signed advertisement, forwarded by the server unchanged: the
    recipient checks the signature before it encrypts anything to these keys."""

    node: int
    c_pk: bytes
    s_pk: bytes
    identity_key: bytes
    self_mask_commitment: bytes
    signature: bytes


@dataclass(frozen=True)
class Message:
    """Common header. Subclasses set ``stage`` and ``direction``."""

    run_id: int
    round_id: int
    stage: ClassVar[Stage]
    to_server: ClassVar[bool]


# ---------------------------------------------------------------- server -> client
@dataclass(frozen=True)
class Setup(Message):
    """Stage 0 -> 1: the round's public parameters; the client answers with its keys.

    There is no graph seed: both ends derive it from the run, round and cohort
    (:func:`sgs_flower.secagg.graph.graph_seed`), so the server cannot pick one."""

    recipient: int
    cohort: tuple[int, ...]
    degree: int
    threshold: int
    field_bits: int
    vector_length: int
    # the consistency quorum the round uses, "global" (default) or "neighbourhood" (sites
    # opt in: policy sgs-consistency); bound into the round context every signature covers
    consistency: str = "global"
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    to_server: ClassVar[bool] = False


@dataclass(frozen=True)
class KeyRoster(Message):
    """Stage 1 -> 2: the signed keys of the recipient's neighbours that advertised, and
    the identity key of every cohort member that advertised (to check consistency
    signatures later; with a roster, the recipient refuses keys not on it).

    ``bls_keys`` (global consistency rounds only, else empty): every such member's BLS
    key entry (:data:`sgs_flower.secagg.bls.ENTRY_BYTES`: key, proof of possession,
    identity binding), which the recipient checks once per key before it shares anything
    (a key it cannot check is a refusal, a rogue key never gets into an aggregate)."""

    recipient: int
    keys: tuple[NeighbourKeys, ...]
    identities: tuple[tuple[int, bytes], ...]
    bls_keys: tuple[tuple[int, bytes], ...] = ()
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.SHARE_KEYS
    to_server: ClassVar[bool] = False


@dataclass(frozen=True)
class ShareBundle(Message):
    """Stage 2 -> 3: the encrypted shares addressed to the recipient, by sender."""

    recipient: int
    ciphertexts: tuple[tuple[int, bytes], ...]
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    to_server: ClassVar[bool] = False


@dataclass(frozen=True)
class ConsistencyRequest(Message):
    """Stage 3 -> 4: the survivor set U3 (every node whose masked input the server
    summed), the same for every recipient; each survivor signs it once.

    In a validated round (issue 31) ``digests`` holds each survivor's masked-input
    digest, in the survivor set's order: the challenge seed every site derives hashes
    them, so it is fixed only after every x is (empty otherwise)."""

    recipient: int
    survivors: tuple[int, ...]
    digests: tuple[tuple[int, bytes], ...] = ()
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.CONSISTENCY
    to_server: ClassVar[bool] = False


@dataclass(frozen=True)
class UnmaskRequest(Message):
    """Stage 4 -> 5: U3 again, with the proof that a quorum signed it. There is no
    'dropped' list to lie in: the recipient derives who dropped from what it saw.

    In a global round the proof is ``aggregate`` (one 96-byte BLS signature, the sum of
    the signers' signatures) and ``signers`` (their node ids), and ``signatures`` is
    empty; in a neighbourhood round it is ``signatures`` (per signer, Ed25519) and the
    other two are empty."""

    recipient: int
    survivors: tuple[int, ...]
    signatures: tuple[tuple[int, bytes], ...] = ()
    aggregate: bytes = b""
    signers: tuple[int, ...] = ()
    # validated rounds: per survivor whose proof failed, its identity signature then the
    # proof it signed (input_validation.evidence_blob); each recipient checks it itself
    # and only then treats that survivor as a dropout
    evidence: tuple[tuple[int, bytes], ...] = ()
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.UNMASK
    to_server: ClassVar[bool] = False


@dataclass(frozen=True)
class RetryRequest(Message):
    """After UNMASK: re-encode the same update under the retry spec that travels beside
    this message (only ranges and the weight scale may change) and mask it again, for the
    same survivor set, under the round's secrets and a context domain-separated by the
    attempt number and the retry spec's digest. ``attempt`` counts from 1."""

    recipient: int
    survivors: tuple[int, ...]
    attempt: int
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.RETRY
    to_server: ClassVar[bool] = False


# ---------------------------------------------------------------- client -> server
@dataclass(frozen=True)
class AdvertiseKeys(Message):
    """The round's keys, signed with the identity key (``signature``); in a global
    round also the site's BLS key for the run, its proof of possession and its Ed25519
    binding to the identity (:mod:`sgs_flower.secagg.bls`), empty otherwise."""

    sender: int
    c_pk: bytes
    s_pk: bytes
    self_mask_commitment: bytes
    identity_key: bytes
    signature: bytes
    bls_key: bytes = b""
    bls_pop: bytes = b""
    bls_binding: bytes = b""
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    to_server: ClassVar[bool] = True


@dataclass(frozen=True)
class ShareKeys(Message):
    sender: int
    ciphertexts: tuple[tuple[int, bytes], ...]
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.SHARE_KEYS
    to_server: ClassVar[bool] = True


@dataclass(frozen=True, eq=False)
class MaskedInput(Message):
    sender: int
    vector: np.ndarray = field(repr=False)
    field_bits: int = 32  # the width the vector is masked (and packed) at
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.MASKED_INPUT
    to_server: ClassVar[bool] = True


@dataclass(frozen=True)
class ConsistencySignature(Message):
    """The sender's signature over the round and the survivor set it was sent: BLS
    (96 bytes, under the key it advertised) in a global round, Ed25519 (64 bytes) in a
    neighbourhood round.

    In a validated round also ``proof`` (the site's bound proof for the round's
    challenge) and ``proof_signature`` (Ed25519, its identity key, over
    :func:`sgs_flower.secagg.input_validation.proof_statement`); empty otherwise."""

    sender: int
    signature: bytes
    proof: bytes = b""
    proof_signature: bytes = b""
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.CONSISTENCY
    to_server: ClassVar[bool] = True


@dataclass(frozen=True)
class UnmaskResponse(Message):
    """Shares of the self-mask seed of surviving neighbours and of the masking key of
    dropped ones: one kind per neighbour, never both."""

    sender: int
    self_mask_shares: tuple[tuple[int, bytes], ...]
    key_shares: tuple[tuple[int, bytes], ...]
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.UNMASK
    to_server: ClassVar[bool] = True


@dataclass(frozen=True, eq=False)
class RetryInput(Message):
    """The re-encoded update, masked for the retry (see :class:`RetryRequest`)."""

    sender: int
    vector: np.ndarray = field(repr=False)
    field_bits: int = 32
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.RETRY
    to_server: ClassVar[bool] = True


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (
        Setup, KeyRoster, ShareBundle, ConsistencyRequest, UnmaskRequest, RetryRequest,
        AdvertiseKeys, ShareKeys, MaskedInput, ConsistencySignature, UnmaskResponse, RetryInput,
    )
}

#: The fields of a server message that are the same for every recipient of the stage and
#: grow with the cohort (O(n) each, the rest O(k)): they travel as a *shared part*,
#: encoded once per stage (:func:`encode_parts`), beside each recipient's own part.
#: Why: a 10,000-member roster is ~3.6 MB; encoding it into every recipient's message
#: made the server encode n copies (36 GB at n = 10,000) and every site parse its copy
#: as Python objects at every message. The shared part is one byte string the
#: transport can hand to many recipients, and a process that decodes it again for
#: another recipient (equal bytes) gets the objects it decoded before. It changes no
#: check: the recipient decodes both parts into the same message and checks it whole.
SHARED_FIELDS: dict[type[Message], tuple[str, ...]] = {
    Setup: ("cohort",),
    KeyRoster: ("identities", "bls_keys"),
    ConsistencyRequest: ("survivors", "digests"),
    UnmaskRequest: ("survivors", "aggregate", "signers"),
    RetryRequest: ("survivors",),
}


# ---------------------------------------------------------------- encoding
_NK_FIELDS = ("node", "c_pk", "s_pk", "identity_key", "self_mask_commitment", "signature")
_INT_FIELDS = {
    # field -> largest value accepted (checked before any use sizes anything)
    "run_id": (1 << 64) - 1, "round_id": (1 << 64) - 1, "sender": (1 << 64) - 1,
    "recipient": (1 << 64) - 1, "degree": MAX_LIST_ITEMS, "threshold": MAX_LIST_ITEMS,
    "field_bits": 64, "vector_length": MAX_VECTOR_WORDS, "attempt": 64,
}
_NODE_LIST_FIELDS = ("cohort", "survivors", "signers")
_BYTES_FIELDS = ("c_pk", "s_pk", "self_mask_commitment", "identity_key", "signature", "bls_key", "bls_pop",
                 "bls_binding", "aggregate", "proof", "proof_signature")
_PAIR_FIELDS = ("ciphertexts", "self_mask_shares", "key_shares", "identities", "signatures", "bls_keys", "digests",
                "evidence")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise MalformedMessageError(f"{what} must be base64 text")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedMessageError(f"{what} is not valid base64") from exc


def _word_dtype(field_bits: int) -> np.dtype:
    """The little-endian word of a field (as :func:`sgs_flower.secagg.prg.dtype_for_bits`)."""
    if not 1 <= field_bits <= 64:
        raise MalformedMessageError(f"field_bits must be in 1..64, got {field_bits}")
    return np.dtype("<u2" if field_bits <= 16 else "<u4" if field_bits <= 32 else "<u8")


def packed_size(count: int, field_bits: int) -> int:
    """Bytes of :func:`pack_words` for ``count`` words of ``field_bits`` bits."""
    q, r = divmod(field_bits, 8)
    return count * q + -(-count // 8) * r


def pack_words(words: np.ndarray, field_bits: int) -> bytes:
    """The words (each < 2^b) as a dense byte string of about b / 8 bytes per word.

    Layout (little-endian throughout): first the low ``q = b // 8`` bytes of every word,
    word after word; then, when ``r = b % 8`` is not 0, the remaining r bits of the words
    in groups of 8 words, each group packed into r bytes (word i of a group at bits
    r*i .. r*i + r - 1; the last group padded with zero words). Byte-aligned parts are
    plain copies and the r-bit part one pass of shifts over 8-word groups, so packing
    costs a copy of the vector instead of a per-bit loop. A word at or above 2^b is
    refused (it would be truncated)."""
    dtype = _word_dtype(field_bits)
    w = np.ascontiguousarray(words).astype(dtype, copy=False)
    if w.ndim != 1:
        raise MalformedMessageError("a packed vector must be 1-D")
    width = dtype.itemsize * 8
    if field_bits < width and w.size and int(w.max()) >> field_bits:
        raise MalformedMessageError(f"a word of the vector is not below 2^{field_bits}: it cannot be packed")
    q, r = divmod(field_bits, 8)
    if q == dtype.itemsize:
        return w.tobytes()
    u8 = w.view(np.uint8).reshape(w.size, dtype.itemsize)
    out = [u8[:, :q].tobytes()] if q else []
    if r:
        groups = -(-w.size // 8)
        flat = np.zeros(groups * 8, dtype=np.uint64)
        flat[: w.size] = u8[:, q]
        top = flat.reshape(groups, 8)
        acc = top[:, 0].copy()
        for i in range(1, 8):
            acc |= top[:, i] << np.uint64(r * i)
        out.append(acc.astype("<u8", copy=False).view(np.uint8).reshape(groups, 8)[:, :r].tobytes())
    return b"".join(out)


def unpack_words(data: bytes | bytearray | memoryview, count: int, field_bits: int) -> np.ndarray:
    """Inverse of :func:`pack_words`: ``count`` words in the field's native dtype.
    Wrong lengths and non-zero padding raise :class:`MalformedMessageError`."""
    dtype = _word_dtype(field_bits)
    if len(data) != packed_size(count, field_bits):
        raise MalformedMessageError(
            f"a packed vector of {count} {field_bits}-bit words is {packed_size(count, field_bits)} bytes, "
            f"got {len(data)}"
        )
    q, r = divmod(field_bits, 8)
    if q == dtype.itemsize:
        return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
    out = np.zeros(count, dtype=dtype.newbyteorder("="))
    u8 = out.view(np.uint8).reshape(count, dtype.itemsize)
    if q:
        u8[:, :q] = np.frombuffer(data, dtype=np.uint8, count=count * q).reshape(count, q)
    if r:
        groups = -(-count // 8)
        raw = np.zeros((groups, 8), dtype=np.uint8)
        raw[:, :r] = np.frombuffer(data, dtype=np.uint8, offset=count * q).reshape(groups, r)
        acc = raw.view("<u8").reshape(groups)
        top = np.empty((groups, 8), dtype=np.uint8)
        mask = np.uint64((1 << r) - 1)
        for i in range(8):
            top[:, i] = (acc >> np.uint64(r * i)) & mask
        flat = top.reshape(-1)
        if flat[count:].any():
            raise MalformedMessageError("a packed vector's padding bits are not zero")
        u8[:, q] = flat[:count]
    return out


#: The byte lengths of an honest advertisement's fields (X25519 keys, Ed25519 identity
#: key, SHA-256 commitment, Ed25519 signature): a list of such NeighbourKeys is packed.
_NK_WIDTHS = (32, 32, 32, 32, 64)
_NK_ENTRY = 8 + sum(_NK_WIDTHS)


def _packed_keys(value: tuple[NeighbourKeys, ...]) -> dict[str, str] | None:
    """A list of advertisements as one base64 string of fixed-width entries (node id,
    then each field), or None when a field has another length (sent as a list, and
    refused where it is checked). Why: a site parses its neighbours' keys at every
    message (they are in its saved state), and 5k base64 fields cost more than the
    checks on them; one string is one C call."""
    out = bytearray()
    for nk in value:
        fields_ = (nk.c_pk, nk.s_pk, nk.identity_key, nk.self_mask_commitment, nk.signature)
        if not 0 <= nk.node < 1 << 64 or any(len(f) != w for f, w in zip(fields_, _NK_WIDTHS, strict=True)):
            return None
        out += nk.node.to_bytes(8, "big")
        for f in fields_:
            out += f
    return {"nk": _b64(bytes(out))}


def _packed_pairs(value: tuple[tuple[int, bytes], ...]) -> dict[str, Any] | None:
    """(node, bytes) pairs of one byte length as the node ids and one base64 string of
    the concatenated bytes (None when the lengths differ: sent as a list)."""
    width = len(value[0][1])
    if any(len(b) != width for _, b in value):
        return None
    return {"w": width, "n": [v for v, _ in value], "b": _b64(b"".join(b for _, b in value))}


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": _b64(value)}
    if isinstance(value, NeighbourKeys):
        return {
            name: (getattr(value, name) if name == "node" else _b64(getattr(value, name))) for name in _NK_FIELDS
        }
    if isinstance(value, tuple):
        if len(value) > 1 and all(isinstance(v, NeighbourKeys) for v in value):
            packed = _packed_keys(value)
            if packed is not None:
                return packed
        elif len(value) > 1 and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int)
                                    and isinstance(v[1], bytes) for v in value):
            packed = _packed_pairs(value)
            if packed is not None:
                return packed
        return [_to_json(v) for v in value]
    return value


def encode(msg: Message, detach_vector: bool = False) -> bytes:
    """Serialise a message to bytes, whole (see the module docstring for the format).

    With ``detach_vector`` a masked input's words are left out (its header still
    declares their dtype and count): the Flower glue ships them as an ``ArrayRecord``,
    which Flower chunks for transport, and passes them back to :func:`decode`.
    """
    return _encode(msg, detach_vector, ())


def encode_parts(msg: Message) -> tuple[bytes, bytes | None]:
    """A server message as its recipient's own part and the stage's shared part (None for
    a message type without :data:`SHARED_FIELDS`). The shared part is one bytes object
    for every message whose shared fields are the same objects (the server builds them
    once per stage), encoded once: a memo by identity (:mod:`sgs_flower.secagg.memo`).
    ``decode(own, shared=shared)`` gives back the message."""
    names = SHARED_FIELDS.get(type(msg))
    if names is None:
        return encode(msg), None
    return _encode(msg, False, names), _encode_shared(type(msg).__name__, names, *(getattr(msg, n) for n in names))


@memo_by_identity(8)
def _encode_shared(kind: str, names: tuple[str, ...], *values: Any) -> bytes:
    header = {"type": kind, **{n: _to_json(v) for n, v in zip(names, values, strict=True)}}
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return SHARED_MAGIC + struct.pack(">I", len(head)) + head


def _encode(msg: Message, detach_vector: bool, omit: tuple[str, ...]) -> bytes:
    header: dict[str, Any] = {"type": type(msg).__name__}
    tail = b""
    for f in fields(msg):
        if f.name in omit:
            continue
        value = getattr(msg, f.name)
        if isinstance(value, np.ndarray):
            vec = np.ascontiguousarray(value)
            header[f.name] = {"dtype": vec.dtype.newbyteorder("<").str, "len": int(vec.size)}
            if not detach_vector:
                tail = pack_words(vec, int(getattr(msg, "field_bits", 8 * vec.dtype.itemsize)))
        else:
            header[f.name] = _to_json(value)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + tail


def _int(v: Any, what: str, largest: int = (1 << 64) - 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v > largest:
        raise MalformedMessageError(f"{what} must be an integer in 0..{largest}")
    return v


def _bytes_field(v: Any, what: str) -> bytes:
    if not isinstance(v, dict) or set(v) != {"b"}:
        raise MalformedMessageError(f"{what} must be bytes")
    return _unb64(v["b"], what)


def _list(v: Any, what: str) -> list[Any]:
    if not isinstance(v, list):
        raise MalformedMessageError(f"{what} must be a list")
    if len(v) > MAX_LIST_ITEMS:
        raise MalformedMessageError(f"{what} has more than {MAX_LIST_ITEMS} entries")
    return v


def _pairs(v: Any, what: str) -> tuple[tuple[int, bytes], ...]:
    if isinstance(v, dict):
        return _unpacked_pairs(v, what)
    out = []
    for item in _list(v, what):
        if not isinstance(item, list) or len(item) != 2:
            raise MalformedMessageError(f"{what} must be a list of [node, bytes] pairs")
        out.append((_int(item[0], f"{what} node"), _bytes_field(item[1], what)))
    return tuple(out)


def _ints(v: Any, what: str) -> tuple[int, ...]:
    return tuple(_int(x, what) for x in _list(v, what))


def _unpacked_pairs(v: dict[str, Any], what: str) -> tuple[tuple[int, bytes], ...]:
    """The packed form of :func:`_packed_pairs`: checked before anything is built."""
    if set(v) != {"w", "n", "b"}:
        raise MalformedMessageError(f"{what} must be a list of [node, bytes] pairs or their packed form")
    width = _int(v["w"], f"{what} width", MAX_HEADER_BYTES)
    nodes = _ints(v["n"], f"{what} node")
    blob = _unb64(v["b"], what)
    if len(blob) != width * len(nodes):
        raise MalformedMessageError(f"{what} holds {len(blob)} bytes, not {len(nodes)} entries of {width}")
    return tuple(zip(nodes, (blob[i : i + width] for i in range(0, len(blob), width)), strict=True))


def _unpacked_keys(v: dict[str, Any], what: str) -> tuple[NeighbourKeys, ...]:
    if set(v) != {"nk"}:
        raise MalformedMessageError(f"{what} entries need exactly {', '.join(_NK_FIELDS)} (or their packed form)")
    blob = _unb64(v["nk"], what)
    if len(blob) % _NK_ENTRY or len(blob) // _NK_ENTRY > MAX_LIST_ITEMS:
        raise MalformedMessageError(f"{what} must be whole {_NK_ENTRY}-byte entries")
    keys = []
    for at in range(0, len(blob), _NK_ENTRY):
        parts, pos = [], at + 8
        for w in _NK_WIDTHS:
            parts.append(blob[pos : pos + w])
            pos += w
        keys.append(NeighbourKeys(int.from_bytes(blob[at : at + 8], "big"), *parts))
    return tuple(keys)


def _neighbour_keys(v: Any, what: str) -> tuple[NeighbourKeys, ...]:
    if isinstance(v, dict):
        return _unpacked_keys(v, what)
    keys = []
    for item in _list(v, what):
        if not isinstance(item, dict) or set(item) != set(_NK_FIELDS):
            raise MalformedMessageError(f"{what} entries need exactly {', '.join(_NK_FIELDS)}")
        keys.append(
            NeighbourKeys(
                _int(item["node"], what), *(_unb64(item[name], f"{what}.{name}") for name in _NK_FIELDS[1:])
            )
        )
    return tuple(keys)


def _vector(v: Any, name: str, tail: bytes, vector: Any, field_bits: int) -> np.ndarray:
    """The vector of a masked input: packed at ``field_bits`` (inline ``tail``, or
    ``vector`` as packed bytes when it travelled detached), or an array of words."""
    if not isinstance(v, dict) or set(v) != {"dtype", "len"} or v["dtype"] not in ("<u2", "<u4", "<u8"):
        raise MalformedMessageError(f"{name} must be little-endian uint16, uint32 or uint64 words")
    count = _int(v["len"], f"{name} length", MAX_VECTOR_WORDS)
    dtype = np.dtype(v["dtype"])
    if dtype != _word_dtype(field_bits):
        raise MalformedMessageError(f"{name} declares {dtype} words for a {field_bits}-bit field")
    if vector is not None:
        if tail:
            raise MalformedMessageError(f"{name} arrived both inline and detached")
        if isinstance(vector, bytes | bytearray | memoryview):
            return unpack_words(vector, count, field_bits)
        if not isinstance(vector, np.ndarray) or vector.ndim != 1:
            raise MalformedMessageError(f"{name} must be a 1-D array")
        if vector.dtype.newbyteorder("<") != dtype or vector.size != count:
            raise MalformedMessageError(f"{name} does not carry the words its header declares")
        return vector
    return unpack_words(tail, count, field_bits)


def _header(data: Any, magic: bytes) -> tuple[dict[str, Any], bytes]:
    """A part's JSON header (size-checked before it is parsed) and the bytes after it."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessageError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8 or data[:4] != magic:
        what = "message" if magic == MAGIC else "shared part"
        raise MalformedMessageError(f"not an sgs-flower secagg {what} (bad magic or protocol version)")
    (hlen,) = struct.unpack(">I", data[4:8])
    if hlen > MAX_HEADER_BYTES:
        raise MalformedMessageError(f"header of {hlen} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + hlen > len(data):
        raise MalformedMessageError("header length exceeds the message")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers bad JSON and integers too long to parse; RecursionError deep nesting
        raise MalformedMessageError(f"header is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise MalformedMessageError("unknown message type")
    return header, data[8 + hlen :]


def _field(f_name: str, v: Any, name: str) -> Any:
    """One header field's value, checked (every field but a masked input's vector)."""
    if f_name in ("version", "consistency"):
        if not isinstance(v, str) or len(v) > 64:
            raise MalformedMessageError(f"{name} must be short text")
        return v
    if f_name in _INT_FIELDS:
        return _int(v, name, _INT_FIELDS[f_name])
    if f_name in _NODE_LIST_FIELDS:
        return _ints(v, name)
    if f_name in _BYTES_FIELDS:
        return _bytes_field(v, name)
    if f_name in _PAIR_FIELDS:
        return _pairs(v, name)
    if f_name == "keys":
        return _neighbour_keys(v, name)
    raise MalformedMessageError(f"unexpected field {name}")  # pragma: no cover - every field is handled above


def decode(data: bytes, vector: np.ndarray | bytes | None = None, shared: bytes | None = None) -> Message:
    """Parse bytes from :func:`encode` (or a recipient's own part from :func:`encode_parts`,
    with the stage's ``shared`` part); anything malformed raises
    :class:`MalformedMessageError` saying which check failed (never another exception).

    Sizes are checked before they are used: the header length before parsing, list
    lengths and integer ranges before anything is built from them.
    ``vector`` supplies a masked input's words when they travelled detached: the packed
    bytes (:func:`pack_words`), or an array of words. With ``shared``, the message's
    :data:`SHARED_FIELDS` must be in the shared part and nowhere else.
    """
    header, tail = _header(data, MAGIC)
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in MESSAGE_TYPES:
        raise MalformedMessageError("unknown message type")
    cls = MESSAGE_TYPES[kind]
    names = {f.name for f in fields(cls)}
    own = names
    if shared is not None:
        if cls not in SHARED_FIELDS:
            raise MalformedMessageError(f"{cls.__name__} has no shared part, but one came with it")
        own = names - set(SHARED_FIELDS[cls])
    if set(header) != own | {"type"}:
        missing, extra = sorted(own - set(header)), sorted(set(header) - own - {"type"})
        raise MalformedMessageError(f"{cls.__name__} fields differ (missing {missing}, unexpected {extra})")
    kw: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in own and f.name != "vector":  # the vector after its field_bits (below)
            kw[f.name] = _field(f.name, header[f.name], f"{cls.__name__}.{f.name}")
    if shared is not None:
        kw.update(_decode_shared(kind, shared))
    if cls not in (MaskedInput, RetryInput) and tail:
        raise MalformedMessageError(f"{cls.__name__} carries {len(tail)} unexpected trailing bytes")
    if "vector" in names:
        kw["vector"] = _vector(header["vector"], f"{cls.__name__}.vector", tail, vector, kw["field_bits"])
    return cls(**kw)


@memo_by_identity(8)
def _decode_shared(kind: str, data: bytes) -> dict[str, Any]:
    """The shared fields of a ``kind`` message from its shared part. Memoised (equal bytes
    match): the recipients of a stage that one process serves (a simulation's sites)
    get the same tuples, so what is derived from them is derived once
    (:mod:`sgs_flower.secagg.memo`); the values are immutable. Callers copy the dict."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessageError(f"a shared part must be bytes, got {type(data).__name__}")
    header, tail = _header(bytes(data), SHARED_MAGIC)
    cls = MESSAGE_TYPES[kind]
    expected = set(SHARED_FIELDS[cls])
    if header.get("type") != kind or set(header) != expected | {"type"}:
        raise MalformedMessageError(
            f"the shared part is not {kind}'s (it must hold exactly {', '.join(sorted(expected))})")
    if tail:
        raise MalformedMessageError(f"the shared part carries {len(tail)} unexpected trailing bytes")
    return {n: _field(n, header[n], f"{kind}.{n}") for n in SHARED_FIELDS[cls]}
