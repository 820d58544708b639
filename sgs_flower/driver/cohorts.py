"""Which nodes take part in a round: the wrapped strategy's pick, a cohort drawn ahead
for a pipelined round, and participation in whole groups (issue 29).

Why a module of its own: a cohort is chosen in three places (a round's start, the
setup of the next round during it, an evaluation round), under the same rules: a pick
of the wrapped strategy is honoured, a round set up ahead keeps the cohort it was set
up for, and with ``min_group`` a cohort is made of whole groups of the federation,
learnt from the sites' identities as they advertise keys.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from sgs_flower.driver.config import SecAggConfig
from sgs_flower.driver.learner import Sampling
from sgs_flower.driver.report import RoundReport
from sgs_flower.secagg.groups import GroupRule
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.server import SecAggServer

if TYPE_CHECKING:
    from sgs_flower.driver.pipelining import Ahead


class Cohorts:
    """The run's cohort rules and what they remember (the groups, the sites' identities,
    the wrapped strategy's last pick)."""

    def __init__(self, config: SecAggConfig, own_nodes: bool, name: str, logger: logging.Logger) -> None:
        self.config, self.own_nodes, self.name, self.logger = config, own_nodes, name, logger
        self.last_chosen: list[int] = []  # the nodes configure_train chose last round
        self.said_full_setup = False  # the INFO line on rounds set up in full for that reason, said once
        self.said_rounded_up = False  # a pick of configure_train rounded up to whole groups: said once
        # participation in whole groups (issue 29): the sites' partition of the roster, or
        # of the federation learnt at the first round (None until then)
        self.grouped = bool(config.min_group)
        self.groups = (GroupRule.of(Roster.load(config.roster), config.min_group)
                       if config.min_group and config.roster else None)
        self.identities: dict[int, bytes] = {}  # node id -> identity key, as advertised (to sample by group)

    def for_round(
        self, server_round: int, nodes_sent: list[int], ahead: Ahead | None, connected: Callable[[], list[int]],
        sampling: Sampling,
    ) -> tuple[list[int], RoundReport, Ahead | None]:
        """The round's cohort, its report, and the advance setup it uses (None: it sets up
        in full). ``nodes_sent``: the nodes configure_train's messages go to, in order;
        ``connected`` gives the connected nodes (asked only under whole groups).

        A strategy that samples as FedAvg does keeps the cohort drawn for the round during
        the previous one (configure_train's draw is just another uniform sample of the
        same size). One whose ``configure_train`` may choose its nodes itself (an override
        outside Flower's FedAvg family) has its choice honoured: the advance setup is used
        only when it was made for exactly those nodes, else the round sets up in full from
        configure_train's nodes (five exchanges instead of three; said once per run)."""
        chosen = sorted(set(nodes_sent))
        self.last_chosen = chosen
        if self.grouped and nodes_sent:
            return self._grouped_round(server_round, chosen, ahead, connected, sampling)
        if ahead is not None and nodes_sent:
            if set(ahead.cohort) == set(chosen):
                return list(ahead.cohort), ahead.report, ahead
            if not self.own_nodes:
                self.logger.log(INFO, "secure round %s: its cohort of %d was sampled during round %s (set up ahead); "
                                "configure_train's own (uniform) sample is not used", server_round, len(ahead.cohort),
                                server_round - 1)
                return list(ahead.cohort), ahead.report, ahead
            if not self.said_full_setup:
                self.said_full_setup = True
                self.logger.log(
                    INFO, "secure round %s: %s.configure_train chose other nodes than the cohort set up ahead during "
                    "round %s; its choice is honoured: such a round is set up in full from configure_train's nodes "
                    "(5 exchanges instead of 3; a round whose nodes it chose as in the round before stays "
                    "pipelined). Said once.", server_round, self.name, server_round - 1)
        cohort = list(nodes_sent)
        return cohort, RoundReport(server_round, "aborted", cohort=sorted(cohort)), None

    def _grouped_round(
        self, server_round: int, chosen: list[int], ahead: Ahead | None, connected: Callable[[], list[int]],
        sampling: Sampling,
    ) -> tuple[list[int], RoundReport, Ahead | None]:
        """:meth:`for_round` under participation in whole groups."""
        if self.own_nodes and self.groups is not None:
            # a pick of its own, under participation in whole groups: rounded up to the
            # whole groups of the picked nodes (a part of a group could never be summed)
            cohort = self.whole_groups_of(chosen, connected())
            if set(cohort) != set(chosen) and not self.said_rounded_up:
                self.said_rounded_up = True
                self.logger.log(
                    INFO, "secure round %s: %s.configure_train picked %d nodes; participation in whole groups "
                    "(SecAggConfig.min_group=%d) rounds that up to the whole groups they are in: %d nodes (set "
                    "min_group=0, and the sites' sgs-min-group=0, to use a pick as it is and give up the "
                    "protection across rounds). Said once.", server_round, self.name, len(chosen),
                    self.config.min_group, len(cohort))
            if ahead is not None and set(ahead.cohort) == set(cohort):
                return list(ahead.cohort), ahead.report, ahead
            return cohort, RoundReport(server_round, "aborted", cohort=cohort), None
        # the cohort is whole groups (the advance setup drew it the same way), never
        # configure_train's uniform draw of single nodes; while the groups are not learnt
        # yet, every connected node
        if ahead is not None:
            return list(ahead.cohort), ahead.report, ahead
        cohort = self.group_cohort(connected(), sampling) or chosen
        return cohort, RoundReport(server_round, "aborted", cohort=sorted(cohort)), None

    def sample(self, nodes: list[int], sampling: Sampling, needed: int) -> list[int]:
        """The default cohort of a round set up ahead (see :meth:`RoundDriver.sample_cohort`)."""
        if sampling.fraction_train == 0.0 or len(nodes) < needed:
            return []
        if self.grouped and self.own_nodes and self.groups is not None:  # its last pick, up to whole groups
            return self.whole_groups_of(self.last_chosen, nodes) if set(self.last_chosen) <= set(nodes) else []
        if self.grouped:
            return self.group_cohort(nodes, sampling)
        if self.own_nodes:
            return list(self.last_chosen) if set(self.last_chosen) <= set(nodes) else []
        size = max(int(len(nodes) * sampling.fraction_train), sampling.min_train_nodes)
        return sorted(random.sample(nodes, size)) if size <= len(nodes) else []

    def whole_groups_of(self, picked: list[int], nodes: list[int]) -> list[int]:
        """``picked`` with the other connected members of each group a picked node is in
        (nodes of unknown identity kept as picked: a partial group is left out by the
        server)."""
        rule, known = self.groups, self.identities
        assert rule is not None
        by_key = {known[v]: v for v in nodes if v in known}
        touched = {rule.group_of[known[v]] for v in picked if known.get(v) in rule.group_of}
        return sorted(set(picked) | {by_key[k] for g in touched for k in rule.groups[g] if k in by_key})

    def group_cohort(self, nodes: list[int], sampling: Sampling, evaluate: bool = False) -> list[int]:
        """Participation in whole groups (``SecAggConfig.min_group``): a cohort of whole
        groups, ``fraction_train`` (``fraction_evaluate`` for an evaluation round) of the
        groups whose every roster member is a connected node of known identity (at least
        ``min_train_nodes`` / ``min_evaluate_nodes`` nodes' worth), drawn
        uniformly; plus every connected node whose identity is not known yet (learnt at
        its first advertisement; a partial group is left out by the server). While no
        identity is known, every connected node."""
        rule, known = self.groups, self.identities
        if rule is None:  # the federation is learnt at the first round: all of it takes part
            return sorted(nodes)
        by_key = {known[v]: v for v in nodes if v in known}
        unknown = sorted(v for v in nodes if v not in known)
        complete = [sorted(by_key[k] for k in g) for g in rule.groups if g <= by_key.keys()]
        if not complete:
            return sorted(nodes)
        fraction, least = ((sampling.fraction_evaluate, sampling.min_evaluate_nodes) if evaluate
                           else (sampling.fraction_train, sampling.min_train_nodes))
        want = max(int(len(complete) * fraction), -(-least // rule.min_group), 1)
        picked = random.sample(complete, min(want, len(complete)))
        return sorted({v for g in picked for v in g} | set(unknown))

    def learn(self, report: RoundReport, server: SecAggServer) -> None:
        """What a round's protocol server learnt about the federation: the sites'
        identities, the groups (learnt at the first round, as the sites learn them) and
        which groups the round's sum is over."""
        log = self.logger.log
        self.identities.update((v, a.identity_key) for v, a in server.advertised.items())
        if self.groups is None and server.groups is not None:  # learnt at the first round, as the sites learn it
            self.groups = server.groups
            log(INFO, "round %s: no roster, so the federation is the %d sites of this round's cohort (learnt on "
                "first use, as each site learns it): %d groups of at least %d (SecAggConfig.min_group); later "
                "sites are never in a whole group (pin a roster to add sites)", report.server_round,
                len(server.groups.roster), len(server.groups.groups), server.groups.min_group)
        if self.groups is not None and report.survivors and not report.groups:
            report.groups = sorted({self.groups.group_of[k] for v in report.survivors
                                    if (k := self.identities.get(v)) in self.groups.group_of})
            total = len(self.groups.groups)
            missing = sorted(set(range(total)) - set(report.groups))
            shown = ("every group" if not missing else "not in it: groups " + ", ".join(map(str, missing[:10]))
                     + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
            log(INFO, "round %s: a sum over %d whole groups of the federation's %d (%s; SecAggConfig.min_group=%d)",
                report.server_round, len(report.groups), total, shown, self.groups.min_group)
        if server.group_excluded and not report.group_excluded:
            report.group_excluded = len(server.group_excluded)
            log(WARNING, "round %s: %d updates left out of the sum with their group, a member of which sent no "
                "masked input (SecAggConfig.min_group=%d: a sum is over whole groups only)", report.server_round,
                report.group_excluded, self.config.min_group)
