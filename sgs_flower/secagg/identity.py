"""Long-term node identities (Ed25519) and the federation roster a site may pin.

Why: against an *active* server, the keys a client receives for its neighbours and the
consistency signatures it checks before unmasking are worthless unless the client can
tell a real site's signature from one the server made up. Each site therefore holds an
Ed25519 identity key it generates and keeps (never the server's), signs its advertised
round keys with it, and signs the survivor set at the consistency check.

What a signature alone does not stop: a server that invents whole nodes (sybils) with
identity keys of its own. Only a **roster**, the federation's list of identity public
keys that each site pins locally, stops that: a client refuses a cohort naming an
identity key that is not on its roster, or one key under two node ids. Without a roster
the protection against an active server is limited to servers that forward the keys
they received unchanged (documented in README's threat model).

Roster file format (text): one hex-encoded 32-byte Ed25519 public key per line,
optionally followed by whitespace and a site name; ``#`` starts a comment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from sgs_flower.secagg.errors import ConfigurationError, MalformedMessageError, PolicyError

IDENTITY_KEY_BYTES = 32
SIGNATURE_BYTES = 64


def generate_identity() -> bytes:
    """A fresh Ed25519 private key as its 32 raw bytes."""
    return Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def identity_public(private: bytes) -> bytes:
    """The 32-byte public key of a raw Ed25519 private key."""
    return _load_private(private).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _load_private(private: bytes) -> Ed25519PrivateKey:
    if len(private) != IDENTITY_KEY_BYTES:
        raise ConfigurationError(f"an Ed25519 identity key is {IDENTITY_KEY_BYTES} bytes, got {len(private)}")
    return Ed25519PrivateKey.from_private_bytes(private)


def sign(private: bytes, message: bytes) -> bytes:
    return _load_private(private).sign(message)


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True only for a valid signature by ``public``; malformed keys or signatures are False.

    Verified by libsodium (PyNaCl's ``crypto_sign_open``), not OpenSSL: the same RFC 8032
    Ed25519, half the CPU here (54 against 107 us per verification: a site checks its
    k neighbours' advertisements every round, the server every advertisement), and
    stricter (it also refuses small-order public keys and R points, and non-canonical
    encodings, which no honest signer produces). Signing stays with ``cryptography``."""
    if len(public) != IDENTITY_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        crypto_sign_open(bytes(signature) + bytes(message), bytes(public))
    except (BadSignatureError, ValueError, TypeError, RuntimeError):
        return False
    return True


def write_identity(path: str | Path) -> bytes:
    """Create a new identity key file (mode 0600, refusing to overwrite); returns the
    public key. The file holds the private key as hex, one line."""
    p = Path(path)
    if p.exists():
        raise ConfigurationError(f"identity key {p} exists already; refusing to overwrite a site's identity")
    private = generate_identity()
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(private.hex() + "\n")
    return identity_public(private)


def read_identity(path: str | Path) -> bytes:
    """The raw private key from a file written by :func:`write_identity`."""
    p = Path(path)
    try:
        text = p.read_text().strip()
        private = bytes.fromhex(text)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the identity key {p}: {exc}") from exc
    _load_private(private)
    return private


@dataclass(frozen=True)
class Roster:
    """The identity public keys a site accepts in a cohort (pinned locally).

    The file may be cut into **epochs** (a line ``epoch`` starts the next one) and may
    list **revoked** keys (``revoked <hex> [name]``). Why: participation in whole groups
    partitions each epoch on its own (:mod:`sgs_flower.secagg.groups`), so adding sites
    as a new epoch leaves every earlier group as it was, and a revoked key keeps its place
    in its group (which can then never be whole) instead of regrouping the others; either
    way no two sums ever differ by fewer than a group. ``keys`` are the accepted keys
    (revoked ones are not); ``epochs`` every epoch's keys, revoked included."""

    keys: frozenset[bytes]
    names: tuple[tuple[bytes, str], ...] = ()
    epochs: tuple[frozenset[bytes], ...] = ()
    revoked: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        for k in self.keys | self.revoked:
            if len(k) != IDENTITY_KEY_BYTES:
                raise ConfigurationError(f"roster key {k.hex()} is not a 32-byte Ed25519 public key")
        if not self.epochs:  # one epoch: the roster as listed
            object.__setattr__(self, "epochs", (self.keys | self.revoked,))

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    @classmethod
    def parse(cls, text: str, source: str = "roster") -> Roster:
        epochs: list[list[bytes]] = [[]]
        names: list[tuple[bytes, str]] = []
        revoked: set[bytes] = set()
        seen: set[bytes] = set()
        for lineno, line in enumerate(text.splitlines(), 1):
            body = line.split("#", 1)[0].strip()
            if not body:
                continue
            if body == "epoch":
                if not epochs[-1]:
                    raise ConfigurationError(f"{source}:{lineno}: an epoch lists no identity keys")
                epochs.append([])
                continue
            is_revoked = body.startswith("revoked ")
            hexkey, _, name = body.removeprefix("revoked ").strip().partition(" ")
            try:
                key = bytes.fromhex(hexkey)
            except ValueError as exc:
                raise ConfigurationError(f"{source}:{lineno}: not a hex public key") from exc
            if len(key) != IDENTITY_KEY_BYTES:
                raise ConfigurationError(f"{source}:{lineno}: a public key is {IDENTITY_KEY_BYTES} bytes (64 hex digits)")
            if key in seen:
                raise ConfigurationError(f"{source}:{lineno}: key listed twice (revoke a key where it is listed)")
            seen.add(key)
            epochs[-1].append(key)
            (revoked.add(key) if is_revoked else names.append((key, name.strip())))
        keys = frozenset(seen - revoked)
        if not keys:
            raise ConfigurationError(f"{source} lists no identity keys")
        if not epochs[-1]:
            raise ConfigurationError(f"{source}: its last epoch lists no identity keys")
        return cls(keys, tuple(names), tuple(frozenset(e) for e in epochs), frozenset(revoked))

    @classmethod
    def load(cls, path: str | Path) -> Roster:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the roster {p}: {exc}") from exc
        return cls.parse(text, str(p))


def check_identity_table(table: dict[int, bytes], roster: Roster | None) -> None:
    """Refuse an identity table the site cannot accept: one key under two node ids (a
    site counted twice), or, with a roster, a key that is not on it (a server-made node)."""
    seen: dict[bytes, int] = {}
    for node, key in table.items():
        if len(key) != IDENTITY_KEY_BYTES:
            raise MalformedMessageError(f"identity key of node {node} is not {IDENTITY_KEY_BYTES} bytes")
        if key in seen:
            raise MalformedMessageError(f"nodes {seen[key]} and {node} present the same identity key")
        seen[key] = node
        if roster is not None and key not in roster:
            raise PolicyError(f"node {node}'s identity key is not on this site's roster (a node the server made?)")
