"""Run the Flower App with ``flwr run`` for each preset and tabulate what came out.

The library of ``scripts/app_results.py`` (the driver: flags, table, JSON line). This
is how the README's results tables are made: a copy of the app in a temporary folder
(``flwr run`` rewrites a legacy ``[tool.flwr.federations]`` section of the app's
pyproject.toml, so the checkout is never touched), ``FLWR_HOME`` pointing into that
folder, one managed local simulation SuperLink for all runs, and every process that
``flwr run`` left behind (the detached SuperLink) stopped at the end, also on failure.

Runs (comma-separated labels, :func:`spec_for`; default :data:`DP_RUNS`, the DP
results table):

* ``plain-100``, ``central-dp-100``, ``distributed-dp-100``: 100 SuperNodes; the plain
  run uses the DP presets' training keys (model, rounds, local training, tail) with
  plain FedAvg, so it is the same configuration without protection;
* ``plain-10``, ``secagg-10``, ``sample-dp-10``: 10 SuperNodes with the sample-dp
  preset's training keys; the sample-dp round is compared with the plain and secagg
  rounds of that configuration (the benchmark line);
* ``plain``, ``secagg``, ``central-dp``, ``distributed-dp``, ``sample-dp``: a preset as
  it is, on ``supernodes`` SuperNodes (the app table of the README).

For every run it writes ``<label>.json`` (results), ``<label>.log``, the DP ledger (and
verifies it), the released model (``.npz``) and ``<label>.png``: held-out accuracy and
epsilon (consumers and server) per round, read from the results file and the ledger.

App layer: it reads the presets (:mod:`sgs_flower.app.settings`). Flower itself only
runs as the ``flwr`` subprocess; the process, port, run-config and ledger helpers are
those of the local deployment (:mod:`sgs_flower.deploy`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sgs_flower.app.settings import load_preset
from sgs_flower.deploy.base import MARKER_ENV, free_port
from sgs_flower.deploy.flower import flower_bin
from sgs_flower.deploy.processes import kill_tree
from sgs_flower.deploy.runs import config_string, verify_ledger

ROOT = Path(__file__).resolve().parents[2]
APP_PARTS = ["pyproject.toml", "README.md", "sgs_flower", "strategies", "clients", "configs"]


def copy_app(dst: Path) -> Path:
    app = dst / "app"
    app.mkdir(parents=True)
    for part in APP_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, app / part)
    return app


#: the training keys a "same configuration" baseline copies from a DP preset
TRAINING_KEYS = ("model", "num-server-rounds", "local-epochs", "lr", "batch-size", "client-momentum", "tail-rounds")
DP_RUNS = "plain-100,central-dp-100,distributed-dp-100,plain-10,secagg-10,sample-dp-10"


@dataclass(frozen=True)
class RunSpec:
    label: str
    preset: str
    supernodes: int
    overrides: dict[str, Any] = field(default_factory=dict)


def training_of(preset: str) -> dict[str, Any]:
    values = load_preset(preset)
    return {k: values[k] for k in TRAINING_KEYS if k in values}


def spec_for(label: str, supernodes: int) -> RunSpec:
    """The run named ``label`` (see the module docstring)."""
    if label.endswith("-100") or label.endswith("-10"):
        name, nodes = label.rsplit("-", 1)
        if name in ("central-dp", "distributed-dp", "sample-dp"):
            return RunSpec(label, name, int(nodes))
        base = "sample-dp" if nodes == "10" else "distributed-dp"
        return RunSpec(label, name, int(nodes), training_of(base))
    return RunSpec(label, label, supernodes)


def superlink_ports(home: Path) -> dict[str, str]:
    """Ports of OUR managed SuperLink, chosen once per FLWR_HOME.

    ``flwr run`` starts its local SuperLink on fixed ports (39091/39093) unless told
    otherwise, and reuses whatever SuperLink answers there: on a shared machine our
    runs would land in another user's SuperLink (and die when they stop it).
    """
    ports = home / "ports.json"
    if not ports.exists():
        home.mkdir(parents=True, exist_ok=True)
        ports.write_text(json.dumps({"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                                     "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}))
    return dict(json.loads(ports.read_text()))


def plot_run(results: dict[str, Any], ledger: Path | None, out: Path, title: str) -> Path:
    """PNG of held-out accuracy and epsilon (both views) per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = sorted((int(r), float(a)) for r, a in results["accuracy"].items())
    eps_rounds: list[int] = []
    eps_c: list[float] = []
    eps_s: list[float] = []
    if ledger is not None and ledger.exists():
        for line in ledger.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "round":
                eps_rounds.append(int(rec["round"]))
                eps_c.append(float(rec["epsilon_consumer"]))
                eps_s.append(float(rec["epsilon_server"]))
    else:  # sample-DP: the clients' per-example epsilon, released as a secure mean metric
        for r, m in sorted(results.get("train_metrics", {}).items(), key=lambda kv: int(kv[0])):
            if "dp-epsilon" in m:
                eps_rounds.append(int(r))
                eps_c.append(float(m["dp-epsilon"]))
                eps_s.append(float(m["dp-epsilon"]))  # added on the client: the same against the server
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r for r, _ in acc], [a for _, a in acc], marker=".", color="green", label="held-out accuracy (global model)")
    if results.get("tail_rounds"):
        ax.scatter([results["tail_rounds"][-1]], [results["final_accuracy"]], marker="*", s=120, color="darkgreen",
                   label=f"released model (mean of {len(results['tail_rounds'])} last)", zorder=3)
    ax.set_ylim(0, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    handles, labels = ax.get_legend_handles_labels()
    if eps_rounds:
        ax2 = ax.twinx()
        ax2.plot(eps_rounds, eps_c, marker=".", label="epsilon vs model consumers")
        finite = [e if math.isfinite(e) else float("nan") for e in eps_s]
        if any(math.isfinite(e) for e in eps_s):
            ax2.plot(eps_rounds, finite, linestyle="--", label="epsilon vs server")
        else:
            ax2.text(0.01, 0.97, "epsilon vs server: infinite (central DP)", transform=ax2.transAxes, va="top")
        ax2.set_ylabel("cumulative epsilon (delta 1e-5)")
        ax2.set_ylim(0, max(max(eps_c), 1.0) * 1.1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


PLAIN_SITES = "sgs-require-secagg=false"


def flwr_env(home: Path, site_config: str = PLAIN_SITES) -> dict[str, str]:
    """The environment of our ``flwr run`` calls (and so of the SuperLink the first starts,
    whose simulated sites read ``site_config`` as their ``SGS_NODE_CONFIG``)."""
    # flwr starts flower-superlink by name: put this interpreter's venv first on PATH
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {
        **os.environ, "FLWR_HOME": str(home), "PATH": path, **superlink_ports(home),
        # The README's command: the managed SuperLink runs the app in this venv instead
        # of uv-syncing a second environment (a CUDA torch) before every run, so the
        # figures are those of the environment the README installs.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # The plain rows need sites that accept plain rounds: a site opts in through its
        # own environment (the secure rows are unaffected: their server sends protocol
        # messages).
        "SGS_NODE_CONFIG": site_config,
        # MARKER_ENV: every process flwr run starts (the detached SuperLink, its
        # helpers) inherits it, which is how stop_all finds them.
        MARKER_ENV: str(home),
    }


def federation_config(supernodes: int) -> str:
    """The ``--federation-config`` of a run on ``supernodes`` SuperNodes.

    Why the client resources are repeated here: ``flwr run --federation-config`` replaces
    the federation's options of ``pyproject.toml`` as a whole (flwr 1.41 and 1.42), so
    ``num-supernodes=N`` alone falls back to Flower's default of 2 CPUs per ClientApp:
    one Ray actor on a 2-core machine, every client run one after the other. The
    pyproject's ``client-resources.num-cpus`` is carried over, so these runs have the
    parallelism of the README's plain ``flwr run .``.
    """
    import tomllib

    fed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["federations"]["local-simulation"]
    cpus = fed["options"]["backend"]["client-resources"]["num-cpus"]
    return f"num-supernodes={supernodes} client-resources-num-cpus={cpus}"


def flwr_run(app: Path, home: Path, supernodes: int, cfg: dict[str, Any],
             timeout: float = 3600, site_config: str = PLAIN_SITES) -> tuple[subprocess.CompletedProcess[str], float]:
    """One ``flwr run <app> --stream`` on ``supernodes`` simulated SuperNodes: the
    finished process (output captured) and its wall seconds."""
    cmd = [flower_bin("flwr"), "run", str(app), "--stream", "--federation-config",
           federation_config(supernodes), "--run-config", config_string(cfg)]
    t0 = time.monotonic()
    # cwd=app: flwr (1.41) migrates a [tool.flwr.federations] section of the pyproject.toml
    # in the *working directory* into FLWR_HOME and comments it out there; run from the
    # checkout, it rewrote the checkout's own pyproject.toml.
    proc = subprocess.run(cmd, env=flwr_env(home, site_config), capture_output=True, text=True, timeout=timeout,
                          cwd=app)
    return proc, time.monotonic() - t0


def run_statuses(home: Path) -> list[dict[str, Any]]:
    """``flwr ls --format json`` of our SuperLink: each run's id, ``status`` (e.g.
    ``finished:completed``, ``finished:failed``) and ``status-details``. ``flwr run
    --stream`` returns 0 whatever the run's status (flwr 1.41), so this is where a
    failed run shows."""
    proc = subprocess.run([flower_bin("flwr"), "ls", "--format", "json"], env=flwr_env(home),
                          capture_output=True, text=True, timeout=120, cwd=home)
    return list(json.loads(proc.stdout)["runs"])


def run_once(work: Path, supernodes: int, cfg: dict[str, Any], timeout: float = 900,
             site_config: str = PLAIN_SITES) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """One ``flwr run`` of a fresh app copy under ``work`` with its own FLWR_HOME: the
    finished process and the run statuses Flower recorded (:func:`run_statuses`);
    everything it started is stopped, also on failure."""
    app, home = copy_app(work), work / "flwr-home"
    try:
        proc, _ = flwr_run(app, home, supernodes, cfg, timeout=timeout, site_config=site_config)
        return proc, run_statuses(home)
    finally:
        stop_all(home)


def run_one(app: Path, home: Path, spec: RunSpec, rounds: int | None, out_dir: Path,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    label = spec.label
    results = out_dir / f"{label}.json"
    ledger = out_dir / f"{label}-ledger.jsonl"
    for stale in (results, ledger):
        stale.unlink(missing_ok=True)
    user_dp = spec.preset in ("central-dp", "distributed-dp")
    cfg: dict[str, Any] = {"preset": spec.preset, **spec.overrides, **(extra or {}), "results-file": str(results),
                           "ledger": str(ledger) if user_dp else "", "model-file": ""}
    if rounds is not None:
        cfg["num-server-rounds"] = rounds
        cfg["tail-rounds"] = max(1, min(rounds // 2, int(load_preset(spec.preset).get("tail-rounds", 1))))
    proc, seconds = flwr_run(app, home, spec.supernodes, cfg)
    cmd = proc.args
    (out_dir / f"{label}.log").write_text(" ".join(map(str, cmd)) + "\n" + proc.stdout + proc.stderr)
    if not results.exists():
        raise RuntimeError(f"run {label}: no results (exit {proc.returncode}); see {out_dir / (label + '.log')}")
    data = json.loads(results.read_text())
    if data.get("confidential"):
        _unmask_and_evaluate(data, home)
    acc = data["accuracy"]
    secs = data["round_seconds"]
    eps = data.get("epsilon", {})
    shown = config_string({k: v for k, v in cfg.items() if k not in ("results-file", "ledger", "model-file")})
    row: dict[str, Any] = {
        "preset": spec.preset,
        "supernodes": spec.supernodes,
        "rounds": len(secs),
        "accuracy": round(float(data["final_accuracy"]), 4),  # the released (tail-averaged) model
        "last_round_accuracy": round(float(acc[str(max(int(k) for k in acc))]), 4),
        "epsilon_consumer": eps.get("consumer"),
        "epsilon_server": eps.get("server"),
        "delta": eps.get("delta"),
        # round 1 includes starting the simulation backend; report the steady state
        "round_seconds": round(sum(secs[1:]) / max(len(secs) - 1, 1), 3),
        "seconds": round(seconds, 1),
        "stopped": data.get("stopped", ""),
        "command": f"flwr run . --federation-config '{federation_config(spec.supernodes)}' --run-config '{shown}'",
    }
    if spec.preset == "sample-dp":
        per_round = [m["dp-epsilon"] for _, m in sorted(data["train_metrics"].items(), key=lambda kv: int(kv[0]))
                     if "dp-epsilon" in m]
        # per example, added on the client: the same against the server (mean over clients,
        # released as a secure metric; the clients' data sizes give them one sample rate)
        row["epsilon_consumer"] = row["epsilon_server"] = per_round[-1] if per_round else None
        row["delta"] = data["settings"]["delta"]
    for key in ("epsilon_consumer", "epsilon_server"):
        v = row[key]
        row[key] = None if v is None or not math.isfinite(float(v)) else round(float(v), 4)
    if user_dp:
        row["ledger_verified"] = verify_ledger(ledger)[0]
    plot_run(data, ledger if user_dp else None, out_dir / f"{label}.png",
             f"{label}: {spec.supernodes} SuperNodes")
    return row


def _unmask_and_evaluate(data: dict[str, Any], home: Path) -> None:
    """A model-confidential run: the server saved only the masked model. Unmask it as a
    site would (``sgs-flower unmask`` with a site's key file, found under the sites'
    state folder of this FLWR_HOME) and evaluate it on the held-out digits."""
    from sgs_flower.confidential.masked_model import MaskedModel
    from sgs_flower.confidential.release import find_key_file, unmask_file
    from sgs_flower.digits import evaluate, make_model, set_weights, train_test_split

    masked_path = Path(data["masked_model"])
    with np.load(masked_path, allow_pickle=False) as f:
        masked = MaskedModel.from_arrays({k: f[k] for k in f.files})
    key = find_key_file(masked, home / "sgs-flower" / "sites")
    if key is None:
        raise RuntimeError(f"no site key file under {home / 'sgs-flower' / 'sites'} holds key {masked.key_id}")
    arrays = unmask_file(masked_path, key)
    net = make_model(data["settings"]["model"])
    set_weights(net, list(arrays.values()))
    _, test = train_test_split()
    _, acc = evaluate(net, test)
    data["final_accuracy"] = acc
    data["accuracy"] = {str(masked.round_id): acc}
    data["unmasked_with"] = str(key)


def stop_all(home: Path) -> None:
    """Stop every process started for ``home`` (SIGTERM, then SIGKILL): the managed
    SuperLink that ``flwr run`` leaves running detached, and its helpers."""
    kill_tree([], str(home))


def run_all(labels: list[str], supernodes: int, rounds: int | None,
            keep: Path | None, repeat: int = 1,
            extra: dict[str, Any] | None = None) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every run of ``labels`` in one app copy and one FLWR_HOME: (rows by label, failed labels).

    With ``repeat`` > 1 the whole list runs that many times, interleaved (a, b, c, a, b,
    c, ...), and each row keeps its last run's outcome with ``round_seconds`` the mean
    over the repeats (each repeat's in ``round_seconds_runs``). Why: a simulation round
    of a small model is a few of the engine's 0.1 s looks for messages, and where a run
    falls against them moves a plain round's mean by 0.05 s (0.14-0.20 s measured), so
    one run's ratio of two such rounds is not a measurement.

    ``extra``: run-config keys set in every run (after the preset and the run's own).
    A failed run is reported on stderr and the others still run; everything started is
    stopped at the end, also on failure. Without ``keep`` the outputs go with the
    temporary folder (with ``repeat``, the files are the last repeat's).
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    work = Path(tempfile.mkdtemp(prefix="sgs-app-"))
    out_dir = keep or work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    rows: dict[str, dict[str, Any]] = {}
    seconds: dict[str, list[float]] = {}
    failed: list[str] = []
    try:
        app = copy_app(work)
        for _ in range(repeat):
            for label in labels:
                try:
                    row = run_one(app, home, spec_for(label, supernodes), rounds, out_dir, extra)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # the other runs still run
                    failed.append(label)
                    print(f"{label}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                seconds.setdefault(label, []).append(row["round_seconds"])
                rows[label] = row
                print(f"{label}: accuracy {row['accuracy']:.4f} (last round {row['last_round_accuracy']:.4f}), "
                      f"epsilon {row['epsilon_consumer']} / {row['epsilon_server']}, "
                      f"{row['round_seconds']:.2f} s/round, {row['seconds']:.0f} s", file=sys.stderr, flush=True)
    finally:
        stop_all(home)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    if repeat > 1:
        for label, row in rows.items():
            row["round_seconds_runs"] = seconds[label]
            row["round_seconds"] = round(sum(seconds[label]) / len(seconds[label]), 3)
    return rows, sorted(set(failed), key=failed.index)


def table_lines(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown table of the runs, then the sample-dp benchmark lines."""

    def f(x: object) -> str:
        return "∞" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))

    lines = ["| run | SuperNodes | rounds | held-out accuracy (released) | last round | ε (consumers) | ε (server) "
             "| δ | s/round | run s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, r in rows.items():
        dp = r["preset"].endswith("-dp")
        lines.append(f"| {label} | {r['supernodes']} | {r['rounds']} | {100 * r['accuracy']:.1f} % "
                     f"| {100 * r['last_round_accuracy']:.1f} % | {f(r['epsilon_consumer']) if dp else '-'} "
                     f"| {f(r['epsilon_server']) if dp else '-'} | {f(r['delta']) if dp else '-'} "
                     f"| {r['round_seconds']:.2f} | {r['seconds']:.0f} |")
    if "sample-dp-10" in rows:
        sdp = rows["sample-dp-10"]
        for base in ("plain-10", "secagg-10"):
            if base in rows:
                b = rows[base]
                line = (f"benchmark: sample-dp round {sdp['round_seconds']:.2f} s = "
                        f"{sdp['round_seconds'] / b['round_seconds']:.2f}x the {base} round "
                        f"({b['round_seconds']:.2f} s), same configuration")
                runs = list(zip(sdp.get("round_seconds_runs", []), b.get("round_seconds_runs", []), strict=False))
                if len(runs) > 1:  # means over the repeats; each repeat's own ratio beside
                    ratios = [x / y for x, y in runs]
                    line += (f"; means of {len(runs)} interleaved runs, per-run ratios "
                             f"{min(ratios):.2f}-{max(ratios):.2f}x")
                lines.append(line)
    return lines
