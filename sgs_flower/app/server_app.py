"""The ServerApp: federated training of the digits CNN, secure by default.

The strategy is plain Flower (FedAvg or one of its server optimizers), wrapped in
:class:`strategies.SecAggStrategy` unless the preset turns secure aggregation off. The
server evaluates the global model on the held-out digits after every round.
"""

from __future__ import annotations

import itertools
import json
import time
from logging import INFO
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from sgs_flower.app.settings import Settings, resolve
from sgs_flower.app.task import Net, evaluate, set_weights, train_test_split
from sgs_flower.dp.config import DPConfig
from strategies import SecAggConfig, SecAggStrategy

app = ServerApp()


def make_inner(s: Settings, initial: ArrayRecord) -> FedAvg:
    common: dict[str, Any] = dict(
        fraction_train=float(s["fraction-train"]), fraction_evaluate=0.0,
        min_train_nodes=int(s["min-nodes"]), min_available_nodes=int(s["min-nodes"]),
    )
    opt = s["server-optimizer"]
    if opt == "fedavg":
        return FedAvg(**common)
    if opt == "fedprox":
        return FedProx(proximal_mu=float(s["proximal-mu"]), **common)
    if opt == "fedavgm":
        return FedAvgM(server_learning_rate=1.0, server_momentum=0.9, **common)
    cls = {"fedadam": FedAdam, "fedadagrad": FedAdagrad, "fedyogi": FedYogi}[opt]
    return cls(eta=float(s["server-lr"]), **common)


def make_dp(s: Settings) -> DPConfig | None:
    """User-level DP of the server side (central/distributed); sample-DP lives on clients."""
    mode = s["dp-mode"]
    if mode not in ("central", "distributed"):
        return None
    target = float(s["target-epsilon"])
    return DPConfig(
        mode=f"{mode}-dp",  # type: ignore[arg-type]
        clip_norm=float(s["clip-norm"]),
        noise_multiplier=None if target > 0 else float(s["noise-multiplier"]),
        target_epsilon=target if target > 0 else None,
        rounds=int(s["num-server-rounds"]) if target > 0 else None,
        delta=float(s["delta"]),
        max_epsilon=float(s["max-epsilon"]) or None,
        min_survivors=int(s["min-survivors"]) or None,
        sampling="fixed",
        accountant="rdp",
    )


def make_strategy(s: Settings, initial: ArrayRecord) -> Strategy:
    inner = make_inner(s, initial)
    if not s["secure-aggregation"]:
        return inner
    metrics = ("train_loss", "dp-epsilon") if s["dp-mode"] == "sample" else ("train_loss",)
    cfg = SecAggConfig(
        clip_range=float(s["clip-range"]), field_bits=int(s["field-bits"]), max_weight=int(s["max-weight"]),
        min_clients=int(s["min-clients"]) or None, stage_timeout=float(s["stage-timeout"]), secure_metrics=metrics,
    )
    ledger = str(Path(s["ledger"]).expanduser().resolve()) if s["ledger"] else None
    if ledger:
        log(INFO, "privacy ledger: %s (delete or move it to start a new privacy budget)", ledger)
    return SecAggStrategy(inner, cfg, dp=make_dp(s), ledger=ledger)


@app.main()
def main(grid: Grid, context: Context) -> None:
    s = resolve(dict(context.run_config))
    log(INFO, "sgs-flower: preset %r, settings %s", s["preset"], s.values)
    torch.manual_seed(int(s["seed"]))
    net = Net()
    initial = ArrayRecord(net.state_dict())
    strategy = make_strategy(s, initial)
    _, test = train_test_split()

    stamps: list[float] = []

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.monotonic())  # round r took stamps[r] - stamps[r - 1]
        set_weights(net, [a.numpy() for a in arrays.values()])
        loss, acc = evaluate(net, test)
        log(INFO, "round %d: held-out accuracy %.4f, loss %.4f", server_round, acc, loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    train_config = ConfigRecord(
        {"lr": float(s["lr"]), "local-epochs": int(s["local-epochs"]), "batch-size": int(s["batch-size"])}
    )
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=int(s["num-server-rounds"]),
        train_config=train_config, evaluate_fn=central_evaluate,
    )
    acc = {r: float(cast(float, m["accuracy"])) for r, m in result.evaluate_metrics_serverapp.items()}
    log(INFO, "accuracy per round: %s", ", ".join(f"{r}: {a:.4f}" for r, a in sorted(acc.items())))
    if s["results-file"]:
        out = {
            "preset": s["preset"],
            "settings": s.values,
            "accuracy": acc,
            "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
            "rounds": [vars(r) for r in getattr(strategy, "reports", [])],
            "stopped": getattr(strategy, "stopped", ""),
            "round_seconds": [b - a for a, b in itertools.pairwise(stamps)],
        }
        privacy = getattr(strategy, "privacy", None)
        if privacy is not None:
            spent = privacy.spent()
            out["epsilon"] = {"consumer": spent.consumer, "server": spent.server, "delta": privacy.dp.delta}
        path = Path(s["results-file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))
        # the final global model beside it, for comparisons across runs
        final: dict[str, Any] = {k: v.numpy() for k, v in result.arrays.items()}
        np.savez(path.with_suffix(".npz"), **final)
