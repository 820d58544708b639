"""The model key: one 256-bit secret shared by the sites of a roster, never by the server.

How the sites agree on it (composed from standard parts, nothing new):

1. **Status.** Each site holds a static X25519 key-exchange key of its own (``kx``) and
   announces its public half signed with its Ed25519 identity (the identity a roster
   pins), with the id of the model key it holds for its roster (if any).
2. **Wrap.** One site (the *leader*; any site that already holds the key, else any site)
   receives the signed announcements of the sites that lack the key, checks every
   signature and that every identity is on its roster, generates the key if it holds
   none (``os.urandom``), and wraps it for each: ECIES from X25519 (an ephemeral key
   against the recipient's ``kx``), HKDF-SHA256 and AES-256-GCM, the wrap bound to the
   key id, the recipient's identity and the roster; it signs every envelope.
3. **Install.** Each recipient checks the leader's signature and roster membership,
   unwraps, checks the key id, and keeps the key; a site that already holds a key for
   the same roster refuses a different one.

The server relays the messages and learns the key id (a hash) only. It cannot make a
site accept a key it knows: envelopes are signed by a roster identity, and a site never
replaces its key for the same roster (so dropping a site from the cohort changes
nothing either). A new roster (a site's ``sgs-roster`` file changes) means a new key:
the key is stored with the roster's digest and discarded when it no longer matches.
Without a roster, a site accepts any identity: the server could then enrol a site of
its own and receive the key, so confidentiality holds against an honest server only
(docs/threat_model.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from sgs_flower.secagg import identity
from sgs_flower.secagg.errors import MalformedMessageError, ModelKeyError
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.keys import load_private_key, private_bytes, public_bytes

FORMAT = "sgs-model-key/1"
KEY_BYTES = 32
LABEL_ID = b"sgs-model-key-id/1"
LABEL_KX = b"sgs-model-key-kx/1"
LABEL_WRAP = b"sgs-model-key-wrap/1"
LABEL_ENVELOPE = b"sgs-model-key-envelope/1"


def roster_digest(roster: Roster | None) -> str:
    """The roster's fingerprint (hex; "" without a roster): the key is bound to it."""
    if roster is None:
        return ""
    return hashlib.sha256(b"".join(sorted(roster.keys))).hexdigest()


def key_id(key: bytes, roster: str) -> str:
    """A public name of the key (32 hex digits), bound to the roster."""
    return hashlib.sha256(LABEL_ID + roster.encode() + key).hexdigest()[:32]


@dataclass
class KeyState:
    """What a site keeps: its kx key, the model key for its roster, and, per run, the
    newest masked model it unmasked (older ones are refused: a replay)."""

    kx_private: bytes
    roster: str = ""
    key: bytes = b""
    newest: dict[str, int] = field(default_factory=dict)

    @property
    def key_id(self) -> str:
        return key_id(self.key, self.roster) if self.key else ""

    @classmethod
    def fresh(cls, roster: str) -> KeyState:
        return cls(kx_private=private_bytes(X25519PrivateKey.generate()), roster=roster)

    def for_roster(self, roster: str) -> KeyState:
        """This state under the site's current roster: a changed roster drops the key."""
        if roster != self.roster:
            return KeyState(kx_private=self.kx_private, roster=roster)
        return self

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "kx": self.kx_private.hex(), "roster": self.roster,
                           "key": self.key.hex(), "newest": self.newest})

    @classmethod
    def from_json(cls, text: str) -> KeyState:
        d = json.loads(text)
        if d.get("format") != FORMAT:
            raise ValueError(f"model key file format {d.get('format')!r}, expected {FORMAT!r}")
        return cls(kx_private=bytes.fromhex(d["kx"]), roster=str(d["roster"]), key=bytes.fromhex(d["key"]),
                   newest={str(k): int(v) for k, v in d["newest"].items()})


def load_key_file(path: Path) -> KeyState:
    return KeyState.from_json(path.read_text())


def save_key_file(path: Path, state: KeyState) -> None:
    """Written atomically, readable by the site's user only (it holds the model key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
    tmp.replace(path)


def _kx_statement(run_id: int, kx_pk: bytes, roster: str, held: str) -> bytes:
    return LABEL_KX + struct.pack(">Q", run_id) + kx_pk + roster.encode() + b"|" + held.encode()


@dataclass(frozen=True)
class Announcement:
    """A site's signed kx public key (the status reply)."""

    node: int
    identity: bytes
    kx_pk: bytes
    roster: str
    key_id: str
    signature: bytes

    def to_record(self) -> dict[str, Any]:
        return {"node": self.node, "identity": self.identity, "kx-pk": self.kx_pk, "roster": self.roster,
                "key-id": self.key_id, "sig": self.signature}

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> Announcement:
        try:
            out = cls(node=int(d["node"]), identity=bytes(d["identity"]), kx_pk=bytes(d["kx-pk"]),
                      roster=str(d["roster"]), key_id=str(d["key-id"]), signature=bytes(d["sig"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"malformed model-key announcement: {exc!r}") from exc
        if len(out.kx_pk) != 32:
            raise MalformedMessageError("a kx public key is 32 bytes")
        return out

    def verify(self, run_id: int) -> bool:
        return identity.verify(self.identity, self.signature,
                               _kx_statement(run_id, self.kx_pk, self.roster, self.key_id))


def announce(state: KeyState, ident: bytes, node: int, run_id: int) -> Announcement:
    kx_pk = public_bytes(load_private_key(state.kx_private))
    sig = identity.sign(ident, _kx_statement(run_id, kx_pk, state.roster, state.key_id))
    return Announcement(node, identity.identity_public(ident), kx_pk, state.roster, state.key_id, sig)


def _wrap_key(shared: bytes, kid: str, recipient: bytes, roster: str) -> bytes:
    info = LABEL_WRAP + kid.encode() + recipient + roster.encode()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def _envelope_statement(run_id: int, kid: str, recipient: bytes, envelope: bytes) -> bytes:
    return LABEL_ENVELOPE + struct.pack(">Q", run_id) + kid.encode() + recipient + envelope


def _refusal(a: Announcement, run_id: int, roster: Roster | None, own_roster: str) -> str:
    if not a.verify(run_id):
        return f"node {a.node}'s model-key announcement is not signed by its identity"
    if roster is not None and a.identity not in roster:
        return f"node {a.node}'s identity is not on this site's roster: no model key for it"
    if a.roster != own_roster:
        return f"node {a.node} pins another roster than this site: no model key for it"
    return ""


def wrap_for(state: KeyState, ident: bytes, run_id: int, recipients: list[Announcement],
             roster: Roster | None) -> tuple[KeyState, list[tuple[bytes, bytes, str]]]:
    """Leader side: check every recipient's announcement, make the key if none is held,
    and return (new state, [(envelope, signature, refusal)] in the recipients' order): a
    recipient the leader refuses gets empty bytes and the reason, the others their
    envelope (one bad announcement does not stop the rest)."""
    if not state.key:
        state = KeyState(kx_private=state.kx_private, roster=state.roster, key=os.urandom(KEY_BYTES),
                         newest=dict(state.newest))
    kid = state.key_id
    out: list[tuple[bytes, bytes, str]] = []
    for a in recipients:
        why = _refusal(a, run_id, roster, state.roster)
        if why:
            out.append((b"", b"", why))
            continue
        eph = X25519PrivateKey.generate()
        shared = eph.exchange(X25519PublicKey.from_public_bytes(a.kx_pk))
        nonce = os.urandom(12)
        aad = kid.encode() + a.identity + state.roster.encode()
        ct = AESGCM(_wrap_key(shared, kid, a.identity, state.roster)).encrypt(nonce, state.key, aad)
        envelope = public_bytes(eph) + nonce + ct
        out.append((envelope, identity.sign(ident, _envelope_statement(run_id, kid, a.identity, envelope)), ""))
    return state, out


def install(state: KeyState, ident: bytes, run_id: int, kid: str, leader: bytes, envelope: bytes,
            signature: bytes, roster: Roster | None) -> KeyState:
    """Recipient side: check and unwrap an envelope; refuse what a lying server could forge."""
    me = identity.identity_public(ident)
    if roster is not None and leader not in roster:
        raise ModelKeyError("the model key comes from an identity that is not on this site's roster; refused")
    if not identity.verify(leader, signature, _envelope_statement(run_id, kid, me, envelope)):
        raise ModelKeyError("the model-key envelope is not signed by the leader it names (or is not for this site)")
    if len(envelope) < 32 + 12 + KEY_BYTES + 16:
        raise MalformedMessageError("model-key envelope too short")
    eph_pk, nonce, ct = envelope[:32], envelope[32:44], envelope[44:]
    try:
        shared = load_private_key(state.kx_private).exchange(X25519PublicKey.from_public_bytes(eph_pk))
        key = AESGCM(_wrap_key(shared, kid, me, state.roster)).decrypt(nonce, ct, kid.encode() + me + state.roster.encode())
    except (InvalidTag, ValueError) as exc:
        raise ModelKeyError("the model-key envelope does not decrypt for this site") from exc
    if key_id(key, state.roster) != kid:
        raise ModelKeyError("the model key does not match the key id it came with")
    if state.key and state.key != key:
        raise ModelKeyError(
            "this site already holds a different model key for its roster and never replaces it (a server that "
            "drops sites to force a new key gets none); a new key needs a new roster")
    return KeyState(kx_private=state.kx_private, roster=state.roster, key=key, newest=dict(state.newest))
