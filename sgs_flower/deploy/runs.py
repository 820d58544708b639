"""Run bookkeeping: stage the app, fill in output paths, read back what a run left.

``LocalDeployment.run`` is a thin loop around these pieces; they are plain functions of
the app directory, the run config and the work directory so they can be tested without
starting Flower.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgs_flower.deploy.base import DeploymentError

# Run-config keys that `LocalDeployment.run` fills in when the app declares them:
OUTPUT_DIR_KEY = "output-dir"  # the ServerApp writes result.json here (tiny test app)
LEDGER_PATH_KEY = "ledger-path"  # privacy ledger, shared by all runs of one deployment
# ... and the keys of the sgs-flower app itself (sgs_flower/app/settings.py):
RESULTS_FILE_KEY = "results-file"  # absolute path of the results JSON (+ `<stem>.npz` model)
LEDGER_KEY = "ledger"  # absolute path of the privacy ledger (DP modes central/distributed)
DP_MODE_KEY = "dp-mode"
PRESET_KEY = "preset"
LEDGER_DP_MODES = {"central", "distributed"}  # the modes that write a ledger

# File types Flower puts into a FAB (flwr/common/constant.py FAB_INCLUDE_PATTERNS) plus
# the files the build needs; everything else is not copied when staging the app.
_APP_SUFFIXES = {".py", ".toml", ".md", ".yaml", ".yml", ".json", ".jsonl"}
_APP_EXTRA_FILES = {"LICENSE", ".gitignore"}
_APP_SKIP_DIRS = {
    ".venv",
    "venv",
    "env",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "build",
    "dist",
    "node_modules",
    ".flwr",
    ".flwr-home",
    "outputs",
    "tests",
}


@dataclass
class RunResult:
    """Outcome of :meth:`LocalDeployment.run`."""

    run_id: int | None
    status: str | None  # e.g. "finished:completed", "finished:failed"
    returncode: int  # of `flwr run`
    duration_s: float
    stdout: str
    output_dir: Path | None  # the app's `output-dir` (if it declares that key)
    result: dict[str, Any] | None  # output_dir/result.json if present
    run_info: dict[str, Any] | None  # the `flwr ls --run-id` JSON entry
    ledger_path: Path | None = None  # the app's `ledger` / `ledger-path` (if it declares one)
    results_file: Path | None = None  # the app's `results-file` (if it declares that key)
    run_config: dict[str, Any] = field(default_factory=dict)  # what was passed to `flwr run`

    @property
    def ok(self) -> bool:
        """The run reached ``finished:completed``."""
        return bool(self.status) and "completed" in str(self.status)

    @property
    def model_file(self) -> Path | None:
        """The final global model the sgs-flower ServerApp saves beside ``results-file``."""
        if self.results_file is None:
            return None
        path = self.results_file.with_suffix(".npz")
        return path if path.exists() else None


@dataclass
class RunPaths:
    """Where one run's outputs go; the run config that points the app there."""

    config: dict[str, Any]
    output_dir: Path | None = None
    results_file: Path | None = None
    ledger: Path | None = None


def stage_app(src_dir: str | os.PathLike[str], dst: Path, skip: set[Path]) -> Path:
    """Copy the app's FAB-relevant files from ``src_dir`` to ``dst`` (replaced).

    ``flwr run`` migrates a legacy ``[tool.flwr.federations]`` section by rewriting
    the app's pyproject.toml; running on a copy keeps the source tree untouched.
    ``skip`` holds resolved directories never to copy (the deployment's workdir).
    """
    src = Path(src_dir).expanduser().resolve()
    if not (src / "pyproject.toml").exists():
        raise DeploymentError(f"{src} has no pyproject.toml")
    if dst.exists():
        shutil.rmtree(dst)
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = [
            d
            for d in dirs
            if d not in _APP_SKIP_DIRS
            and not d.endswith(".egg-info")
            and (rootp / d).resolve() not in skip
        ]
        for f in files:
            if Path(f).suffix in _APP_SUFFIXES or f in _APP_EXTRA_FILES:
                target = dst / rootp.relative_to(src) / f
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(rootp / f, target)
    return dst


def prepare_run(
    staged: Path, run_config: Mapping[str, Any] | None, workdir: Path, run_index: int
) -> RunPaths:
    """Fill in the output keys the app declares (see ``LocalDeployment.run``).

    Raises :class:`DeploymentError` for a run-config key the app does not declare, so
    a typo fails before anything is submitted.
    """
    app_cfg = app_config(staged)
    cfg = dict(run_config or {})
    paths = RunPaths(config=cfg)
    run_dir = workdir / "runs" / f"run-{run_index}"
    if OUTPUT_DIR_KEY in app_cfg:
        out_dir = Path(cfg.get(OUTPUT_DIR_KEY) or run_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg[OUTPUT_DIR_KEY] = str(out_dir)
        paths.output_dir = out_dir
    if RESULTS_FILE_KEY in app_cfg:
        results_file = Path(cfg.get(RESULTS_FILE_KEY) or run_dir / "results.json")
        if not results_file.is_absolute():
            results_file = workdir / results_file
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.unlink(missing_ok=True)
        results_file.with_suffix(".npz").unlink(missing_ok=True)
        cfg[RESULTS_FILE_KEY] = str(results_file)
        paths.results_file = results_file
    if LEDGER_PATH_KEY in app_cfg:
        # one ledger per deployment: a second run resumes the spent budget
        paths.ledger = Path(cfg.get(LEDGER_PATH_KEY) or workdir / "ledger.jsonl")
        cfg[LEDGER_PATH_KEY] = str(paths.ledger)
    if LEDGER_KEY in app_cfg:
        given = cfg.get(LEDGER_KEY) or effective_value(staged, app_cfg, cfg, LEDGER_KEY)
        if effective_value(staged, app_cfg, cfg, DP_MODE_KEY) in LEDGER_DP_MODES:
            ledger = Path(given or workdir / "ledger.jsonl")
            if not ledger.is_absolute():
                ledger = workdir / ledger
            cfg[LEDGER_KEY] = str(ledger)
            paths.ledger = ledger
        elif cfg.get(LEDGER_KEY):
            paths.ledger = Path(cfg[LEDGER_KEY])
    unknown = sorted(set(cfg) - set(app_cfg))
    if unknown:
        raise DeploymentError(f"run_config keys not in [tool.flwr.app.config]: {unknown}")
    return paths


def read_result(paths: RunPaths) -> dict[str, Any] | None:
    """The JSON the app left: ``results-file`` if present, else ``output-dir/result.json``."""
    result = None
    if paths.output_dir is not None and (paths.output_dir / "result.json").exists():
        result = json.loads((paths.output_dir / "result.json").read_text())
    if paths.results_file is not None and paths.results_file.exists():
        result = json.loads(paths.results_file.read_text())
    return result


def toml_value(v: Any) -> str:
    """One run-config / node-config value as TOML (what ``--run-config`` parses)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a TOML basic string is JSON-compatible for our values


def config_string(cfg: Mapping[str, Any]) -> str:
    """``k=v`` pairs separated by spaces, as ``--run-config``/``--node-config`` take them."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in cfg.items())


def app_config(app_dir: Path) -> dict[str, Any]:
    """The app's ``[tool.flwr.app.config]``, nested tables flattened to dotted keys."""
    with open(app_dir / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)
    cfg = data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    flat: dict[str, Any] = {}

    def _flatten(prefix: str, d: Mapping[str, Any]) -> None:
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else k
            if isinstance(v, Mapping):
                _flatten(key, v)
            else:
                flat[key] = v

    _flatten("", cfg)
    return flat


def effective_value(
    app_dir: Path, app_cfg: Mapping[str, Any], cfg: Mapping[str, Any], key: str
) -> Any:
    """What the sgs-flower app will use for ``key``: the run config if it differs from
    the default, else the preset (``configs/<preset>.toml``), else the default (this
    mirrors ``sgs_flower.app.settings.resolve``)."""
    default = app_cfg.get(key)
    if key in cfg and cfg[key] != default:
        return cfg[key]
    preset = cfg.get(PRESET_KEY, app_cfg.get(PRESET_KEY))
    if preset:
        path = app_dir / "configs" / f"{preset}.toml"
        if path.is_file():
            with path.open("rb") as f:
                values = tomllib.load(f)
            if key in values:
                return values[key]
    return default


def parse_run_id(text: str) -> int | None:
    """The run id in ``flwr run`` output (text or JSON format)."""
    m = re.search(r"Successfully started run (\d+)", text)
    if m:
        return int(m.group(1))
    m = re.search(r'"run-id"\s*:\s*"?(\d+)', text)
    return int(m.group(1)) if m else None


def status_of(info: Mapping[str, Any] | None) -> str | None:
    """``status`` of a ``flwr ls`` row, e.g. ``finished:completed``."""
    if not info:
        return None
    return str(info.get("status")) if info.get("status") is not None else None


def verify_ledger(path: str | os.PathLike[str]) -> tuple[bool, str]:
    """``sgs-flower ledger verify`` in-process (chain and replayed epsilons): (ok, summary)."""
    from sgs_flower.dp.ledger_accounting import verify

    res = verify(Path(path))
    return bool(res.ok), str(res.summary())
