"""The app's run configuration: pyproject defaults, presets and overrides."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from sgs_flower.app.settings import DEFAULTS, available_presets, load_preset, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_config_is_the_documented_defaults():
    with (ROOT / "pyproject.toml").open("rb") as f:
        cfg = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert cfg == DEFAULTS
    readme = (ROOT / "README.md").read_text()
    for key in DEFAULTS:
        assert f"| `{key}` |" in readme, f"README does not document run-config key {key}"


def test_presets_exist_and_only_set_known_keys():
    assert set(available_presets()) >= {"plain", "secagg", "central-dp", "distributed-dp", "sample-dp"}
    for name in available_presets():
        load_preset(name)


def test_preset_then_explicit_overrides():
    s = resolve({**DEFAULTS, "preset": "central-dp"})
    assert s["dp-mode"] == "central" and s["secure-aggregation"] is True
    s = resolve({**DEFAULTS, "preset": "central-dp", "noise-multiplier": 3.0})
    assert s["noise-multiplier"] == 3.0
    assert s["target-epsilon"] == 0.0  # an explicit noise multiplier beats the preset's target
    assert resolve({**DEFAULTS, "preset": "central-dp"})["target-epsilon"] == 8.0
    assert resolve({**DEFAULTS, "preset": "plain"})["secure-aggregation"] is False


def test_bad_configs_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        resolve({**DEFAULTS, "preset": "nope"})
    with pytest.raises(ValueError, match=r"unknown run-config keys \['typo'\]"):
        resolve({**DEFAULTS, "typo": 1})
    with pytest.raises(ValueError, match="'server-optimizer' = 'krum': must be one of"):
        resolve({**DEFAULTS, "server-optimizer": "krum"})
    with pytest.raises(ValueError, match="central and distributed DP run on top of secure aggregation"):
        resolve({**DEFAULTS, "preset": "plain", "dp-mode": "central"})
