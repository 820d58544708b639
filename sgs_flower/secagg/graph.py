"""Neighbour graphs for SecAgg+ (Bell et al. 2020), chosen from a public seed.

Each client shares its secrets with, and masks against, only its neighbours, so work per
client is O(k) instead of O(n). Small cohorts use the complete graph (plain SecAgg).
Larger ones use a Harary graph H(k, n) over a seeded random permutation of the cohort:
the permutation hides nothing (the seed is public) but stops the server from choosing
who neighbours whom after seeing the keys, because the seed is fixed in the round's
setup and bound into every key's context.

How k and t are chosen (``default_degree``, ``default_threshold``):

- k = min(n - 1, 2 * ceil(1.5 * log2(n))): O(log n) as in Bell et al.; 20 at n = 100,
  30 at n = 1000; cohorts of up to 10 get the complete graph.
- t = floor(k / 2) + 1, a strict majority of a client's neighbours. Because an honest
  client reveals, per neighbour, either the self-mask share or the key share and never
  both, and 2t > k, the server can never hold t shares of both secrets of one client.
- Tolerance: a client's masks are recoverable as long as at least t of its k neighbours
  answer the unmask stage, i.e. up to k - t = ceil(k / 2) - 1 of its neighbours may drop.
  With a random graph and an independent dropout rate d, a round fails with probability
  about n * P[Binomial(k, d) > k - t]; at k = 30, d = 0.1 that is below 1e-9 per round.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

from sgs_flower.secagg.errors import ConfigurationError
from sgs_flower.secagg.keys import node_bytes

COMPLETE_UP_TO = 10


def default_degree(n: int) -> int:
    """Number of neighbours per client for a cohort of ``n`` (see module docstring)."""
    if n < 2:
        raise ConfigurationError(f"a cohort needs at least 2 clients, got {n}")
    if n <= COMPLETE_UP_TO:
        return n - 1
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def default_threshold(degree: int) -> int:
    """Shares needed to rebuild a secret: a strict majority of the neighbours."""
    return degree // 2 + 1


def validate(n: int, degree: int, threshold: int) -> None:
    """Refuse graphs that are not k-regular or thresholds that would be insecure."""
    if not 1 <= degree <= n - 1:
        raise ConfigurationError(f"degree must be in 1..{n - 1} for a cohort of {n}, got {degree}")
    if degree != n - 1 and degree % 2:
        raise ConfigurationError(
            f"degree {degree} must be even (a Harary graph) or n - 1 = {n - 1} (complete)"
        )
    if not degree // 2 + 1 <= threshold <= degree:
        raise ConfigurationError(
            f"threshold {threshold} must be in {degree // 2 + 1}..{degree}: below a strict "
            "majority of the neighbours a server could collect both shares of one client"
        )


def neighbours(cohort: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """The neighbour set of every client: complete graph or Harary H(degree, n)."""
    return dict(_neighbours(tuple(cohort), degree, bytes(seed)))


@lru_cache(maxsize=8)
def _neighbours(cohort: tuple[int, ...], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    # Cached: in-process simulations build the same graph once per client.
    members = sorted(set(cohort))
    if len(members) != len(cohort):
        raise ConfigurationError("cohort contains duplicate node ids")
    n = len(members)
    if degree >= n - 1:
        everyone = frozenset(members)
        return {u: everyone - {u} for u in members}
    ring = sorted(members, key=lambda u: hashlib.sha256(b"sgs-flower/graph/v1" + seed + node_bytes(u)).digest())
    half = degree // 2
    out: dict[int, set[int]] = {u: set() for u in members}
    for i, u in enumerate(ring):
        for d in range(1, half + 1):
            v = ring[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: frozenset(vs) for u, vs in out.items()}
