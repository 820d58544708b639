"""Fiat–Shamir transcript: the verifier's random challenges, derived from everything sent so far.

Why a transcript object and not ad-hoc hashing: every challenge must depend on *all*
prior messages (commitments, context, earlier challenges) or a prover could pick a
message after seeing the challenge it influences. The construction follows Merlin's
model with SHA-512 as the hash:

* one running SHA-512 state, started with a protocol tag and the caller's label
  (domain separation: a transcript of another protocol or purpose never collides);
* :meth:`Transcript.append` absorbs ``("A", label, data)`` with length prefixes, so
  no two different sequences of appends give the same byte stream;
* :meth:`Transcript.challenge` hashes a copy of the state with ``("C", label,
  counter)``, reduces the 512-bit digest mod R (bias < 2^-256) and, so that the next
  challenge differs, absorbs the digest back into the state. Zero is skipped by
  bumping the counter (a zero challenge would void some Bulletproofs checks).
"""

from __future__ import annotations

import hashlib

from sgs_flower.validation.group import R

PROTOCOL = b"sgs-flower/validation/transcript/v1"


def _frame(tag: bytes, label: bytes, data: bytes) -> bytes:
    return tag + len(label).to_bytes(4, "big") + label + len(data).to_bytes(8, "big") + data


class Transcript:
    """A Fiat–Shamir transcript over SHA-512 with labelled, length-prefixed messages."""

    def __init__(self, label: bytes) -> None:
        self._state = hashlib.sha512()
        self._state.update(_frame(b"P", b"protocol", PROTOCOL))
        self._state.update(_frame(b"L", b"label", bytes(label)))

    def append(self, label: bytes, data: bytes) -> None:
        """Absorb a prover message (or public input) under ``label``."""
        self._state.update(_frame(b"A", bytes(label), bytes(data)))

    def challenge(self, label: bytes) -> int:
        """A challenge in [1, R) determined by everything absorbed so far."""
        counter = 0
        while True:
            h = self._state.copy()
            h.update(_frame(b"C", bytes(label), counter.to_bytes(4, "big")))
            digest = h.digest()
            value = int.from_bytes(digest, "big") % R
            if value:
                self._state.update(_frame(b"R", bytes(label), digest))
                return value
            counter += 1

    def clone(self) -> Transcript:
        """An independent copy (the prover and a verifier in one process each need one)."""
        other = Transcript.__new__(Transcript)
        other._state = self._state.copy()
        return other
