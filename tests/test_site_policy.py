"""The site's own policy and identity: node-config parsing, the environment fallback,
identity key files, the roster file and the CLI that makes them."""

from __future__ import annotations

import os
import stat

import pytest

from sgs_flower.cli import main
from sgs_flower.dp.site import DPContribution, SiteAccountant, SiteBudgetError, SiteState
from sgs_flower.pipeline import UpdateSpec
from sgs_flower.secagg import identity
from sgs_flower.secagg.errors import ConfigurationError, PolicyError
from sgs_flower.secagg.groups import DEFAULT_MIN_GROUP
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.policy import ClientPolicy, parse_node_config_text, site_policy


def test_identity_cli_writes_a_private_key_file_and_a_roster_line(tmp_path, capsys):
    key = tmp_path / "site.key"
    assert main(["identity", "new", str(key)]) == 0
    public = capsys.readouterr().out.strip()
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert identity.identity_public(identity.read_identity(key)).hex() == public
    assert main(["identity", "public", str(key), "--name", "hospital-a"]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"{public} hospital-a"
    assert main(["identity", "new", str(key)]) == 2  # never overwrites a site's identity
    assert "refusing to overwrite" in capsys.readouterr().err
    roster = Roster.parse(f"# federation\n{line}\n")
    assert bytes.fromhex(public) in roster


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "lists no identity keys"),
        ("zz", "not a hex public key"),
        ("abcd", "32 bytes"),
        ("00" * 32 + "\n" + "00" * 32, "key listed twice"),
    ],
)
def test_bad_roster_files_are_refused(text, why):
    with pytest.raises(ConfigurationError, match=why):
        Roster.parse(text)


def test_policy_reads_node_config_over_the_environment(tmp_path):
    key = tmp_path / "k"
    identity.write_identity(key)
    env = {"SGS_NODE_CONFIG": 'sgs-min-cohort=5 sgs-require-secagg=false sgs-dp-min-noise="1.5"'}
    p = site_policy({"sgs-min-cohort": 7, "sgs-identity-key": str(key)}, env)
    assert p.min_cohort == 7  # the node config wins
    assert p.require_secure_aggregation is False
    assert p.dp_min_noise_multiplier == 1.5
    assert p.identity_key == identity.read_identity(key)
    # a site's default policy has whole-group participation on (the library's bare
    # ClientPolicy() leaves groups to its caller, who must give the server the same rule)
    assert site_policy({}, {}) == ClientPolicy(min_group=DEFAULT_MIN_GROUP)
    assert parse_node_config_text('a=1 b="x y"') == {"a": "1", "b": "x y"}


@pytest.mark.parametrize(
    ("config", "why"),
    [
        ({"sgs-min-cohort": 2}, "sgs-min-cohort must be >= 3"),
        ({"sgs-require-secagg": "maybe"}, "sgs-require-secagg"),
        ({"sgs-dp-min-noise": -1.0}, "sgs-dp-min-noise"),
        ({"sgs-max-cohort": 2, "sgs-min-cohort": 3}, "below sgs-min-cohort"),
    ],
)
def test_impossible_site_policies_are_refused(config, why):
    with pytest.raises(ConfigurationError, match=why):
        ClientPolicy.from_node_config(config)


def test_policy_minimum_degree_follows_the_cohort_size():
    p = ClientPolicy()
    p.check_round(100, 20, 14, 10)  # the protocol defaults pass
    with pytest.raises(PolicyError, match="degree 18 is below this site's minimum"):
        p.check_round(100, 18, 13, 10)


def test_site_noise_multiplier_matches_the_server_calibration():
    """The client's reading of an honest spec's noise is the server's calibration
    inverted, less the stochastic rounding's sqrt(d) that the site counts too."""
    import math

    from sgs_flower.dp.aggregator import ddp_quantization

    q = ddp_quantization(noise_multiplier=1.7, clip_norm=1.0, cohort=20, min_survivors=15, field_bits=32)
    spec = UpdateSpec(clip_range=1.0, max_cohort=20, max_weight=1, field_bits=32, dp_mode="distributed",
                      l2_clip=1.0, noise_mu_share=q.mu_share, bits_per_coordinate=q.bits_per_coordinate,
                      noise_headroom=q.noise_headroom, min_survivors=15)
    c = spec.dp_contribution(100)
    assert c.levels == q.levels and c.dim == 101  # 100 coordinates and the flag
    assert c.noise_multiplier == pytest.approx(1.7 * q.levels / (q.levels + math.sqrt(101)), rel=1e-9)


def _contribution(mu: float, levels: int = (1 << 15) - 1) -> DPContribution:
    return DPContribution(levels=levels, clip_range=1.0, l2_clip=1.0, dim=100, mu_share=mu, min_survivors=10, cohort=10)


def test_site_accountant_matches_a_direct_dp_accounting_reference():
    """Independent reference: dp-accounting's RDP accountant on the same Skellam
    event composed twice gives the epsilon the site records."""
    from sgs_flower.dp.accounting import make_accountant
    from sgs_flower.dp.events import event_from_dict

    acct = SiteAccountant(min_noise_multiplier=0.5, max_epsilon=0.0, delta=1e-5)
    levels = (1 << 15) - 1
    mu = (3.0 * levels) ** 2 / (2 * 10)
    eps1 = acct.admit(_contribution(mu))
    eps2 = acct.admit(_contribution(mu))
    assert eps2 > eps1 > 0
    ref = make_accountant("rdp")
    for e in acct.events:
        ref.compose(event_from_dict(e))
    assert eps2 == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    with pytest.raises(SiteBudgetError, match="noise floor"):
        acct.admit(_contribution(mu / 100))  # noise multiplier 0.3 < 0.5
    assert len(acct.events) == 2


def test_site_state_file_round_trips_and_refuses_unknown_formats(tmp_path):
    s = SiteState({"ab": "cd"}, [{"kind": "x"}])
    s.save(tmp_path / "s.json")
    assert SiteState.load(tmp_path / "s.json") == s
    fresh = SiteState.load(tmp_path / "missing.json")
    assert (fresh.history, fresh.dp_events, fresh.models) == ({}, [], [])
    assert len(bytes.fromhex(fresh.sketch_key)) == 32 and fresh.sketch_key != s.sketch_key
    (tmp_path / "bad.json").write_text('{"version": 9}')
    with pytest.raises(ValueError, match="unknown format"):
        SiteState.load(tmp_path / "bad.json")
