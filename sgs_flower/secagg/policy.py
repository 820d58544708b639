"""A site's own rules for taking part in a secure round (never the server's).

Why: every protocol parameter a client receives comes from the server, and an active
server picks whatever helps it: a cohort of two, a graph of degree one, a threshold of
one, no noise. The client therefore checks each round's parameters against a policy
that the site sets (Flower ``--node-config`` keys, see :meth:`ClientPolicy.from_node_config`)
and refuses anything that asks for less protection. The server may ask for more.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from sgs_flower.secagg.errors import ConfigurationError, PolicyError
from sgs_flower.secagg.graph import (
    CONSISTENCY_GLOBAL,
    CONSISTENCY_MODES,
    CONSISTENCY_NEIGHBOURHOOD,
    active_threshold,
    default_degree,
)
from sgs_flower.secagg.groups import DEFAULT_MIN_GROUP, GroupRule
from sgs_flower.secagg.identity import Roster, read_identity

ENV_VAR = "SGS_NODE_CONFIG"  # the same keys for sites whose node config cannot be set (simulation)

NODE_CONFIG_KEYS = {
    "sgs-require-secagg": "refuse plain (unprotected) train messages (default true)",
    "sgs-min-cohort": "smallest cohort this site joins (default 3)",
    "sgs-max-cohort": "largest cohort this site joins: bounds its memory and work (default 1000)",
    "sgs-max-vector": "largest masked vector in words: bounds its memory (default 2^27)",
    "sgs-min-degree": "smallest neighbour count; 0 = the protocol default for the cohort size",
    "sgs-consistency": "consistency quorums this site accepts: 'global' (default: two thirds of the cohort "
                       "signed the identical survivor set, fewer than n/3 colluders anywhere) or 'neighbourhood' "
                       "(also rounds whose quorum is two thirds of the site's closed neighbourhood: O(k) signature "
                       "checks, at most floor(k/3) colluders per neighbourhood)",
    "sgs-min-bits": "narrowest masked-vector word width (field bits) this site accepts (default 8; the round's "
                    "spec must still fit the cohort's sum at that width, which every site checks)",
    "sgs-identity-key": "file with this site's Ed25519 identity key (sgs-flower identity new)",
    "sgs-roster": "file of the federation's identity public keys; pins who may be in a cohort",
    "sgs-state-file": "file where the site remembers its contributions and privacy spend across runs "
                      "(default: one under $SGS_STATE_DIR or $FLWR_HOME/sgs-flower/sites; 'memory': this run only)",
    "sgs-min-model-change": "refuse another survivor set for a model closer than this times the site's update "
                            "norm to one it already signed for (default 0.01; 0: exact copies only)",
    "sgs-require-dp": "refuse rounds without distributed DP (default false)",
    "sgs-require-confidential": "refuse rounds outside the model-confidential mode (default false)",
    "sgs-require-validation": "refuse rounds whose spec does not validate every site's input (a zero-knowledge "
                              "proof of its bound, issue 31), so that no peer can move the sum anywhere (default "
                              "false)",
    "sgs-dp-min-noise": "distributed DP: smallest noise multiplier this site accepts (default 0.5)",
    "sgs-dp-max-epsilon": "distributed DP: this site's budget against the server; 0 = account only",
    "sgs-dp-delta": "distributed DP: delta of this site's accounting (default 1e-5)",
    "sgs-min-group": "sign only survivor sets that are unions of whole groups of at least this many sites, the "
                     "groups derived by a public rule from sgs-roster, else from the cohort of the run's first "
                     "round (default 3; 0: off, and two sums over cohorts that differ by one site reveal it)",
    "sgs-reply-quantum": "seconds: the site answers a masked-input request (where it trains) only at a multiple of "
                         "this after it arrived, so its reply time tells the server ceil(train time / quantum), not "
                         "its num-examples (default 0: as soon as it is done)",
}


@dataclass(frozen=True)
class ClientPolicy:
    """What this site requires of every round it takes part in (see module docstring)."""

    require_secure_aggregation: bool = True
    min_cohort: int = 3
    max_cohort: int = 1000
    max_vector_length: int = 1 << 27
    min_degree: int = 0
    # "global": only rounds with the global consistency quorum; "neighbourhood": those too
    consistency: str = CONSISTENCY_GLOBAL
    min_field_bits: int = 8
    roster: Roster | None = None
    identity_key: bytes | None = None  # None: a key made for this run (cannot be pinned)
    state_file: str | None = None  # None: the default file (dp.site.default_state_file); "memory": this run only
    min_model_change: float = 0.01
    require_distributed_dp: bool = False
    require_confidential: bool = False
    # refuse a round without input validation (issue 31): the site joins only sums in
    # which every peer proved its update's bound (sgs-require-validation)
    require_validation: bool = False
    dp_min_noise_multiplier: float = 0.5
    dp_max_epsilon: float = 0.0
    dp_delta: float = 1e-5
    reply_quantum: float = 0.0
    min_group: int = 0

    def __post_init__(self) -> None:
        if self.min_cohort < 3:
            raise ConfigurationError(f"sgs-min-cohort must be >= 3 (a sum of two reveals each to the other), got {self.min_cohort}")
        if self.max_cohort < self.min_cohort:
            raise ConfigurationError(f"sgs-max-cohort ({self.max_cohort}) is below sgs-min-cohort ({self.min_cohort})")
        if self.max_vector_length < 3:
            raise ConfigurationError(f"sgs-max-vector must be >= 3, got {self.max_vector_length}")
        if self.min_degree < 0:
            raise ConfigurationError(f"sgs-min-degree must be >= 0, got {self.min_degree}")
        if self.consistency not in CONSISTENCY_MODES:
            raise ConfigurationError(
                f"sgs-consistency must be one of {', '.join(map(repr, CONSISTENCY_MODES))}, got {self.consistency!r}"
            )
        if not 8 <= self.min_field_bits <= 64:
            raise ConfigurationError(f"sgs-min-bits must be in 8..64, got {self.min_field_bits}")
        if not (self.dp_min_noise_multiplier >= 0 and math.isfinite(self.dp_min_noise_multiplier)):
            raise ConfigurationError("sgs-dp-min-noise must be a finite number >= 0")
        if not (self.min_model_change >= 0 and math.isfinite(self.min_model_change)):
            raise ConfigurationError("sgs-min-model-change must be a finite number >= 0")
        if not self.dp_max_epsilon >= 0:
            raise ConfigurationError("sgs-dp-max-epsilon must be >= 0 (0: account only)")
        if not 0 < self.dp_delta < 1:
            raise ConfigurationError("sgs-dp-delta must be in (0, 1)")
        if self.min_group == 1 or self.min_group < 0:
            raise ConfigurationError(f"sgs-min-group must be 0 (off) or at least 2, got {self.min_group}")
        if self.min_group and self.roster is not None and len(self.roster.keys) < self.min_group:
            raise ConfigurationError(f"sgs-min-group = {self.min_group} but the roster holds {len(self.roster.keys)} "
                                     "keys: no group could be whole")
        if not (0 <= self.reply_quantum <= 3600 and math.isfinite(self.reply_quantum)):
            raise ConfigurationError(f"sgs-reply-quantum must be in 0..3600 seconds, got {self.reply_quantum}")

    # ------------------------------------------------------------ checks
    def check_round(
        self, n: int, degree: int, threshold: int, vector_length: int, consistency: str = CONSISTENCY_GLOBAL
    ) -> None:
        """Refuse a round's parameters that give less protection than the site requires,
        or that would cost more than it allows. Called before anything is allocated."""
        if consistency not in CONSISTENCY_MODES:
            raise PolicyError(f"consistency quorum {consistency!r} is unknown to this site (sgs-consistency)")
        if consistency == CONSISTENCY_NEIGHBOURHOOD and self.consistency != CONSISTENCY_NEIGHBOURHOOD:
            raise PolicyError(
                "round asks for the neighbourhood consistency quorum (two thirds of each closed neighbourhood, "
                "at most floor(k/3) colluders per neighbourhood); this site accepts only the global quorum "
                "(sgs-consistency=global; set sgs-consistency=neighbourhood to opt in)"
            )
        if n < self.min_cohort:
            raise PolicyError(f"cohort of {n} is below this site's minimum cohort ({self.min_cohort})")
        if n > self.max_cohort:
            raise PolicyError(f"cohort of {n} exceeds this site's maximum cohort ({self.max_cohort})")
        if vector_length > self.max_vector_length:
            raise PolicyError(f"vector of {vector_length} words exceeds this site's limit ({self.max_vector_length})")
        want = min(n - 1, self.min_degree or default_degree(n))
        if degree < want:
            raise PolicyError(f"degree {degree} is below this site's minimum ({want}) for a cohort of {n}")
        if threshold < active_threshold(degree):
            raise PolicyError(
                f"threshold {threshold} is below the active-server bound ({active_threshold(degree)}) for degree {degree}"
            )

    def check_validation(self, validated: bool) -> None:
        """``sgs-require-validation``: refuse a round whose peers do not prove their
        inputs' bound (checked before training, and again by the protocol client at its
        masked input)."""
        if self.require_validation and not validated:
            raise PolicyError(
                "this round does not validate its sites' inputs, and this site requires it (sgs-require-validation): "
                "one peer could move the secure sum anywhere; refused"
            )

    def check_width(self, field_bits: int) -> None:
        """Refuse a word width below the site's floor, before anything is built for the
        round. Why a floor on top of the overflow check every site makes on the spec
        (:class:`~sgs_flower.secagg.quantize.QuantizationConfig`): a narrow width is
        also coarse precision; a site may want its update to carry more than the server
        asks for."""
        if field_bits < self.min_field_bits:
            raise PolicyError(f"word width of {field_bits} bits is below this site's minimum (sgs-min-bits = "
                              f"{self.min_field_bits})")

    # ------------------------------------------------------------ loading
    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> ClientPolicy:
        """Read the ``sgs-*`` keys of a SuperNode's ``--node-config`` (others are ignored)."""

        def get(key: str, kind: type, default: Any) -> Any:
            if key not in node_config:
                return default
            value = node_config[key]
            try:
                if kind is bool:
                    if isinstance(value, str):
                        if value.lower() not in ("true", "false", "1", "0"):
                            raise ValueError(value)
                        return value.lower() in ("true", "1")
                    return bool(value)
                return kind(value)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(f"node config {key}: {NODE_CONFIG_KEYS[key]}; could not read {value!r}") from exc

        roster_path = get("sgs-roster", str, "")
        key_path = get("sgs-identity-key", str, "")
        return cls(
            require_secure_aggregation=get("sgs-require-secagg", bool, True),
            min_cohort=get("sgs-min-cohort", int, 3),
            max_cohort=get("sgs-max-cohort", int, 1000),
            max_vector_length=get("sgs-max-vector", int, 1 << 27),
            min_degree=get("sgs-min-degree", int, 0),
            consistency=get("sgs-consistency", str, CONSISTENCY_GLOBAL).strip().lower(),
            min_field_bits=get("sgs-min-bits", int, 8),
            roster=Roster.load(roster_path) if roster_path else None,
            identity_key=read_identity(key_path) if key_path else None,
            state_file=get("sgs-state-file", str, "") or None,
            min_model_change=get("sgs-min-model-change", float, 0.01),
            require_distributed_dp=get("sgs-require-dp", bool, False),
            require_confidential=get("sgs-require-confidential", bool, False),
            require_validation=get("sgs-require-validation", bool, False),
            dp_min_noise_multiplier=get("sgs-dp-min-noise", float, 0.5),
            dp_max_epsilon=get("sgs-dp-max-epsilon", float, 0.0),
            dp_delta=get("sgs-dp-delta", float, 1e-5),
            reply_quantum=get("sgs-reply-quantum", float, 0.0),
            min_group=get("sgs-min-group", int, DEFAULT_MIN_GROUP),
        )

    @property
    def group_rule(self) -> GroupRule | None:
        """The groups of the pinned roster this site requires survivor sets to respect
        (``sgs-min-group``); None without a roster (the site learns its federation at its
        first round: :meth:`learnt_group_rule`) or with groups off."""
        if not self.min_group or self.roster is None:
            return None
        return _roster_rule(self.roster, self.min_group)

    def learnt_group_rule(self, federation: frozenset[bytes]) -> GroupRule | None:
        """The groups of a federation learnt on first use (no roster pinned)."""
        if not self.min_group or self.roster is not None or not federation:
            return None
        return _group_rule(federation, self.min_group)


@lru_cache(maxsize=8)
def _roster_rule(roster: Roster, min_group: int) -> GroupRule:
    """The pinned roster's rule (its epochs), computed once per roster and group size."""
    return GroupRule.of(roster, min_group)


@lru_cache(maxsize=8)
def _group_rule(roster: frozenset[bytes], min_group: int) -> GroupRule:
    """One rule (and its partition, computed once) per roster and group size: every
    message of every round asks for it."""
    return GroupRule(roster, min_group)


def parse_node_config_text(text: str) -> dict[str, str]:
    """``key=value key2="value 2"`` (the syntax of ``flower-supernode --node-config``)."""
    out: dict[str, str] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigurationError(f"{ENV_VAR}: expected key=value, got {item!r}")
        out[key.strip()] = value
    return out


def site_policy(node_config: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> ClientPolicy:
    """The site's policy: its node config, over the ``SGS_NODE_CONFIG`` environment
    variable of the SuperNode's process (Flower simulations cannot set node config;
    the environment of the process that runs the ClientApp is the site's too)."""
    env = os.environ if environ is None else environ
    merged: dict[str, Any] = parse_node_config_text(env.get(ENV_VAR, ""))
    merged.update(node_config)
    return ClientPolicy.from_node_config(merged)
