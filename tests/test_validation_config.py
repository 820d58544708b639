"""Input validation's configuration (issue 31): impossible settings get a typed error
that says what to do, on the server (``SecAggConfig``, ``SecAggStrategy``) and on the
site (a spec that asks for clipping without validating anyone)."""

from __future__ import annotations

import pytest
from flwr.serverapp.strategy import FedAvg

from sgs_flower.dp.config import DPConfig
from sgs_flower.pipeline import UpdateSpec, validation_layout
from sgs_flower.secagg.errors import InconsistentRequestError
from strategies import SecAggConfig, SecAggStrategy


@pytest.mark.parametrize(("kw", "match"), [
    ({"validate": "linf"}, "'linf' is not offered: the proof checks L2 norms"),
    ({"validate": "l3"}, "must be None or 'l2'"),
    ({"validation_norm": 1.0}, "validation_norm: is the norm bound of validate='l2' outside DP"),
    ({"validate": "l2", "validation_norm": -1.0}, "must be a positive finite L2 norm"),
    ({"validate": "l2", "field_bits": 48}, "at most 40 bits"),
    ({"validate": "l2", "weight_scale": 64, "max_weight": 1024}, "its weight scale is max_weight"),
    ({"validate": "l2", "validation_soundness_bits": 20}, "sites refuse less than 40"),
])
def test_impossible_validation_configs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        SecAggConfig(**kw)


def test_the_strategy_names_the_bound_validation_needs():
    dp = DPConfig(mode="distributed-dp", clip_norm=1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match=r"without central or distributed DP .* set SecAggConfig.validation_norm"):
        SecAggStrategy(FedAvg(), SecAggConfig(validate="l2"))
    with pytest.raises(ValueError, match="under DP the clip norm is the validated bound"):
        SecAggStrategy(FedAvg(), SecAggConfig(validate="l2", validation_norm=1.0), dp=dp)
    with pytest.raises(ValueError, match="not available in the model-confidential mode"):
        SecAggStrategy(FedAvg(), SecAggConfig(validate="l2", validation_norm=1.0, confidential=True))
    assert SecAggStrategy(FedAvg(), SecAggConfig(validate="l2"), dp=dp).config.validate == "l2"


def test_a_site_refuses_to_clip_to_a_norm_no_one_validates():
    """A server that sets l2_clip outside DP without validation would only shrink honest
    updates: the site refuses such a spec before training."""
    spec = UpdateSpec(clip_range=1.0, max_cohort=4, max_weight=1, field_bits=24, l2_clip=0.5)
    with pytest.raises(InconsistentRequestError, match=r"clip its update to an L2 norm .* without validating"):
        validation_layout(spec, 100)
