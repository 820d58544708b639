"""Leakage audits: measure what the server could learn, and check the DP claim.

* :mod:`~sgs_flower.audit.inversion` -- gradient-inversion attack (cosine + TV, iDLG labels)
* :mod:`~sgs_flower.audit.observe` -- the server's observations (plain, DP, secure aggregate)
* :mod:`~sgs_flower.audit.metrics` -- MSE / PSNR / SSIM / identification / label accuracy
* :mod:`~sgs_flower.audit.experiment` -- the audited settings (a)-(d) and worst cases
* :mod:`~sgs_flower.audit.canary` and :mod:`~sgs_flower.audit.one_run` -- empirical
  epsilon lower bound from one DP training run
* :mod:`~sgs_flower.audit.report` -- table, JSON summary, PNG grid

Like the rest of the core, nothing here imports ``flwr``.
"""

from sgs_flower.audit.canary import CanaryAuditResult, run_canary_audit
from sgs_flower.audit.experiment import Row, Setting, run_audit, settings, worst_cases
from sgs_flower.audit.inversion import AttackConfig, invert, recover_labels
from sgs_flower.audit.metrics import LeakageScores, baseline_scores, score
from sgs_flower.audit.observe import Observation, client_update, secure_mean
from sgs_flower.audit.one_run import audit_scores, epsilon_lower_bound

__all__ = [
    "AttackConfig",
    "CanaryAuditResult",
    "LeakageScores",
    "Observation",
    "Row",
    "Setting",
    "audit_scores",
    "baseline_scores",
    "client_update",
    "epsilon_lower_bound",
    "invert",
    "recover_labels",
    "run_audit",
    "run_canary_audit",
    "score",
    "secure_mean",
    "settings",
    "worst_cases",
]
