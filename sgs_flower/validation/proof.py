"""The site's statement: "my committed projections of x are within the round's bound".

A site with encoded update x, a challenge ``seed`` (fixed by the protocol after x) and
the round's :class:`~sgs_flower.validation.projection.BoundParams`:

1. projects: v_j = <a_j, x> for the k Rademacher vectors of the seed;
2. commits to u_j = scale*v_j + shift under its blinds s_j: V_j = u_j G + s_j H
   (the s_j also enter its masked vector, summed in limbs by the protocol, so the
   server can open the *sum* of the V_j after unmask, :mod:`.opening`);
3. proves with one aggregated Bulletproofs range proof that every u_j is in
   [0, 2^bits), i.e. -shift/scale <= v_j <= (shift-1)/scale.

The proof's transcript is bound to ``context`` (the protocol passes the run, round,
node, site identity and spec digest) and to the params: a proof copied from another
site or replayed from another round is checked under another transcript and fails.

The verifier never sees x or v_j: the commitments are uniformly random points given
fresh blinds, and Bulletproofs is zero-knowledge.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sgs_flower.validation import rangeproof
from sgs_flower.validation.errors import ProofError
from sgs_flower.validation.group import POINT_BYTES, R
from sgs_flower.validation.projection import BoundParams, project
from sgs_flower.validation.transcript import Transcript

TRANSCRIPT_LABEL = b"sgs-flower/validation/bound-proof/v1"


def _transcript(params: BoundParams, context: bytes) -> Transcript:
    t = Transcript(TRANSCRIPT_LABEL)
    t.append(b"params", json.dumps(params.to_config(), sort_keys=True).encode())
    t.append(b"context", bytes(context))
    return t


@dataclass(frozen=True)
class BoundProof:
    """k compressed commitments (in projection order) and one range proof."""

    commitments: list[bytes]
    proof: bytes

    def to_bytes(self) -> bytes:
        """commitments (48 bytes each) || proof: both lengths follow from the params."""
        return b"".join(self.commitments) + self.proof

    @classmethod
    def from_bytes(cls, b: bytes, params: BoundParams) -> BoundProof:
        """Split bytes into a proof for ``params``; ProofError if the length is wrong.

        Points and scalars are checked (on curve, in subgroup, canonical) by
        :func:`verify_bound`, which every use of a proof goes through."""
        b = bytes(b)
        proof_len = rangeproof.proof_size(params.bits, params.k)
        expected = params.k * POINT_BYTES + proof_len
        if len(b) != expected:
            raise ProofError(
                f"a bound proof for k={params.k}, bits={params.bits} is {expected} bytes, got {len(b)}"
            )
        cut = params.k * POINT_BYTES
        commitments = [b[i : i + POINT_BYTES] for i in range(0, cut, POINT_BYTES)]
        return cls(commitments=commitments, proof=b[cut:])


def random_blinds(k: int) -> list[int]:
    """k blinds uniform in [0, R), from the OS's CSPRNG."""
    return [secrets.randbelow(R) for _ in range(k)]


def prove_bound(
    x: np.ndarray, blinds: Sequence[int], params: BoundParams, seed: bytes, context: bytes
) -> BoundProof:
    """Project x on the seed's k vectors, commit and range-prove the shifted projections.

    Never refuses an out-of-bound x: a cheater could always run its own prover, so this
    one behaves the same (the proof of an out-of-range value simply fails to verify).
    """
    if len(blinds) != params.k:
        raise ProofError(f"{params.k} projections need {params.k} blinds, got {len(blinds)}")
    v = project(x, seed, params.k)
    values = [params.committed_value(vj) for vj in v]
    commitments, proof = rangeproof._prove(values, list(blinds), params.bits, _transcript(params, context))
    return BoundProof(commitments=commitments, proof=proof)


def verify_bound(proof: BoundProof, params: BoundParams, context: bytes) -> None:
    """ProofError unless ``proof`` shows the site's k projections within the bound."""
    if len(proof.commitments) != params.k:
        raise ProofError(f"expected {params.k} commitments, got {len(proof.commitments)}")
    rangeproof.verify(proof.commitments, proof.proof, params.bits, _transcript(params, context))


def verify_bounds(items: Sequence[tuple[BoundProof, bytes]], params: BoundParams) -> dict[int, ProofError]:
    """Verify many sites' proofs (each with its own context) at once.

    Returns {index: ProofError} for the proofs that fail (malformed ones included); an
    empty dict means every proof verified. One MSM for the whole batch: the server's
    cost per site drops from one 2*k*bits-point MSM to its own ~k+40 points plus
    scalar arithmetic (see :func:`~sgs_flower.validation.rangeproof.verify_many`).
    """
    failures: dict[int, ProofError] = {}
    statements: list[tuple[Sequence[bytes], bytes, Transcript]] = []
    index: list[int] = []
    for i, (proof, context) in enumerate(items):
        if len(proof.commitments) != params.k:
            failures[i] = ProofError(f"expected {params.k} commitments, got {len(proof.commitments)}")
            continue
        statements.append((proof.commitments, proof.proof, _transcript(params, context)))
        index.append(i)
    for j, exc in rangeproof.verify_many(statements, params.bits).items():
        failures[index[j]] = exc
    return dict(sorted(failures.items()))


def warm_up(params: BoundParams) -> None:
    """Derive the round's generators now (2*k*bits hash-to-curve points, ~0.3 ms each,
    cached per process), so the first proof or verification does not pay for them."""
    rangeproof.warm_up(params.bits, params.k)
