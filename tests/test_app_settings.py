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
    with pytest.raises(ValueError, match=r"'consistency' = 'sparse': must be one of .*sgs-consistency=neighbourhood"):
        resolve({**DEFAULTS, "consistency": "sparse"})


def test_the_consistency_key_reaches_the_strategy():
    """run-config ``consistency`` is the strategy's quorum (the sites still opt in)."""
    from flwr.app import ArrayRecord

    from sgs_flower.app.server_app import make_strategy

    for mode in ("global", "neighbourhood"):
        st = make_strategy(resolve({**DEFAULTS, "consistency": mode}), ArrayRecord())
        assert st.config.consistency == mode  # type: ignore[attr-defined]


def test_tail_average_is_the_mean_of_the_last_k_models():
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from sgs_flower.app.server_app import TailAverage

    tail = TailAverage(2)
    for r, v in enumerate([1.0, 2.0, 4.0], start=1):
        tail.add(r, ArrayRecord({"w": Array(np.full((2, 3), v, dtype=np.float32))}))
    like = ArrayRecord({"w": Array(np.zeros((2, 3), dtype=np.float32))})
    mean = tail.mean(like)["w"].numpy()
    assert tail.rounds() == [2, 3]
    assert mean.dtype == np.float32 and np.allclose(mean, 3.0)


def test_models_and_partitions_for_large_federations():
    from sgs_flower.digits import load_partition, make_model, train_test_split

    sizes = {name: sum(p.numel() for p in make_model(name).parameters()) for name in ("cnn", "mlp", "logreg")}
    assert sizes["logreg"] == 650 and sizes["logreg"] < sizes["mlp"] < sizes["cnn"]
    train, _ = train_test_split()
    for n in (100, 128, 200):
        parts = [load_partition(i, n) for i in range(n)]
        assert sum(len(p) for p in parts) == len(train)
        assert min(len(p) for p in parts) == len(train) // n  # 14 images each at 100 nodes, some 15
    skewed = [load_partition(i, 100, "dirichlet", 0.5) for i in range(100)]
    assert sum(len(p) for p in skewed) == len(train) and min(len(p) for p in skewed) >= 1
    with pytest.raises(ValueError, match="model must be one of"):
        make_model("resnet")
    with pytest.raises(ValueError, match="'model' = 'resnet'"):
        resolve({**DEFAULTS, "model": "resnet"})


def test_pyproject_keeps_the_federation_the_readme_command_needs():
    """``flwr run .`` (flwr >= 1.41) migrates ``[tool.flwr.federations]`` into
    ``$FLWR_HOME/config.toml`` and comments the section out *in the checkout*. Committed
    in that state, a fresh machine's first run gets Flower's 2-SuperNode default and the
    secure run refuses to start. This catches the rewritten file before it is committed."""
    import tomllib
    from pathlib import Path

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    fed = data["tool"]["flwr"]["federations"]
    assert fed["default"] == "local-simulation"
    assert fed["local-simulation"]["options"]["num-supernodes"] == 10


def test_results_runs_keep_the_pyprojects_client_resources():
    """``flwr run --federation-config`` replaces the federation's options as a whole: with
    ``num-supernodes=N`` alone Flower falls back to 2 CPUs per ClientApp, one Ray actor on
    a 2-core machine (the DP table once ran so). The runs of scripts/app_results.py pass
    the pyproject's ``num-cpus`` along; here parsed the way ``flwr run`` parses it."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import parse_config_args
    from flwr.supercore.utils import simulation_config_from_json

    from sgs_flower.app.results import federation_config

    data = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    cpus = data["tool"]["flwr"]["federations"]["local-simulation"]["options"]["backend"]["client-resources"]["num-cpus"]
    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([federation_config(100)]).items()}
    sim = simulation_config_from_json(parsed)
    assert sim.num_supernodes == 100
    assert sim.client_resources_num_cpus == cpus == 1


def _row(preset: str, seconds: list[float]) -> dict[str, object]:
    return {"preset": preset, "supernodes": 10, "rounds": 10, "accuracy": 0.9, "last_round_accuracy": 0.9,
            "epsilon_consumer": None, "epsilon_server": None, "delta": None, "seconds": 20.0,
            "round_seconds": sum(seconds) / len(seconds), "round_seconds_runs": seconds}


def test_the_benchmark_line_gives_the_mean_ratio_and_each_runs_range():
    from sgs_flower.app.results import run_all, table_lines

    rows = {"plain-10": _row("plain", [0.14, 0.20]), "sample-dp-10": _row("sample-dp", [0.42, 0.40])}
    line = [x for x in table_lines(rows) if x.startswith("benchmark")]
    assert line == ["benchmark: sample-dp round 0.41 s = 2.41x the plain-10 round (0.17 s), same configuration; "
                    "means of 2 interleaved runs, per-run ratios 2.00-3.00x"]
    with pytest.raises(ValueError, match="repeat must be >= 1, got 0"):
        run_all(["plain-10"], 10, None, None, repeat=0)


def test_the_validate_key_reaches_the_strategy_and_the_dp_presets_turn_it_on():
    """run-config ``validate`` (issue 31): on in the central-dp and distributed-dp presets
    (the clip norm is the bound), off elsewhere; ``"none"`` turns a preset's off (a value
    equal to the default would not override a preset); outside DP it needs
    ``validation-norm``; ``"linf"`` is refused with the reason."""
    from flwr.app import ArrayRecord

    from sgs_flower.app.server_app import make_strategy

    assert [resolve({**DEFAULTS, "preset": p})["validate"] for p in ("central-dp", "distributed-dp")] == ["l2", "l2"]
    assert [resolve({**DEFAULTS, "preset": p})["validate"] for p in ("secagg", "sample-dp", "plain")] == [""] * 3
    assert resolve({**DEFAULTS, "preset": "distributed-dp", "validate": "none"})["validate"] == ""
    st = make_strategy(resolve({**DEFAULTS, "preset": "distributed-dp"}), ArrayRecord())
    assert st.config.validate == "l2" and st.config.validation_norm is None  # type: ignore[attr-defined]
    st = make_strategy(resolve({**DEFAULTS, "validate": "l2", "validation-norm": 2.0}), ArrayRecord())
    assert st.config.validate == "l2" and st.config.validation_norm == 2.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"'validate' = 'linf': .*'linf' is not offered"):
        resolve({**DEFAULTS, "validate": "linf"})
    with pytest.raises(ValueError, match="outside central or distributed DP the validated bound is validation-norm"):
        resolve({**DEFAULTS, "validate": "l2"})
    with pytest.raises(ValueError, match=r"'validation-norm' = 1.0: is the bound of validate='l2' outside DP"):
        resolve({**DEFAULTS, "preset": "distributed-dp", "validation-norm": 1.0})
