"""The app's run configuration: defaults, presets (threat models) and validation.

Every knob is a key of ``[tool.flwr.app.config]`` (a test keeps pyproject.toml equal to
:data:`DEFAULTS`). ``preset`` names a file in ``configs/`` whose keys replace the
defaults; a key given with ``flwr run --run-config`` replaces the preset's value. (Flower
hands the app defaults and overrides already merged, so an override is recognised by
differing from the default: setting a key explicitly to its default value does not undo
a preset.) An explicit ``noise-multiplier`` replaces a preset's ``target-epsilon``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgs_flower.secagg.graph import CONSISTENCY_MODES

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"

DEFAULTS: dict[str, Any] = {
    "preset": "secagg",
    "num-server-rounds": 10,
    "model": "cnn",
    "fraction-train": 1.0,
    "min-nodes": 3,
    "local-epochs": 2,
    "lr": 0.05,
    "batch-size": 16,
    "client-momentum": 0.9,
    "partitioning": "iid",
    "dirichlet-alpha": 0.5,
    "seed": 0,
    "server-optimizer": "fedavg",
    "server-lr": 0.01,
    "server-momentum": 0.9,
    "tail-rounds": 1,
    "proximal-mu": 0.01,
    "secure-aggregation": True,
    "confidential": False,
    "consistency": "global",
    "min-group": 3,
    "roster": "",
    "validate": "",
    "validation-norm": 0.0,
    "clip-range": 1.0,
    "field-bits": 0,
    "max-weight": 1_000_000,
    "min-clients": 0,
    "stage-timeout": 600.0,
    "dp-mode": "none",
    "clip-norm": 1.0,
    "noise-multiplier": 1.0,
    "target-epsilon": 0.0,
    "max-epsilon": 0.0,
    "delta": 1e-5,
    "min-survivors": 0,
    "grad-sample-mode": "ghost",
    "ledger": "",
    "results-file": "",
    "model-file": "",
}

OPTIMIZERS = ("fedavg", "fedadam", "fedadagrad", "fedyogi", "fedavgm", "fedprox")
DP_MODES = ("none", "central", "distributed", "sample")
MODELS = ("cnn", "logreg", "mlp")  # sgs_flower.digits.MODELS (not imported: keep this module torch-free)
GRAD_SAMPLE_MODES = ("hooks", "ghost")


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    path = CONFIGS_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; choose one of {available_presets()} (files in {CONFIGS_DIR})")
    with path.open("rb") as f:
        values = tomllib.load(f)
    unknown = set(values) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"preset {name!r} sets unknown keys {sorted(unknown)}")
    return values


@dataclass(frozen=True)
class Settings:
    values: dict[str, Any]
    explicit: frozenset[str] = frozenset()  # keys the user set (they differ from the default)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def resolve(run_config: dict[str, Any]) -> Settings:
    """Defaults, then the preset, then every run-config value that differs from its default."""
    unknown = set(run_config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown run-config keys {sorted(unknown)}; known keys: {sorted(DEFAULTS)}")
    preset = str(run_config.get("preset", DEFAULTS["preset"]))
    values = dict(DEFAULTS)
    values.update(load_preset(preset))
    explicit = {k: v for k, v in run_config.items() if v != DEFAULTS[k]}
    values.update(explicit)
    values["preset"] = preset
    if "noise-multiplier" in explicit and "target-epsilon" not in explicit:
        values["target-epsilon"] = 0.0  # an explicit noise multiplier beats a preset's target
    _validate(values)
    return Settings(values, frozenset(explicit))


def _validate(v: dict[str, Any]) -> None:
    def bad(key: str, why: str) -> ValueError:
        return ValueError(f"run-config '{key}' = {v[key]!r}: {why}")

    if v["server-optimizer"] not in OPTIMIZERS:
        raise bad("server-optimizer", f"must be one of {OPTIMIZERS}")
    if v["dp-mode"] not in DP_MODES:
        raise bad("dp-mode", f"must be one of {DP_MODES}")
    if v["model"] not in MODELS:
        raise bad("model", f"must be one of {MODELS}")
    if v["grad-sample-mode"] not in GRAD_SAMPLE_MODES:
        raise bad("grad-sample-mode", f"must be one of {GRAD_SAMPLE_MODES}")
    if int(v["tail-rounds"]) < 1:
        raise bad("tail-rounds", "must be >= 1 (1: release the last global model)")
    for key in ("server-momentum", "client-momentum"):
        if not 0 <= float(v[key]) < 1:
            raise bad(key, "must be in [0, 1)")
    if v["partitioning"] not in ("iid", "dirichlet"):
        raise bad("partitioning", "must be 'iid' or 'dirichlet'")
    for key in ("num-server-rounds", "local-epochs", "batch-size", "min-nodes"):
        if int(v[key]) < 1:
            raise bad(key, "must be >= 1")
    if not 0 < float(v["fraction-train"]) <= 1:
        raise bad("fraction-train", "must be in (0, 1]")
    if v["consistency"] not in CONSISTENCY_MODES:
        raise bad("consistency", f"must be one of {CONSISTENCY_MODES} ('neighbourhood': the quorum per "
                  "neighbourhood for large cohorts; the sites must opt in with sgs-consistency=neighbourhood)")
    if int(v["min-group"]) == 1 or int(v["min-group"]) < 0:
        raise bad("min-group", "must be 0 (off) or at least 2: every sum is over whole groups of at least this many "
                  "sites, so two sums never differ by one site (the sites' sgs-min-group must match)")
    if v["roster"] and not Path(str(v["roster"])).expanduser().is_file():
        raise bad("roster", f"names no file: {v['roster']!r} (the federation's roster of identity keys, the file "
                  "the sites pin with sgs-roster; empty: the groups are learnt at the first round)")
    if v["validate"] not in ("", "none", "l2"):
        raise bad("validate", "must be '' or 'none' (off; 'none' also turns off a preset's validation) or 'l2' (every "
                  "site proves its update's L2 norm: the DP clip norm, or validation-norm outside DP); 'linf' is not "
                  "offered (docs/validation.md)")
    if v["validate"] == "none":
        v["validate"] = ""
    if v["validate"] and not v["secure-aggregation"]:
        raise bad("validate", "input validation proves bounds under secure aggregation: set secure-aggregation=true")
    dp_bound = v["dp-mode"] in ("central", "distributed")
    if v["validate"] and not dp_bound and not float(v["validation-norm"]) > 0:
        raise bad("validate", "outside central or distributed DP the validated bound is validation-norm (the L2 norm "
                  "honest sites clip their update to): set it > 0")
    if float(v["validation-norm"]) and (dp_bound or not v["validate"]):
        raise bad("validation-norm", "is the bound of validate='l2' outside DP (under DP the clip norm is the bound)")
    if v["validate"] and v["confidential"]:
        raise bad("validate", "input validation is not available in the model-confidential mode")
    if v["confidential"]:
        if not v["secure-aggregation"] or v["dp-mode"] != "none":
            raise bad("confidential", "the model-confidential mode runs on secure aggregation without DP: set "
                      "secure-aggregation=true and dp-mode='none'")
        if v["server-optimizer"] not in ("fedavg", "fedprox"):
            raise bad("confidential", "the server holds only the masked model and can only apply FedAvg's rule: "
                      "set server-optimizer to 'fedavg' or 'fedprox'")
    if v["dp-mode"] in ("central", "distributed") and not v["secure-aggregation"]:
        raise bad("dp-mode", "central and distributed DP run on top of secure aggregation; set secure-aggregation=true")
