"""Participation in whole groups (Multi-RoundSecAgg, So et al., AAAI 2023), against a
server that lies.

Why: secure aggregation hides one round's inputs, but two released sums over cohorts that
differ by one site differ by that site's update (when the model moved little between
them), and a server that samples cohorts at random collects such pairs by itself. If
every sum is over a union of whole groups of at least ``G`` sites, every linear
combination of released sums is constant on each group, so no site is ever alone in a
difference: the most any combination isolates is a whole group's sum.

The partition is not the server's choice: both sides derive it from the federation's
pinned roster of identity keys by a fixed public rule (:func:`partition`), so it is
stable across rounds and across runs of the same roster and needs no message. A site
that requires groups (``sgs-min-group``, default :data:`DEFAULT_MIN_GROUP`) signs a survivor
set only if it is a union of whole groups (:func:`check_whole_groups`, beside the
consistency check, before any share is revealed); the honest server leaves a group with a
missing member out of the sum whole (:func:`whole_group_members`).

Without a pinned roster (a simulation, or sites that set none) the federation is learnt on
first use, as SSH learns a host key: at the first survivor set a site is asked to sign in a
run, it takes the identity keys of that round's cohort (each signed by its owner at the
key advertisement) as the federation and partitions them by the same rule; the server
learns the same set from the same advertisements (``SecAggServer(min_group=...)``). A key
that joins later is off the learnt federation: it is never in a whole group, so no honest
site signs a sum that holds it. What this cannot stop: a server that lies at that first
round (sybils of its own, or a cohort it chose) fixes the federation; pin a roster where
that matters (docs/threat_model.md).

A roster change never regroups anyone. The roster is cut into **epochs**
(:class:`~sgs_flower.secagg.identity.Roster`): each epoch is partitioned on its own, and
the federation's groups are those of every epoch in order. Sites join as a new epoch of
at least ``G`` keys (new groups, the old ones unchanged); a site that leaves is
**revoked** in place (its key stays in its group, which can then never be whole, so its
group-mates sit out rather than being regrouped with others). Every sum, before and
after the change, is then a union of blocks of one fixed partition, and so is every
linear combination of sums. A site remembers the digests of the epochs it signed sums
under (its state file) and refuses a roster that changed one of them
(:func:`check_epochs`): an edited or reordered epoch would regroup sites.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from sgs_flower.secagg.errors import ConfigurationError, PolicyError
from sgs_flower.secagg.identity import Roster

_DOMAIN = b"sgs-flower/groups/v1"

# The default group size (site ``sgs-min-group``, server ``SecAggConfig.min_group``). Why
# 3: a difference of sums can isolate at most one group's sum, and in a group of 2 either
# member reads the other's update off that sum (a server colluding with one site), so 3 is
# the smallest size where one colluding member still leaves two honest updates summed. In
# the app's 10-site federation it makes groups of 3, 3 and 4: fraction_train can still pick
# a third of the sites, and a dropout costs 2-3 other updates (scripts/bench_groups.py:
# about 12 % of the updates at 5 % dropout). Larger groups cost more updates per dropout.
DEFAULT_MIN_GROUP = 3


def _order(key: bytes) -> bytes:
    return hashlib.sha256(_DOMAIN + key).digest()


def partition(identities: Iterable[bytes], min_group: int) -> tuple[frozenset[bytes], ...]:
    """The federation's groups: its identity keys in the order of their domain-separated
    SHA-256, cut into consecutive groups of ``min_group``; a remainder smaller than that
    joins the last group (so every group has at least ``min_group`` members, at most
    ``2 * min_group - 1``). Fewer keys than ``min_group`` are refused: no group could be
    whole without them all."""
    if min_group < 2:
        raise ConfigurationError(f"a group needs at least 2 sites, got min_group={min_group}")
    keys = sorted(set(identities), key=_order)
    if len(keys) < min_group:
        raise ConfigurationError(f"{len(keys)} identities cannot form a group of {min_group}")
    whole = len(keys) - len(keys) % min_group
    groups = [keys[i : i + min_group] for i in range(0, whole, min_group)]
    groups[-1].extend(keys[whole:])
    return tuple(frozenset(g) for g in groups)


@dataclass(frozen=True)
class GroupRule:
    """The partition of a roster into groups of at least ``min_group`` (server and sites
    derive the same one): each of ``epochs`` partitioned on its own, in order (one epoch,
    the whole ``roster``, when none are given)."""

    roster: frozenset[bytes]
    min_group: int
    epochs: tuple[frozenset[bytes], ...] = ()

    def __post_init__(self) -> None:
        if not self.epochs:  # one epoch: the whole roster (so equal rules compare equal)
            object.__setattr__(self, "epochs", (self.roster,))

    @classmethod
    def of(cls, roster: Roster, min_group: int) -> GroupRule:
        """The rule of a pinned roster file: its epochs, revoked keys in their places."""
        return cls(frozenset().union(*roster.epochs), min_group, roster.epochs)

    @cached_property
    def groups(self) -> tuple[frozenset[bytes], ...]:
        if len(self.epochs) <= 1:
            return partition(self.roster, self.min_group)
        out: list[frozenset[bytes]] = []
        for i, epoch in enumerate(self.epochs):
            if len(epoch) < self.min_group:
                raise ConfigurationError(f"roster epoch {i + 1} holds {len(epoch)} keys, fewer than one group of "
                                         f"{self.min_group}: add sites in epochs of at least {self.min_group}")
            out.extend(partition(epoch, self.min_group))
        return tuple(out)

    @cached_property
    def group_of(self) -> dict[bytes, int]:
        return {k: i for i, g in enumerate(self.groups) for k in g}

    def split(self, members: Iterable[bytes]) -> list[int]:
        """Indices of the groups that ``members`` (identity keys) touch but do not hold
        whole; a key off the roster counts as a group of its own, never whole."""
        present = set(members)
        touched = {self.group_of.get(k, -1) for k in present}
        return sorted(i for i in touched if i < 0 or not self.groups[i] <= present)


def epoch_digests(roster: Roster) -> list[str]:
    """One digest per epoch of ``roster`` (its keys, revoked ones included, sorted): what a
    site remembers of the partition it signed sums under."""
    return [hashlib.sha256(_DOMAIN + b"/epoch" + b"".join(sorted(e))).hexdigest() for e in roster.epochs]


def check_epochs(signed_under: list[str], roster: Roster) -> list[str]:
    """Site side: the roster's epoch digests, if the epochs this site already signed sums
    under are the first of them unchanged; else a :class:`PolicyError` (a roster whose
    earlier epoch was edited, reordered or dropped would regroup sites, and a sum over
    new groups could then differ from an earlier one by fewer than a group)."""
    now = epoch_digests(roster)
    if now[: len(signed_under)] != signed_under:
        changed = next((i for i, d in enumerate(signed_under) if i >= len(now) or now[i] != d), len(signed_under))
        raise PolicyError(
            f"the roster's epoch {changed + 1} is not the one this site signed sums under (sgs-min-group): a changed "
            "epoch regroups sites, so a sum over the new groups could differ from an earlier one by fewer than a "
            "group; add sites as a new epoch and revoke leaving ones in place ('revoked <key>'), never edit one"
        )
    return now


def check_whole_groups(survivors: Iterable[int], identities: Mapping[int, bytes], rule: GroupRule) -> None:
    """Site side: refuse a survivor set that is not a union of whole groups (a
    :class:`PolicyError` naming how many groups it splits), before the site signs it."""
    split = rule.split(identities[v] for v in survivors)
    if split:
        raise PolicyError(
            f"the survivor set splits {len(split)} of the federation's {len(rule.groups)} groups (sgs-min-group = "
            f"{rule.min_group}): a sum over part of a group could be differenced against another round's to isolate "
            "one site; refused before any share is revealed"
        )


def whole_group_members(nodes: Iterable[int], identities: Mapping[int, bytes], rule: GroupRule) -> set[int]:
    """Server side: the nodes of ``nodes`` whose whole group is among them (the others'
    inputs stay out of the sum, as a dropout's)."""
    present = {identities[v]: v for v in nodes if v in identities}
    keep: set[int] = set()
    for group in rule.groups:
        if group <= present.keys():
            keep.update(present[k] for k in group)
    return keep


def left_out_members(survivors: Iterable[int], identities: Mapping[int, bytes], rule: GroupRule) -> set[int]:
    """The cohort's nodes (those in ``identities``) whose whole group is outside
    ``survivors``: they may sign the set without being in it, and the consistency quorum
    counts them (a group left out whole, because a member sent no masked input)."""
    # the groups with a survivor, and -1 (off the federation): built once, not per member
    # (``present | {-1}`` inside the comprehension copied it n times: O(n^2) per site)
    excluded = {rule.group_of.get(identities.get(v, b""), -1) for v in survivors} | {-1}
    return {v for v, key in identities.items() if rule.group_of.get(key, -1) not in excluded}
