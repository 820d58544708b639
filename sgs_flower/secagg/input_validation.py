"""Input validation inside SecAgg+ (issue 31): the protocol's side of it.

The cryptography (commitments, the aggregated Bulletproofs range proof over k random
projections, the aggregate opening) is :mod:`sgs_flower.validation`; this module says
*what* is proven, *when*, and *what a failure does*, for both ends of a round.

- **What is bounded.** ``x``: the first :attr:`ValidationLayout.body` words of a site's
  encoded vector read as signed integers (the model-delta words in the units that enter
  the sum; :func:`sgs_flower.pipeline.validation_layout` says which words and which bound
  ``B`` for a spec). The site proves ``||x||_2 <= B`` up to the factor
  ``BoundParams.gamma`` (soundness error ``2^-soundness_bits`` per challenge).
- **The blinds enter the sum.** The k commitment blinds ``s_j`` (each below the scalar
  field order ``R``, ~2^255) are appended to the masked vector as limbs of
  :func:`blind_limb_bits` bits, low limb first, sized so that the cohort's sum of one limb
  cannot wrap mod 2^b: after unmask the server reads ``sum s_j`` exactly
  (:func:`summed_blinds`), as it reads the weight.
- **The challenge comes after x is fixed**, and is common to every site: at the
  consistency stage the server's request carries each survivor's masked-input digest
  (:func:`input_digest`); a site checks its own, derives the seed
  (:func:`challenge_seed`: the round's mask context, the layout, the survivor set and the
  digests) and answers, beside its consistency signature, with its proof and an Ed25519
  identity signature over it (:func:`proof_statement`), so that a failing proof is
  *evidence* against its signer.
- **A failing proof excludes its site like a dropout**: the unmask request carries the
  evidence (:func:`evidence_blob`), each honest site checks it itself
  (:func:`check_evidence`: the signature is valid AND the proof fails under the seed the
  site derived) and only then reveals the cheater's masking-key shares instead of its
  self-mask shares. The server cannot frame an honest site (it cannot sign a failing
  proof in its name), and evidence shown to some sites only exposes the cheater's own
  input.
- **After unmask** the server checks that the product of the remaining survivors'
  commitments opens to the projection of the unmasked sum with the summed blinds
  (``check_opening``): a site that proved one vector and masked another makes this fail,
  and the round aborts before anything is released.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgs_flower.secagg import identity, keys
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentRequestError,
    MalformedMessageError,
    SignatureError,
)
from sgs_flower.secagg.prg import dtype_for_bits
from sgs_flower.validation import group
from sgs_flower.validation.errors import ProofError
from sgs_flower.validation.opening import check_opening
from sgs_flower.validation.projection import BoundParams, params_for, project
from sgs_flower.validation.proof import (
    BoundProof,
    prove_bound,
    random_blinds,
    verify_bound,
    verify_bounds,
)

#: The bounds a round may ask for: "l2" (an L2 norm bound, e.g. a DP clip norm) and
#: "linf" (a range per coordinate, proven through the L2 bound it implies, sqrt(m) * R).
MODES = ("l2", "linf")
#: The widest word a validated round may use: every signed word, and every signed sum of
#: words, is then below 2^39 in magnitude, inside the |x_i| < 2^40 that the projection
#: covers (``sgs_flower.validation.projection``), for honest sites and cheaters alike.
MAX_FIELD_BITS = 40
SIGNATURE_BYTES = 64  # Ed25519
DIGEST_BYTES = 32
_SEED_LABEL = b"sgs-flower/validation/seed/v1"
_CONTEXT_LABEL = b"sgs-flower/validation/proof-context/v1"
_STATEMENT_LABEL = b"sgs-flower/validation/proof-signature/v1"
_DIGEST_LABEL = b"sgs-flower/validation/masked-input/v1"
_LAYOUT_LABEL = b"sgs-flower/validation/layout/v1"


@dataclass(frozen=True)
class ValidationLayout:
    """What a validated round proves: the bound's ``mode``, its parameters (``params``:
    bound B in integer units, k projections, range bits, gamma) and ``body``, the number
    of leading words of the encoded vector that form x. Both ends hold the same layout;
    its :meth:`digest` enters the challenge seed and every proof's context, so sites
    given different layouts cannot produce proofs that verify for one another."""

    mode: str
    params: BoundParams
    body: int

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigurationError(f"validation mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.body, bool) or not isinstance(self.body, int) or self.body < 1:
            raise ConfigurationError(f"the validated body must be at least one word, got {self.body!r}")

    @property
    def k(self) -> int:
        return int(self.params.k)

    def to_config(self) -> dict[str, Any]:
        """Plain JSON-able values (the update spec carries them as canonical JSON)."""
        return {"mode": self.mode, "body": self.body, "params": self.params.to_config()}

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> ValidationLayout:
        if not isinstance(d, Mapping) or set(d) != {"mode", "body", "params"}:
            raise ConfigurationError("a validation layout needs exactly the fields mode, body and params")
        params = d["params"]
        if not isinstance(params, Mapping):
            raise ConfigurationError("a validation layout's params must be a mapping")
        return cls(mode=str(d["mode"]), params=BoundParams.from_config(dict(params)), body=d["body"])

    def to_json(self) -> str:
        return json.dumps(self.to_config(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ValidationLayout:
        try:
            d = json.loads(text)
        except (TypeError, ValueError, RecursionError) as exc:
            raise ConfigurationError(f"validation layout is not valid JSON ({type(exc).__name__})") from exc
        return cls.from_config(d)

    def digest(self) -> bytes:
        return hashlib.sha256(_LAYOUT_LABEL + self.to_json().encode()).digest()


# ------------------------------------------------------------------ blinds in limbs
def check_field_bits(field_bits: int) -> None:
    """A validated round's words must be at most :data:`MAX_FIELD_BITS` wide."""
    if field_bits > MAX_FIELD_BITS:
        raise ConfigurationError(
            f"input validation needs words of at most {MAX_FIELD_BITS} bits (the projection covers |x_i| < 2^40), "
            f"got {field_bits}: lower field_bits"
        )


def blind_limb_bits(field_bits: int, cohort_size: int) -> int:
    """Bits per blind limb: the most for which the cohort's sum of one limb (each below
    2^bits) cannot wrap mod 2^b, ``cohort_size * (2^bits - 1) < 2^(b-1)``, as the weight's
    limbs are sized (capped at 62 so a limb fits a signed word)."""
    if cohort_size < 1:
        raise ConfigurationError(f"cohort size must be >= 1, got {cohort_size}")
    half = 1 << (field_bits - 1)
    most = (half - 1) // cohort_size + 1  # cohort_size * (most - 1) < half
    bits = min(most.bit_length() - 1, 62)
    if bits < 1:
        raise ConfigurationError(f"a {field_bits}-bit field cannot hold the sum of {cohort_size} one-bit limbs")
    return bits


def blind_limbs(field_bits: int, cohort_size: int) -> int:
    """Limbs of one blind (below R, the scalar field order)."""
    return -(-group.R.bit_length() // blind_limb_bits(field_bits, cohort_size))


def blind_words(layout: ValidationLayout | None, field_bits: int, cohort_size: int) -> int:
    """Words the blinds add to the masked vector (0 without validation)."""
    if layout is None:
        return 0
    return layout.k * blind_limbs(field_bits, cohort_size)


def blind_limb_words(blinds: Sequence[int], field_bits: int, cohort_size: int) -> np.ndarray:
    """The blinds as field words: per blind its limbs, low first."""
    bits, limbs = blind_limb_bits(field_bits, cohort_size), blind_limbs(field_bits, cohort_size)
    mask = (1 << bits) - 1
    out = np.zeros(len(blinds) * limbs, dtype=dtype_for_bits(field_bits))
    for j, s in enumerate(blinds):
        if not 0 <= int(s) < group.R:
            raise ConfigurationError("a commitment blind must lie in 0..R-1")
        for i in range(limbs):
            out[j * limbs + i] = (int(s) >> (bits * i)) & mask
    return out


def summed_blinds(words: np.ndarray, k: int, field_bits: int, cohort_size: int) -> list[int]:
    """The cohort's exact ``sum s_j`` per projection from the unmasked limb sums (each
    below 2^(b-1), so it reads as a non-negative integer)."""
    bits, limbs = blind_limb_bits(field_bits, cohort_size), blind_limbs(field_bits, cohort_size)
    ints = [int(v) for v in np.asarray(words, dtype=np.uint64)]
    if len(ints) != k * limbs:
        raise ConfigurationError(f"{len(ints)} blind words for {k} blinds of {limbs} limbs")
    return [sum(ints[j * limbs + i] << (bits * i) for i in range(limbs)) for j in range(k)]


def body_integers(vector: np.ndarray, body: int, field_bits: int) -> np.ndarray:
    """x: the first ``body`` words read as signed (two's complement) integers, int64."""
    words = np.asarray(vector)[:body].astype(np.uint64)
    if field_bits == 64:
        return words.view(np.int64).copy()
    signed = words.astype(np.int64)
    return np.where(signed >= 1 << (field_bits - 1), signed - (1 << field_bits), signed)


# ------------------------------------------------------------------ challenge and statements
def input_digest(masked: np.ndarray, field_bits: int) -> bytes:
    """SHA-256 of a masked input as sent (little-endian words of its width, the width
    and length in front): what the consistency request lists for each survivor."""
    arr = np.ascontiguousarray(masked)
    le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    head = struct.pack(">BQ", field_bits, arr.size)
    return hashlib.sha256(_DIGEST_LABEL + head + le.tobytes()).digest()


def challenge_seed(
    mask_context: bytes, layout: ValidationLayout, survivors: Sequence[int], digests: Sequence[tuple[int, bytes]]
) -> bytes:
    """The round's common challenge: fixed only once every survivor's masked input (and
    so its x and blinds) is, by hashing the round's mask context, the layout, the
    survivor set and every survivor's masked-input digest."""
    h = hashlib.sha256(_SEED_LABEL)
    for part in (mask_context, layout.digest(), keys.pack_nodes(survivors)):
        h.update(struct.pack(">Q", len(part)) + part)
    for node, digest in digests:
        h.update(keys.node_bytes(node) + digest)
    return h.digest()


def proof_context(run_id: int, round_id: int, node: int, identity_key: bytes, seed: bytes,
                  layout: ValidationLayout) -> bytes:
    """What a site's proof is bound to (its Fiat-Shamir transcript): run, round, node,
    identity, the challenge seed and the layout. A proof copied from another site, round
    or run, or made under another seed, does not verify here."""
    return hashlib.sha256(
        _CONTEXT_LABEL + keys.node_bytes(run_id) + keys.node_bytes(round_id) + keys.node_bytes(node)
        + identity_key + seed + layout.digest()
    ).digest()


def proof_statement(run_id: int, round_id: int, node: int, seed: bytes, proof: bytes) -> bytes:
    """What a site signs with its identity key beside its proof: a proof that fails under
    this seed is then evidence against the signer that no one else could produce."""
    return (_STATEMENT_LABEL + keys.node_bytes(run_id) + keys.node_bytes(round_id) + keys.node_bytes(node) + seed
            + hashlib.sha256(proof).digest())


def check_digests(
    digests: Sequence[tuple[int, bytes]], survivors: Sequence[int], node: int, own: bytes
) -> None:
    """A site's check of the consistency request's digest list: one 32-byte digest per
    survivor, in the survivor set's order, and its own is the digest of what it sent."""
    if [v for v, _ in digests] != list(survivors):
        raise InconsistentRequestError(
            "the consistency request's masked-input digests do not name exactly the survivor set, in order"
        )
    if any(len(d) != DIGEST_BYTES for _, d in digests):
        raise MalformedMessageError(f"a masked-input digest must be {DIGEST_BYTES} bytes")
    if node in dict(digests) and dict(digests)[node] != own:
        raise InconsistentRequestError(
            f"the consistency request lists another digest for node {node}'s masked input than the one it sent"
        )


# ------------------------------------------------------------------ proving and checking
@dataclass
class SiteInput:
    """A site's validation secrets for one round, from its masked input to its proof:
    x (int64), the blinds and the digest of the masked vector it sent."""

    layout: ValidationLayout
    x: np.ndarray
    blinds: list[int]
    digest: bytes = b""

    @classmethod
    def draw(cls, layout: ValidationLayout, vector: np.ndarray, field_bits: int) -> SiteInput:
        if layout.body > np.asarray(vector).size:
            raise ConfigurationError(
                f"the validated body of {layout.body} words exceeds the {np.asarray(vector).size}-word vector"
            )
        return cls(layout, body_integers(vector, layout.body, field_bits), random_blinds(layout.k))

    def to_state(self) -> dict[str, Any]:
        """Plain data for the site's saved state (a new process per message)."""
        return {"layout": self.layout.to_json(), "x": self.x.astype("<i8").tobytes(),
                "blinds": b"".join(int(s).to_bytes(32, "big") for s in self.blinds), "digest": self.digest}

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> SiteInput:
        raw = bytes(d["blinds"])
        blinds = [int.from_bytes(raw[i : i + 32], "big") for i in range(0, len(raw), 32)]
        x = np.frombuffer(bytes(d["x"]), dtype="<i8").astype(np.int64)
        return cls(ValidationLayout.from_json(str(d["layout"])), x, blinds, bytes(d["digest"]))


def prove(site: SiteInput, ident: bytes, run_id: int, round_id: int, node: int, seed: bytes) -> tuple[bytes, bytes]:
    """(proof bytes, identity signature over them) for the challenge ``seed``."""
    ctx = proof_context(run_id, round_id, node, identity.identity_public(ident), seed, site.layout)
    proof = prove_bound(site.x, site.blinds, site.layout.params, seed, ctx).to_bytes()
    return proof, identity.sign(ident, proof_statement(run_id, round_id, node, seed, proof))


def proof_fails(proof: bytes, layout: ValidationLayout, context: bytes) -> ProofError | None:
    """The reason ``proof`` does not verify under ``context`` (malformed or failing), or
    None when it verifies."""
    try:
        verify_bound(BoundProof.from_bytes(proof, layout.params), layout.params, context)
    except ProofError as exc:
        return exc
    return None


def parse_proof(proof: bytes, layout: ValidationLayout) -> BoundProof:
    return BoundProof.from_bytes(proof, layout.params)


def verify_many(
    proofs: Mapping[int, bytes], contexts: Mapping[int, bytes], layout: ValidationLayout
) -> tuple[dict[int, BoundProof], dict[int, ProofError]]:
    """The server's check of every site's proof at once (``verify_bounds``: one batched
    multi-scalar multiplication): (the proofs that verify, parsed; the reason each
    other one fails, malformed bytes included), by node."""
    parsed: dict[int, BoundProof] = {}
    failures: dict[int, ProofError] = {}
    for v, proof in proofs.items():
        try:
            parsed[v] = BoundProof.from_bytes(proof, layout.params)
        except ProofError as exc:
            failures[v] = exc
    order = sorted(parsed)
    for i, failure in verify_bounds([(parsed[v], contexts[v]) for v in order], layout.params).items():
        failures[order[i]] = failure
        del parsed[order[i]]
    return parsed, dict(sorted(failures.items()))


def evidence_blob(signature: bytes, proof: bytes) -> bytes:
    """One item of an unmask request's evidence: the cheater's identity signature, then
    the proof it signed."""
    return signature + proof


def check_evidence(
    evidence: Sequence[tuple[int, bytes]], survivors: frozenset[int], me: int, identities: Mapping[int, bytes],
    layout: ValidationLayout, run_id: int, round_id: int, seed: bytes,
) -> frozenset[int]:
    """The survivors proven to have cheated, each checked by this site itself: a
    survivor other than itself, named once, whose identity key signed (under the seed
    this site derived) a proof that does not verify. Anything else is a lying server:
    evidence naming this site (it signed only a proof that verifies), a valid proof
    offered as evidence (framing an honest site), or a signature that does not verify."""
    cheaters: set[int] = set()
    for node, blob in evidence:
        if node == me:
            raise InconsistentRequestError(f"the unmask request holds evidence against node {me} itself; refused")
        if node not in survivors:
            raise InconsistentRequestError(f"the unmask request holds evidence against node {node}, not a survivor")
        if node in cheaters:
            raise MalformedMessageError(f"the unmask request holds evidence against node {node} twice")
        if len(blob) <= SIGNATURE_BYTES:
            raise MalformedMessageError(f"the evidence against node {node} is too short to hold a signed proof")
        signature, proof = blob[:SIGNATURE_BYTES], blob[SIGNATURE_BYTES:]
        if not identity.verify(identities[node], signature, proof_statement(run_id, round_id, node, seed, proof)):
            raise SignatureError(
                f"the evidence against node {node} is not signed by its identity key under this round's challenge: "
                "forged, or made under another seed; refused"
            )
        ctx = proof_context(run_id, round_id, node, identities[node], seed, layout)
        if proof_fails(proof, layout, ctx) is None:
            raise InconsistentRequestError(
                f"the evidence against node {node} is a proof that verifies: the server is excluding an honest site; "
                "refused"
            )
        cheaters.add(node)
    return frozenset(cheaters)


def layout_for(mode: str, bound: int, body: int, soundness_bits: int = 40) -> ValidationLayout:
    """The layout of a round proving ``||x||_2 <= bound`` (integer units) over ``body``
    words (``params_for`` picks k, the range bits and gamma for the soundness asked)."""
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise ConfigurationError(f"a validation bound must be a positive integer (integer units), got {bound!r}")
    return ValidationLayout(mode, params_for(bound, soundness_bits), body)


__all__ = [
    "MODES",
    "BoundParams",
    "BoundProof",
    "SiteInput",
    "ValidationLayout",
    "blind_limb_bits",
    "blind_limb_words",
    "blind_limbs",
    "blind_words",
    "body_integers",
    "challenge_seed",
    "check_digests",
    "check_evidence",
    "check_field_bits",
    "check_sum",
    "evidence_blob",
    "input_digest",
    "layout_for",
    "params_for",
    "parse_proof",
    "proof_context",
    "proof_fails",
    "proof_statement",
    "prove",
    "summed_blinds",
    "verify_many",
]


def check_sum(
    layout: ValidationLayout, proofs: Sequence[BoundProof], total: np.ndarray, vector_length: int, field_bits: int,
    cohort_size: int, seed: bytes,
) -> list[int]:
    """The server's last check before anything is released: the product of the summed
    sites' commitments opens to the projection of the unmasked sum's body, with the
    blinds summed in limbs after the first ``vector_length`` words (raises
    ``OpeningError`` naming the projection that failed). Returns the summed blinds."""
    projected = project(body_integers(total, layout.body, field_bits), seed, layout.k)
    blinds = summed_blinds(np.asarray(total)[vector_length:], layout.k, field_bits, cohort_size)
    check_opening(list(proofs), projected, len(proofs), blinds, layout.params)
    return blinds
