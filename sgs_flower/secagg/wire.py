"""The protocol's messages, defined once for both sides, and their byte encoding.

Every message carries the protocol version, run id, round id and stage, and the sender
(client to server) or recipient (server to client), so a receiver can reject anything
stale, replayed or mis-addressed before looking at its payload. The Flower glue moves
these messages as bytes (:func:`encode` / :func:`decode`); the in-process driver moves
the objects themselves.

Byte format: 4-byte magic, 4-byte big-endian header length, a canonical JSON header
(bytes fields as base64), then for a masked input the raw little-endian words of the
vector. Uploading the vector as raw words of the field's width is what keeps the upload
at 1.0x the float32 update for a 32-bit field.
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

PROTOCOL_VERSION = "sgs-secagg+/1"
CRYPTO_SUITE = "X25519+HKDF-SHA256+AES-256-GCM(shares)+AES-256-CTR(masks)+Shamir-GF(2^31-1)"
MAGIC = b"SGS1"

# Keys of the Flower messages that carry the protocol, shared by strategies/ and clients/.
RECORD_KEY = "sgs.secagg"  # ConfigRecord: stage number and encoded protocol message
SPEC_KEY = "sgs.spec"  # ConfigRecord: the round's UpdateSpec (setup only)
VECTOR_KEY = "sgs.vector"  # ArrayRecord: the masked vector (masked-input replies only)
RAW_STYPE = "sgs.raw-le"  # Flower Array serialisation of the vector: raw little-endian words
FIELD_STAGE = "stage"
FIELD_PAYLOAD = "payload"
FIELD_VECTOR = "vector"


class Stage(IntEnum):
    """The stage a message belongs to (numbering of DESIGN.md section 3)."""

    ADVERTISE_KEYS = 1
    SHARE_KEYS = 2
    MASKED_INPUT = 3
    UNMASK = 4


@dataclass(frozen=True)
class NeighbourKeys:
    """A neighbour's advertised public keys, forwarded by the server."""

    node: int
    c_pk: bytes
    s_pk: bytes


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
    """Stage 0 -> 1: the round's public parameters; the client answers with its keys."""

    recipient: int
    cohort: tuple[int, ...]
    degree: int
    threshold: int
    field_bits: int
    vector_length: int
    graph_seed: bytes
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.ADVERTISE_KEYS
    to_server: ClassVar[bool] = False


@dataclass(frozen=True)
class KeyRoster(Message):
    """Stage 1 -> 2: the public keys of the recipient's neighbours that advertised."""

    recipient: int
    keys: tuple[NeighbourKeys, ...]
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
class UnmaskRequest(Message):
    """Stage 3 -> 4: which of the recipient's neighbours survived and which dropped."""

    recipient: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.UNMASK
    to_server: ClassVar[bool] = False


# ---------------------------------------------------------------- client -> server
@dataclass(frozen=True)
class AdvertiseKeys(Message):
    sender: int
    c_pk: bytes
    s_pk: bytes
    self_mask_commitment: bytes
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
    version: str = PROTOCOL_VERSION
    stage: ClassVar[Stage] = Stage.MASKED_INPUT
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


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.__name__: cls
    for cls in (Setup, KeyRoster, ShareBundle, UnmaskRequest, AdvertiseKeys, ShareKeys, MaskedInput, UnmaskResponse)
}


# ---------------------------------------------------------------- encoding
def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _unb64(s: Any, what: str) -> bytes:
    if not isinstance(s, str):
        raise MalformedMessageError(f"{what} must be base64 text")
    try:
        return base64.b64decode(s.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise MalformedMessageError(f"{what} is not valid base64") from exc


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b": _b64(value)}
    if isinstance(value, NeighbourKeys):
        return {"node": value.node, "c_pk": _b64(value.c_pk), "s_pk": _b64(value.s_pk)}
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def encode(msg: Message, detach_vector: bool = False) -> bytes:
    """Serialise a message to bytes (see the module docstring for the format).

    With ``detach_vector`` a masked input's words are left out (its header still
    declares their dtype and count): the Flower glue ships them as an ``ArrayRecord``,
    which Flower chunks for transport, and passes them back to :func:`decode`.
    """
    header: dict[str, Any] = {"type": type(msg).__name__}
    tail = b""
    for f in fields(msg):
        value = getattr(msg, f.name)
        if isinstance(value, np.ndarray):
            vec = np.ascontiguousarray(value)
            header[f.name] = {"dtype": vec.dtype.str, "len": int(vec.size)}
            if not detach_vector:
                tail = vec.astype(vec.dtype.newbyteorder("<"), copy=False).tobytes()
        else:
            header[f.name] = _to_json(value)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + tail


def _int(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0 or v >= 1 << 64:
        raise MalformedMessageError(f"{what} must be an unsigned 64-bit integer, got {v!r}")
    return v


def _bytes_field(v: Any, what: str) -> bytes:
    if not isinstance(v, dict) or set(v) != {"b"}:
        raise MalformedMessageError(f"{what} must be bytes")
    return _unb64(v["b"], what)


def _pairs(v: Any, what: str) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(v, list):
        raise MalformedMessageError(f"{what} must be a list of [node, bytes] pairs")
    out = []
    for item in v:
        if not isinstance(item, list) or len(item) != 2:
            raise MalformedMessageError(f"{what} must be a list of [node, bytes] pairs")
        out.append((_int(item[0], f"{what} node"), _bytes_field(item[1], what)))
    return tuple(out)


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, list):
        raise MalformedMessageError(f"{what} must be a list of node ids")
    return tuple(_int(x, what) for x in v)


def decode(data: bytes, vector: np.ndarray | None = None) -> Message:
    """Parse bytes from :func:`encode`; anything malformed raises
    :class:`MalformedMessageError` saying what was wrong (never another exception).

    ``vector`` supplies a masked input's words when they travelled detached.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise MalformedMessageError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8 or data[:4] != MAGIC:
        raise MalformedMessageError("not an sgs-flower secagg message (bad magic)")
    (hlen,) = struct.unpack(">I", data[4:8])
    if 8 + hlen > len(data):
        raise MalformedMessageError("header length exceeds the message")
    try:
        header = json.loads(data[8 : 8 + hlen])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessageError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict) or header.get("type") not in MESSAGE_TYPES:
        raise MalformedMessageError(f"unknown message type {header.get('type') if isinstance(header, dict) else header!r}")
    cls = MESSAGE_TYPES[header["type"]]
    names = {f.name for f in fields(cls)}
    missing = names - set(header)
    if missing:
        raise MalformedMessageError(f"{cls.__name__} lacks fields {sorted(missing)}")
    tail = data[8 + hlen :]
    kw: dict[str, Any] = {}
    for f in fields(cls):
        v = header[f.name]
        name = f"{cls.__name__}.{f.name}"
        if f.name == "version":
            if not isinstance(v, str):
                raise MalformedMessageError(f"{name} must be text")
            kw[f.name] = v
        elif f.name in ("run_id", "round_id", "sender", "recipient", "degree", "threshold", "field_bits", "vector_length"):
            kw[f.name] = _int(v, name)
        elif f.name in ("cohort", "survivors", "dropped"):
            kw[f.name] = _ints(v, name)
        elif f.name in ("graph_seed", "c_pk", "s_pk", "self_mask_commitment"):
            kw[f.name] = _bytes_field(v, name)
        elif f.name in ("ciphertexts", "self_mask_shares", "key_shares"):
            kw[f.name] = _pairs(v, name)
        elif f.name == "keys":
            if not isinstance(v, list):
                raise MalformedMessageError(f"{name} must be a list")
            keys = []
            for item in v:
                if not isinstance(item, dict) or set(item) != {"node", "c_pk", "s_pk"}:
                    raise MalformedMessageError(f"{name} entries need node, c_pk, s_pk")
                keys.append(
                    NeighbourKeys(_int(item["node"], name), _unb64(item["c_pk"], name), _unb64(item["s_pk"], name))
                )
            kw[f.name] = tuple(keys)
        elif f.name == "vector":
            if not isinstance(v, dict) or v.get("dtype") not in ("<u4", "<u8") or not isinstance(v.get("len"), int):
                raise MalformedMessageError(f"{name} must be little-endian uint32 or uint64 words")
            dtype = np.dtype(v["dtype"])
            if vector is not None:
                if tail:
                    raise MalformedMessageError(f"{name} arrived both inline and detached")
                if not isinstance(vector, np.ndarray) or vector.ndim != 1:
                    raise MalformedMessageError(f"{name} must be a 1-D array")
                if vector.dtype.newbyteorder("<") != dtype or vector.size != v["len"]:
                    raise MalformedMessageError(
                        f"{name} declares {v['len']} words of {dtype} but carries {vector.size} of {vector.dtype}"
                    )
                kw[f.name] = vector
                continue
            if len(tail) != v["len"] * dtype.itemsize:
                raise MalformedMessageError(
                    f"{name} declares {v['len']} words but carries {len(tail)} bytes"
                )
            kw[f.name] = np.frombuffer(tail, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
        else:  # pragma: no cover - every field is handled above
            raise MalformedMessageError(f"unexpected field {name}")
    if cls is not MaskedInput and tail:
        raise MalformedMessageError(f"{cls.__name__} carries {len(tail)} unexpected trailing bytes")
    return cls(**kw)
