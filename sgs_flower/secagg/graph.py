"""Neighbour graphs for SecAgg+ (Bell et al. 2020), chosen from a public seed.

Each client shares its secrets with, and masks against, only its neighbours, so work per
client is O(k) instead of O(n). Small cohorts use the complete graph (plain SecAgg).
Larger ones use a Harary graph H(k, n) over a seeded random permutation of the cohort:
the permutation hides nothing (the seed is public) but stops the server from choosing
who neighbours whom after seeing the keys, because the seed is fixed in the round's
setup and bound into every key's context.

How k, t and the consistency quorum are chosen (the active-server model):

- k = min(n - 1, 2 * ceil(1.5 * log2(n))): O(log n) as in Bell et al. 2020; 20 at
  n = 100, 30 at n = 1000; cohorts of up to 10 get the complete graph.
- t = floor(2k / 3) + 1 shares per secret. Bonawitz et al. 2017 (section 6, active
  adversary) require t > 2n/3 so that 2t > n + n_C for up to n_C < n/3 colluding
  clients; Bell et al. 2020 apply the same condition per neighbourhood (k for n). Below
  it, a server that also controls a few neighbours could collect t shares of both
  secrets of one client. :func:`validate` refuses any t below this bound.
- Consistency quorum, global by default: q(n) = floor(2n / 3) + 1 signatures from the
  cohort on the identical survivor set. An honest client signs one survivor set per
  round, so two different sets can both reach q signatures only if 2q <= n + n_C, i.e.
  only with n/3 or more colluding clients, wherever they are. A client unmasks only
  with a quorum on the set it signed itself, proven by one BLS aggregate signature
  over the listed signers (one verification per client: :mod:`sgs_flower.secagg.bls`).
- Consistency quorum, per neighbourhood (issue 21; opt-in, a round announcing
  ``consistency="neighbourhood"`` is refused by sites whose policy does not set
  ``sgs-consistency=neighbourhood``): a client reveals shares only when
  q(k + 1) = floor(2(k + 1) / 3) + 1 members of its *closed* neighbourhood (itself and
  its k neighbours) signed the identical survivor set (the whole set, by its digest).
  An honest client signs one survivor set per round, so a neighbour W's self-mask seed
  and the masking key of a neighbour of W can both be rebuilt only with at least
  q + t - k - 1 colluders in one neighbourhood (11 of 30 at n = 1000; up to 10 are
  tolerated, the k/3 the threshold already assumes): the proof is in
  docs/protocol.md, "The consistency check". For a complete graph (k = n - 1) this is
  the global quorum q(n) of Bonawitz et al. 2017. Each client verifies at most
  q(k + 1) - 1 signatures: O(log n), not O(n).
- The server also keeps its global count rule (at least q(n) survivors and signers, or
  the round aborts), so the dropout tolerance is what it was: a client's masks are
  recoverable while at least t of its k neighbours answer the unmask stage (up to
  k - t = ceil(k/3) - 1 may drop). The price of the active model is this smaller
  dropout tolerance (for n = 5: one dropout; for n = 4: none).

The graph seed is not chosen by the server: both ends derive it from the run, round
and cohort (:func:`graph_seed`). A server can still influence the graph through the
cohort it samples; with a pinned roster (no server-made nodes) that only rearranges
real sites.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from sgs_flower.secagg.errors import ConfigurationError
from sgs_flower.secagg.keys import node_bytes, pack_nodes
from sgs_flower.secagg.memo import memo_by_identity

COMPLETE_UP_TO = 10


def default_degree(n: int) -> int:
    """Number of neighbours per client for a cohort of ``n`` (see module docstring)."""
    if n < 2:
        raise ConfigurationError(f"a cohort needs at least 2 clients, got {n}")
    if n <= COMPLETE_UP_TO:
        return n - 1
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def default_threshold(degree: int) -> int:
    """Shares needed to rebuild a secret: more than two thirds of the neighbours."""
    return active_threshold(degree)


def active_threshold(degree: int) -> int:
    """The smallest threshold the active-server model admits for ``degree`` neighbours."""
    return (2 * degree) // 3 + 1


def consistency_quorum(n: int) -> int:
    """More than two thirds of ``n``: the server's count of survivors and signers below
    which it aborts, and (with ``n`` = a closed neighbourhood) the signatures a client
    needs, see :func:`neighbourhood_quorum`."""
    return (2 * n) // 3 + 1


#: The consistency quorums a round may announce (``RoundParams.consistency``, ``Setup``):
#: ``"global"`` (the default, the landed guarantee: floor(2n/3) + 1 of the cohort signed
#: the identical set, fewer than n/3 colluders anywhere) and ``"neighbourhood"`` (opt-in,
#: sites set ``sgs-consistency=neighbourhood``: floor(2(k+1)/3) + 1 of the site's closed
#: neighbourhood, at most floor(k/3) colluders in any one neighbourhood; O(k) signature
#: checks per site instead of ~2n/3). docs/protocol.md, "The consistency check".
CONSISTENCY_GLOBAL = "global"
CONSISTENCY_NEIGHBOURHOOD = "neighbourhood"
CONSISTENCY_MODES = (CONSISTENCY_GLOBAL, CONSISTENCY_NEIGHBOURHOOD)


def check_consistency_mode(mode: object, what: str = "consistency") -> str:
    """``mode`` if it is one of :data:`CONSISTENCY_MODES`, else :class:`ConfigurationError`."""
    if mode not in CONSISTENCY_MODES:
        raise ConfigurationError(f"{what} must be one of {', '.join(map(repr, CONSISTENCY_MODES))}, got {mode!r}")
    assert isinstance(mode, str)
    return mode


def neighbourhood_quorum(degree: int) -> int:
    """Members of a client's closed neighbourhood (itself and its ``degree`` neighbours)
    that must have signed the identical survivor set before the client reveals a share.

    Two thirds of the closed neighbourhood, so that with the threshold t = floor(2k/3)+1
    a server cannot get one client's self-mask seed and a neighbour's masking key without
    more colluders in a neighbourhood than the threshold itself tolerates (see the module
    docstring); for a complete graph it is the global quorum."""
    return consistency_quorum(degree + 1)


def graph_seed(run_id: int, round_id: int, cohort: Sequence[int]) -> bytes:
    """The public seed of a round's graph, derived (never chosen by the server)."""
    return _graph_seed(run_id, round_id, tuple(cohort))


@memo_by_identity(16)
def _graph_seed(run_id: int, round_id: int, cohort: tuple[int, ...]) -> bytes:
    # cached: a pure function of its arguments, which every in-process client recomputes
    h = hashlib.sha256(b"sgs-flower/graph-seed/v2" + node_bytes(run_id) + node_bytes(round_id))
    h.update(pack_nodes(sorted(cohort)))
    return h.digest()


def cohort_index(cohort: Sequence[int]) -> dict[int, int]:
    """Each member's position in ``cohort`` (a read-only, shared mapping); duplicates are
    refused. Share x-coordinates and membership tests are then O(1), not O(n)."""
    return _cohort_index(tuple(cohort))


@memo_by_identity(16)
def _cohort_index(cohort: tuple[int, ...]) -> dict[int, int]:
    index = {u: i for i, u in enumerate(cohort)}
    if len(index) != len(cohort):
        raise ConfigurationError("cohort contains duplicate node ids")
    return index


def validate(n: int, degree: int, threshold: int) -> None:
    """Refuse graphs that are not k-regular or thresholds that would be insecure."""
    if not 1 <= degree <= n - 1:
        raise ConfigurationError(f"degree must be in 1..{n - 1} for a cohort of {n}, got {degree}")
    if degree != n - 1 and degree % 2:
        raise ConfigurationError(
            f"degree {degree} must be even (a Harary graph) or n - 1 = {n - 1} (complete)"
        )
    if not active_threshold(degree) <= threshold <= degree:
        raise ConfigurationError(
            f"threshold {threshold} must be in {active_threshold(degree)}..{degree}: below two "
            "thirds of the neighbours an active server with a few colluding clients could "
            "collect both shares of one client (Bonawitz et al. 2017, section 6)"
        )


def neighbours_of(cohort: Sequence[int], degree: int, seed: bytes, u: int) -> frozenset[int]:
    """One client's neighbours, in O(n log n) time and O(k) memory beyond the cohort:
    what a client computes, so that a huge complete-graph cohort cannot cost it n^2."""
    members = tuple(cohort)
    index = cohort_index(members)
    n = len(members)
    if u not in index:
        raise ConfigurationError(f"node {u} is not in the cohort")
    if degree >= n - 1:
        return frozenset(v for v in members if v != u)
    ring, position = _ring(members, bytes(seed))
    i = position[u]
    half = degree // 2
    return frozenset(ring[(i + d) % n] for d in range(-half, half + 1) if d != 0)


def _ring_key(seed: bytes, u: int) -> bytes:
    return hashlib.sha256(b"sgs-flower/graph/v1" + seed + node_bytes(u)).digest()


@memo_by_identity(8)
def _ring(cohort: tuple[int, ...], seed: bytes) -> tuple[tuple[int, ...], dict[int, int]]:
    """The Harary ring (the cohort in the order of its seeded SHA-256 keys) and each
    member's place on it. Cached: a pure function of the cohort and the public seed, so
    in-process clients of one round (and the server) hash the cohort once, not n times."""
    ring = tuple(sorted(set(cohort), key=lambda v: _ring_key(seed, v)))
    return ring, {v: i for i, v in enumerate(ring)}


def neighbours(cohort: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """The neighbour set of every client: complete graph or Harary H(degree, n)."""
    return dict(_neighbours(tuple(cohort), degree, bytes(seed)))


@memo_by_identity(8)
def _neighbours(cohort: tuple[int, ...], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    # Cached: in-process simulations build the same graph once per client.
    cohort_index(cohort)  # refuses duplicates
    members = sorted(cohort)
    n = len(members)
    if degree >= n - 1:
        everyone = frozenset(members)
        return {u: everyone - {u} for u in members}
    ring, _ = _ring(cohort, seed)
    half = degree // 2
    out: dict[int, set[int]] = {u: set() for u in members}
    for i, u in enumerate(ring):
        for d in range(1, half + 1):
            v = ring[(i + d) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: frozenset(vs) for u, vs in out.items()}
