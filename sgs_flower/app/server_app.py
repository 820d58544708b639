"""The ServerApp: federated training of the digits CNN, secure by default.

The strategy is plain Flower (FedAvg or one of its server optimizers), wrapped in
:class:`strategies.SecAggStrategy` unless the preset turns secure aggregation off. The
server evaluates the global model on the held-out digits after every round.

The released model is the mean of the last ``tail-rounds`` global models (tail
averaging). It is post-processing of models that were released anyway, so it costs no
privacy, and under DP it averages out much of the noise of the last rounds.
"""

from __future__ import annotations

import itertools
import json
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedAvgM, FedProx, FedYogi, Strategy

from sgs_flower.app.settings import Settings, resolve
from sgs_flower.digits import evaluate, make_model, set_weights, train_test_split
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
        # server lr 1: the released mean delta is applied as is, plus momentum over rounds
        return FedAvgM(server_learning_rate=1.0, server_momentum=float(s["server-momentum"]), **common)
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
    cfg = SecAggConfig(  # every numeric train metric is aggregated securely (metric slots)
        clip_range=float(s["clip-range"]), field_bits=int(s["field-bits"]), max_weight=int(s["max-weight"]),
        min_clients=int(s["min-clients"]) or None, stage_timeout=float(s["stage-timeout"]),
        confidential=bool(s["confidential"]), consistency=str(s["consistency"]),
        min_group=int(s["min-group"]), roster=str(Path(s["roster"]).expanduser()) if s["roster"] else None,
        validate=str(s["validate"]) or None, validation_norm=float(s["validation-norm"]) or None,
    )
    ledger = str(Path(s["ledger"]).expanduser().resolve()) if s["ledger"] else None
    if ledger:
        log(INFO, "privacy ledger: %s (delete or move it to start a new privacy budget)", ledger)
    return SecAggStrategy(inner, cfg, dp=make_dp(s), ledger=ledger)


class TailAverage:
    """Running mean of the last ``k`` global models (flattened, float64)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.models: list[tuple[int, list[np.ndarray]]] = []

    def add(self, server_round: int, arrays: ArrayRecord) -> None:
        self.models.append((server_round, [np.asarray(a.numpy(), dtype=np.float64) for a in arrays.values()]))
        del self.models[: -self.k]

    def rounds(self) -> list[int]:
        return [r for r, _ in self.models]

    def mean(self, like: ArrayRecord) -> ArrayRecord:
        keys = list(like.keys())
        parts = [m for _, m in self.models]
        out: dict[str, Array] = {}
        for i, key in enumerate(keys):
            ref = np.asarray(like[key].numpy())
            out[key] = Array(np.mean([p[i] for p in parts], axis=0).astype(ref.dtype))
        return ArrayRecord(out)


@app.main()
def main(grid: Grid, context: Context) -> None:
    s = resolve(dict(context.run_config))
    log(INFO, "sgs-flower: preset %r, settings %s", s["preset"], s.values)
    torch.manual_seed(int(s["seed"]))
    net = make_model(s["model"])
    initial = ArrayRecord(net.state_dict())
    strategy = make_strategy(s, initial)
    _, test = train_test_split()

    stamps: list[float] = []
    tail = TailAverage(int(s["tail-rounds"]))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        stamps.append(time.monotonic())  # round r took stamps[r] - stamps[r - 1]
        if server_round > 0:
            tail.add(server_round, arrays)
        set_weights(net, [a.numpy() for a in arrays.values()])
        loss, acc = evaluate(net, test)
        log(INFO, "round %d: held-out accuracy %.4f, loss %.4f", server_round, acc, loss)
        return MetricRecord({"accuracy": acc, "loss": loss})

    train_config = ConfigRecord(
        {"lr": float(s["lr"]), "local-epochs": int(s["local-epochs"]), "batch-size": int(s["batch-size"])}
    )
    if s["confidential"]:
        _confidential_run(s, grid, strategy, initial, train_config)
        return
    result = strategy.start(
        grid=grid, initial_arrays=initial, num_rounds=int(s["num-server-rounds"]),
        train_config=train_config, evaluate_fn=central_evaluate,
    )
    acc = {r: float(cast(float, m["accuracy"])) for r, m in result.evaluate_metrics_serverapp.items()}
    log(INFO, "accuracy per round: %s", ", ".join(f"{r}: {a:.4f}" for r, a in sorted(acc.items())))

    # The released model: mean of the last tail-rounds global models (post-processing).
    released = tail.mean(result.arrays) if tail.models else result.arrays
    set_weights(net, [a.numpy() for a in released.values()])
    final_loss, final_acc = evaluate(net, test)
    log(INFO, "released model (mean of the global models of rounds %s): held-out accuracy %.4f, loss %.4f",
        tail.rounds() or [0], final_acc, final_loss)
    privacy = getattr(strategy, "privacy", None)
    stopped = getattr(strategy, "stopped", "")
    if privacy is not None and tail.models:
        privacy.record_evaluation(tail.rounds()[-1], {"released_accuracy": final_acc, "released_loss": final_loss})

    model_files = [Path(p) for p in (s["model-file"],) if p]
    if s["results-file"]:
        model_files.append(Path(s["results-file"]).with_suffix(".npz"))
    final: dict[str, Any] = {k: v.numpy() for k, v in released.items()}
    for path in model_files:  # the released model, for comparisons across runs
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **final)
    if stopped:
        log(WARNING, "training stopped by the privacy budget after round %d of %d: %s. The released model "
            "(mean of rounds %s) is saved%s.", max(acc), int(s["num-server-rounds"]), stopped, tail.rounds() or [0],
            f" to {', '.join(map(str, model_files))}" if model_files else " nowhere (set model-file)")
    if s["results-file"]:
        out = {
            "preset": s["preset"],
            "settings": s.values,
            "accuracy": acc,
            "final_accuracy": final_acc,
            "tail_rounds": tail.rounds(),
            "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
            "rounds": [vars(r) for r in getattr(strategy, "reports", [])],
            "stopped": stopped,
            "round_seconds": [b - a for a, b in itertools.pairwise(stamps)],
        }
        if privacy is not None:
            spent = privacy.spent()
            out["epsilon"] = {"consumer": spent.consumer, "server": spent.server, "delta": privacy.dp.delta}
        path = Path(s["results-file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))


def _confidential_run(s: Settings, grid: Grid, strategy: Strategy, initial: ArrayRecord,
                      train_config: ConfigRecord) -> None:
    """The model-confidential preset: the server never holds the model, so it cannot
    evaluate it; it saves the masked model (``sgs-flower unmask`` recovers it with a
    site's key file) and reports the secure rounds."""
    assert isinstance(strategy, SecAggStrategy)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=int(s["num-server-rounds"]),
                            train_config=train_config)
    model_files = [Path(p) for p in (s["model-file"],) if p]
    if s["results-file"]:
        model_files.append(Path(s["results-file"]).with_suffix(".masked.npz"))
    for path in model_files:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{k: v.numpy() for k, v in result.arrays.items()})  # type: ignore[arg-type]
    log(INFO, "the global model is held masked under model key %s%s; a site recovers it with "
        "'sgs-flower unmask --key <its model-key file> MASKED.npz OUT.npz'", strategy.model_key,
        f" and saved to {', '.join(map(str, model_files))}" if model_files else " (set model-file to save it)")
    if s["results-file"]:
        out = {
            "preset": s["preset"], "settings": s.values, "confidential": True, "model_key": strategy.model_key,
            "masked_model": str(model_files[-1]),
            "evaluate_metrics": {r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
            "train_metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
            "rounds": [vars(r) for r in strategy.reports],
            "round_seconds": [r.seconds for r in strategy.reports],
        }
        path = Path(s["results-file"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=str))
