"""The round driver: one whole secure round end to end, without Flower (issue 30).

It owns the stages, pipelining, retries, aborts and timeouts, the evaluation rounds, the
model-key phase, participation in whole groups, the DP plan hooks and the round report
(:class:`RoundDriver`). It reaches the sites through a :class:`Transport` (send these
messages to these node ids, collect the replies by a deadline; which nodes are
connected) and the learning side through a :class:`Learner` (the wrapped strategy's
hooks). ``strategies`` implements both over Flower's ``Grid`` and Strategy API;
:mod:`sgs_flower.driver.inprocess` implements both without Flower, over in-process sites
that answer through :mod:`sgs_flower.site` (``run_rounds``: R whole rounds, for tests
and ``scripts/bench_secagg.py``), and :mod:`sgs_flower.driver.shards` the transport over
such sites in worker processes. Neither is imported here, so importing the driver does
not import the site.
"""

from sgs_flower.driver.config import SecAggConfig
from sgs_flower.driver.learner import Instructions, Learner, Released, Sampling
from sgs_flower.driver.report import (
    RoundReport,
    SecureAggregationFailed,
    SecureEvaluationUnavailable,
    group_client_errors,
)
from sgs_flower.driver.rounds import RoundDriver
from sgs_flower.driver.transport import EVALUATE, TRAIN, Outgoing, Reply, ReplyError, Transport

__all__ = [
    "EVALUATE",
    "TRAIN",
    "Instructions",
    "Learner",
    "Outgoing",
    "Released",
    "Reply",
    "ReplyError",
    "RoundDriver",
    "RoundReport",
    "Sampling",
    "SecAggConfig",
    "SecureAggregationFailed",
    "SecureEvaluationUnavailable",
    "Transport",
    "group_client_errors",
]
