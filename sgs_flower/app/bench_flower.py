"""Benchmark: one Flower simulation harness, three aggregations, the same machine and run.

1. ``plain``:  Flower's Message-API ``FedAvg`` (``flwr.serverapp.strategy``), no protection.
2. ``flower``: Flower's built-in SecAgg+ (legacy ``DefaultWorkflow`` + ``SecAggPlusWorkflow``
   on the server, ``secaggplus_mod`` on a ``NumPyClient``).
3. ``ours``:   ``SecAggStrategy(FedAvg(...))`` with the ``secagg_mod`` client mod.

Optionally (``--legacy-plain``) a fourth run, ``flower_plain``: the legacy ``DefaultWorkflow``
without SecAgg+, which is what Flower's SecAgg+ adds its overhead to.

Every run uses the same cohort (n SuperNodes, all sampled every round), the same model
(m float32 parameters in 8 arrays), the same Ray backend (1 CPU per client, ``ray.init``
with 2 CPUs) and the same cheap, deterministic client: it returns the weights it received
times ``1 + a_p`` plus ``b_p`` (``a_p``, ``b_p`` ~ 1e-3, chosen by partition id) as float32,
with a fixed ``num-examples``. So the numbers measure aggregation overhead, not training.

Timing is taken inside the ServerApp: the wall time at each round boundary (the central
``evaluate_fn`` that every strategy calls after each round). The marginal seconds per round
are ``(t_R - t_1) / (R - 1)``, so Ray start-up and round 1 (actor warm-up) are excluded.
Each variant runs in its own Python subprocess, one after the other (no shared memory or
CPU between them). Correctness: the final model of each secure variant is compared with
plain FedAvg's (max abs difference; both secure protocols quantize, so a small error is
expected).

The library of ``scripts/bench_vs_flower.py`` (the driver: flags, sizes, the JSON line);
each variant's process is that script again, in its hidden ``--worker`` mode, which
calls :func:`run_worker`.

Why in the app layer (``sgs_flower/app/``): the benchmark builds Flower apps, so it
imports ``flwr``, and it wires our ``strategies`` (server) to our ``clients`` (the
``secagg_mod``) as :mod:`sgs_flower.app.server_app` and :mod:`sgs_flower.app.client_app`
do. The core never imports ``flwr`` or the app, and ``strategies`` and ``clients`` never
import each other (tests/test_layering.py), so the app layer is the one place that may
hold both. Flower, ``strategies`` and ``clients`` are imported inside the functions that
use them: the parent process, which only starts the variants and compares their
models, never loads Flower or Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
NUM_EXAMPLES = 10  # every client reports the same weight
MAX_WEIGHT = 16  # >= NUM_EXAMPLES (ours: bounds the field; Flower: weight ratio <= 1)
N_ARRAYS = 8
INIT_SCALE = 0.05  # initial weights ~ N(0, 0.05^2): well inside Flower's clipping range 8
VARIANTS = ("plain", "flower", "ours")
# ours with whole-group participation off on both sides (SecAggConfig(min_group=0), the
# sites' sgs-min-group=0): the round time before issue 29 made groups the default
NO_GROUPS = "ours_nogroups"
OURS = ("ours", NO_GROUPS)
BACKEND: dict[str, Any] = {
    "client_resources": {"num_cpus": 1},
    "init_args": {"num_cpus": 2, "logging_level": "error"},
}


# ---------------------------------------------------------------- shared model and client work
def layer_sizes(m: int) -> list[int]:
    """m parameters split over N_ARRAYS arrays (fewer for tiny m)."""
    k = max(1, min(N_ARRAYS, m))
    base = m // k
    return [base] * (k - 1) + [m - base * (k - 1)]


def initial_model(m: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s, dtype=np.float32) * np.float32(INIT_SCALE)) for s in layer_sizes(m)]


def perturbation(pid: int) -> tuple[float, float]:
    """Client ``pid`` returns ``w * (1 + a) + b``."""
    return 1e-3 * ((pid % 5) - 2), 1e-3 * ((pid % 3) - 1)


def perturb(w: np.ndarray, pid: int) -> np.ndarray:
    """The whole client 'training': one copy to float32 and two in-place passes."""
    a, b = perturbation(pid)
    out = np.array(w, dtype=np.float32, copy=True)
    out *= np.float32(1.0 + a)
    out += np.float32(b)
    return out


def expected_model(m: int, n: int, rounds: int) -> list[np.ndarray]:
    """The exact FedAvg result in float64 (equal weights: the mean of the affine maps)."""
    ab = [perturbation(p) for p in range(n)]
    mean_a = sum(a for a, _ in ab) / n
    mean_b = sum(b for _, b in ab) / n
    ws = [w.astype(np.float64) for w in initial_model(m)]
    for _ in range(rounds):
        ws = [w * (1.0 + mean_a) + mean_b for w in ws]
    return ws


def flower_shares(n: int) -> tuple[int, int]:
    """Flower SecAgg+ ``num_shares`` (neighbours including self) and threshold matching our
    default graph: the same neighbour count and a strict majority of the neighbours."""
    from sgs_flower.secagg.graph import default_degree, default_threshold

    k = default_degree(n)
    return k + 1, default_threshold(k)


# ---------------------------------------------------------------- client apps
def message_client_app(profile_dir: str | None = None) -> Any:
    """Message-API ClientApp used by ``plain`` and ``ours`` (for ``plain`` its sites opt in
    to plain rounds through ``SGS_NODE_CONFIG``; the mod refuses them by default).
    With ``profile_dir``, every call of the mod is run under cProfile and written there."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from clients import secagg_mod

    mods: list[Any] = [secagg_mod]
    if profile_dir is not None:
        mods = [profiling_mod(profile_dir, secagg_mod)]
    app = ClientApp(mods=mods)  # the README's client line: the mod on every handler

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = msg.content["arrays"]
        new = ArrayRecord({k: Array(perturb(v.numpy(), pid)) for k, v in arrays.items()})  # type: ignore[union-attr]
        content = RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": NUM_EXAMPLES})})
        return Message(content, reply_to=msg)

    return app


def profiling_mod(profile_dir: str, mod: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a client mod: cProfile each call, dump ``client_s<stage>_p<pid>_<seq>.prof`` and
    one JSON line (stage, seconds, bytes of the node state) per call to ``client_times.jsonl``."""

    def wrapped(msg: Any, context: Any, call_next: Any) -> Any:
        import cProfile
        import uuid

        from sgs_flower.secagg import wire

        rec = msg.content.config_records.get(wire.RECORD_KEY)
        stage = int(rec[wire.FIELD_STAGE]) if rec is not None else 0
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        try:
            return mod(msg, context, call_next)
        finally:
            prof.disable()
            dt = time.perf_counter() - t
            pid = int(context.node_config["partition-id"])
            prof.dump_stats(os.path.join(profile_dir, f"client_s{stage}_p{pid}_{uuid.uuid4().hex[:8]}.prof"))
            state_bytes = sum(a.count_bytes() for a in context.state.array_records.values())
            with open(os.path.join(profile_dir, "client_times.jsonl"), "a") as f:
                f.write(json.dumps({"stage": stage, "pid": pid, "seconds": dt, "state_array_bytes": state_bytes}) + "\n")

    return wrapped


def legacy_client_app(secure: bool) -> Any:
    """Legacy NumPyClient ClientApp for Flower's SecAgg+ (``secaggplus_mod``) and its plain twin."""
    from flwr.app import Context
    from flwr.client import ClientApp as LegacyClientApp
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod

    class BenchClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            return [perturb(p, self.pid) for p in parameters], NUM_EXAMPLES, {}

        def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
            return 0.0, 1, {}

    def client_fn(context: Context) -> Any:
        return BenchClient(int(context.node_config["partition-id"])).to_client()

    return LegacyClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])


# ---------------------------------------------------------------- server mains
def message_server_main(
    variant: str, n: int, m: int, rounds: int, out: dict[str, Any], profile_dir: str | None = None
) -> Callable[..., None]:
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg

    from strategies import SecAggConfig, SecAggStrategy

    def main(grid: Grid, context: Context) -> None:
        inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        groups = {"min_group": 0} if variant == NO_GROUPS else {}
        strategy = inner if variant == "plain" else SecAggStrategy(
            inner, SecAggConfig(max_weight=MAX_WEIGHT, metric_slots=0, **groups)  # type: ignore[arg-type]
        )
        times: dict[int, float] = out.setdefault("times", {})

        def mark(rnd: int, arrays: ArrayRecord) -> None:
            times[rnd] = time.perf_counter()
            if rnd == rounds:
                out["final"] = [np.asarray(a.numpy()) for a in arrays.values()]

        init = ArrayRecord({f"layer{i}": Array(a) for i, a in enumerate(initial_model(m))})
        prof = None
        if profile_dir is not None:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        strategy.start(grid=grid, initial_arrays=init, num_rounds=rounds, train_config=ConfigRecord({"lr": 0.0}),
                       evaluate_fn=mark)
        if prof is not None and profile_dir is not None:
            prof.disable()
            prof.dump_stats(os.path.join(profile_dir, f"server_{variant}.prof"))
        if variant in OURS:
            reps = strategy.reports  # type: ignore[union-attr]
            out["secure_statuses"] = [r.status for r in reps]
            out["secure_round_seconds"] = [r.seconds for r in reps]
            out["stage_seconds"] = [r.stage_seconds for r in reps]
            out["exchanges"] = [r.exchanges for r in reps]
            out["retries"] = [r.retries for r in reps]
            out["error_bounds"] = [r.error_bound for r in reps]
            out["field_bits"] = [r.field_bits for r in reps]

    return main


def legacy_server_main(secure: bool, n: int, m: int, rounds: int, out: dict[str, Any]) -> Callable[..., None]:
    from flwr.app import Context
    from flwr.common import ndarrays_to_parameters
    from flwr.server import Grid, LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    def main(grid: Grid, context: Context) -> None:
        times: dict[int, float] = out.setdefault("times", {})

        def mark(rnd: int, parameters: list[np.ndarray], config: dict[str, Any]) -> None:
            times[rnd] = time.perf_counter()
            if rnd == rounds:
                out["final"] = [np.asarray(p) for p in parameters]

        strategy = LegacyFedAvg(
            fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
            initial_parameters=ndarrays_to_parameters(initial_model(m)), evaluate_fn=mark,
        )
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit_workflow = None
        if secure:
            shares, threshold = flower_shares(n)
            out["flower_num_shares"], out["flower_threshold"] = shares, threshold
            fit_workflow = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold,
                                              max_weight=float(MAX_WEIGHT))
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, ctx)

    return main


def run_worker(variant: str, n: int, m: int, rounds: int, out_path: Path, verbose: bool,
               profile_dir: str | None = None) -> None:
    """One simulation of one variant in this process; writes times and the final model."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    from flwr.common.logger import FLOWER_LOGGER
    from flwr.server import ServerApp as LegacyServerApp
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    if not verbose:
        FLOWER_LOGGER.setLevel(logging.WARNING)
    out: dict[str, Any] = {}
    server: Any
    if variant == "plain":  # these sites accept plain rounds (the mod refuses them by default)
        os.environ["SGS_NODE_CONFIG"] = "sgs-require-secagg=false"
    if variant == NO_GROUPS:
        os.environ["SGS_NODE_CONFIG"] = "sgs-min-group=0"
    if variant in ("plain", *OURS):
        server = ServerApp()
        server.main()(message_server_main(variant, n, m, rounds, out, profile_dir))
        client = message_client_app(profile_dir)
    else:
        secure = variant == "flower"
        server = LegacyServerApp()
        server.main()(legacy_server_main(secure, n, m, rounds, out))
        client = legacy_client_app(secure)
    t0 = time.perf_counter()
    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=BACKEND)
    total = time.perf_counter() - t0
    if "final" not in out or len(out.get("times", {})) < rounds + 1:
        raise SystemExit(f"{variant}: the simulation did not finish {rounds} rounds (got {sorted(out.get('times', {}))})")
    times = out["times"]
    np.savez(out_path.with_suffix(".npz"), *[np.asarray(a, np.float64) for a in out["final"]])
    summary = {
        "variant": variant,
        "load_average_after": os.getloadavg()[0],
        "simulation_seconds": total,
        "round_end": [times[r] - times[0] for r in range(rounds + 1)],
        **{k: v for k, v in out.items() if k not in ("final", "times")},
    }
    out_path.write_text(json.dumps(summary))


def mean_stage_seconds(per_round: list[dict[str, float]]) -> dict[str, float]:
    """Mean seconds of each exchange over rounds 2.. (or round 1 when it is the only one)."""
    rounds = per_round[1:] or per_round
    names = [k for k in (rounds[0] if rounds else {})]
    return {k: sum(r.get(k, 0.0) for r in rounds) / len(rounds) for k in names}


# ---------------------------------------------------------------- the comparison
def run_variant(
    variant: str, n: int, m: int, rounds: int, workdir: Path, verbose: bool, profile: str | None, driver: Path
) -> tuple[dict[str, Any], list[np.ndarray]]:
    out_path = workdir / f"{variant}.json"
    cmd = [sys.executable, str(driver), "--worker", variant, "--n", str(n), "--m", str(m),
           "--rounds", str(rounds), "--out", str(out_path)] + (["--verbose"] if verbose else [])
    if profile is not None and variant in ("plain", *OURS):
        cmd += ["--profile", str(Path(profile).resolve())]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env, cwd=str(ROOT), check=False)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed with exit code {proc.returncode}")
    summary = json.loads(out_path.read_text())
    summary["process_seconds"] = time.perf_counter() - t
    with np.load(out_path.with_suffix(".npz")) as z:
        final = [z[f"arr_{i}"] for i in range(len(z.files))]
    return summary, final


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    if len(a) != len(b):
        raise ValueError(f"models have {len(a)} and {len(b)} arrays")
    return max(float(np.max(np.abs(np.asarray(x, np.float64).ravel() - np.asarray(y, np.float64).ravel())))
               for x, y in zip(a, b, strict=True))


def marginal(round_end: list[float]) -> float:
    """Seconds per round excluding start-up and round 1: (t_R - t_1) / (R - 1)."""
    r = len(round_end) - 1
    return (round_end[r] - round_end[1]) / (r - 1)


def compare(n: int, m: int, rounds: int, variants: list[str], verbose: bool, profile: str | None,
            driver: Path) -> dict[str, Any]:
    """Run every variant in its own process (``driver --worker``), one after the other, and
    compare them: seconds per round, ratios, and each final model against plain FedAvg's
    and the exact float64 result. Progress and the summary go to stderr."""
    results: dict[str, dict[str, Any]] = {}
    finals: dict[str, list[np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_vs_flower_") as tmp:
        for v in variants:
            results[v], finals[v] = run_variant(v, n, m, rounds, Path(tmp), verbose, profile, driver)
            ends = results[v]["round_end"]
            print(f"  {v:>12}: marginal {marginal(ends):7.3f} s/round, round 1 {ends[1]:7.3f} s, "
                  f"simulation {results[v]['simulation_seconds']:.1f} s, process {results[v]['process_seconds']:.1f} s",
                  file=sys.stderr)

    sec = {v: marginal(results[v]["round_end"]) for v in variants}
    exact = expected_model(m, n, rounds)
    out: dict[str, Any] = {
        "n": n, "m": m, "rounds": rounds,
        "plain_seconds_per_round": sec["plain"],
        "flower_secaggplus_seconds_per_round": sec["flower"],
        "ours_seconds_per_round": sec["ours"],
        "ours_over_plain": sec["ours"] / sec["plain"],
        "flower_secaggplus_over_plain": sec["flower"] / sec["plain"],
        "ours_over_flower": sec["ours"] / sec["flower"],
        "ours_max_abs_diff_vs_plain": max_abs_diff(finals["ours"], finals["plain"]),
        "flower_max_abs_diff_vs_plain": max_abs_diff(finals["flower"], finals["plain"]),
        "plain_max_abs_diff_vs_exact": max_abs_diff(finals["plain"], exact),
        "ours_max_abs_diff_vs_exact": max_abs_diff(finals["ours"], exact),
        "flower_max_abs_diff_vs_exact": max_abs_diff(finals["flower"], exact),
        "plain_max_abs_change": max_abs_diff(finals["plain"], initial_model(m)),
        "load_average_after": {v: results[v]["load_average_after"] for v in variants},
        "round1_seconds": {v: results[v]["round_end"][1] for v in variants},
        "simulation_seconds": {v: results[v]["simulation_seconds"] for v in variants},
        "ours_secure_statuses": results["ours"].get("secure_statuses"),
        # exchanges per round (5 in full, 3 pipelined) and retries of the masked input (none without clipping)
        "ours_exchanges": results["ours"].get("exchanges"),
        "ours_retries": results["ours"].get("retries"),
        # the word width of each round and its quantization bound (issue 21): the final
        # model is within the sum of the rounds' bounds of plain FedAvg's
        "ours_field_bits": results["ours"].get("field_bits"),
        "ours_error_bounds": results["ours"].get("error_bounds"),
        # seconds per exchange of our protocol, mean over rounds 2.. (round 1 warms up the actors)
        "ours_stage_seconds": mean_stage_seconds(results["ours"].get("stage_seconds", [])),
        "flower_num_shares": results["flower"].get("flower_num_shares"),
        "flower_threshold": results["flower"].get("flower_threshold"),
    }
    if NO_GROUPS in sec:
        out["ours_nogroups_seconds_per_round"] = sec[NO_GROUPS]
        out["ours_groups_over_no_groups"] = sec["ours"] / sec[NO_GROUPS]
        out["ours_nogroups_max_abs_diff_vs_plain"] = max_abs_diff(finals[NO_GROUPS], finals["plain"])
        out["ours_nogroups_exchanges"] = results[NO_GROUPS].get("exchanges")
        print(f"whole-group participation (the default) over groups off: {out['ours_groups_over_no_groups']:.3f}x "
              f"({sec['ours']:.2f} vs {sec[NO_GROUPS]:.2f} s/round; exchanges {out['ours_exchanges']} vs "
              f"{out['ours_nogroups_exchanges']})", file=sys.stderr)
    if "flower_plain" in sec:
        out["flower_plain_seconds_per_round"] = sec["flower_plain"]
        out["flower_secaggplus_over_flower_plain"] = sec["flower"] / sec["flower_plain"]
        out["flower_plain_max_abs_diff_vs_plain"] = max_abs_diff(finals["flower_plain"], finals["plain"])
    print(f"ours / plain = {out['ours_over_plain']:.2f}x, Flower SecAgg+ / plain = "
          f"{out['flower_secaggplus_over_plain']:.2f}x, ours / Flower SecAgg+ = {out['ours_over_flower']:.3f}x",
          file=sys.stderr)
    print(f"final model vs plain FedAvg: ours max |diff| {out['ours_max_abs_diff_vs_plain']:.3g}, "
          f"Flower SecAgg+ {out['flower_max_abs_diff_vs_plain']:.3g} (plain vs exact float64 "
          f"{out['plain_max_abs_diff_vs_exact']:.3g})", file=sys.stderr)
    print(f"ours, exchanges per round {out['ours_exchanges']}, retries {out['ours_retries']}, word widths "
          f"{out['ours_field_bits']}, bounds {out['ours_error_bounds']}", file=sys.stderr)
    stages = out["ours_stage_seconds"]
    if stages:
        print("ours, seconds per exchange: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
              + f" (the consistency check added by the active-server protocol: {stages.get('CONSISTENCY', 0.0):.2f} s)",
              file=sys.stderr)
    return out
