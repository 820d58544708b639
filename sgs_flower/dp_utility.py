"""Utility of the four privacy modes on federated digits, at matched epsilon.

The library of ``scripts/dp_utility.py`` (the driver: flags, printing). An in-process
federated loop over ``Study.population`` simulated clients (default 100, ~14 training
digits each) that uses the project's real pipeline end to end:

* data: ``sgs_flower.digits.train_test_split`` (held-out, stratified test split)
  and ``partition_iid`` of the training split;
* client: local SGD (``sgs_flower.digits.train``), delta = new - global, then
  ``pipeline.encode_update`` (rotation, L2 clip, stochastic rounding, Skellam share);
* secure aggregation: the real SecAgg+ protocol (``secagg.simulate.run_protocol``
  between one ``SecAggServer`` and one ``SecAggClient`` per client, every round);
* server: ``pipeline.decode_update`` then ``dp.aggregator.DPAggregator.release``
  (central Gaussian noise, accounting of the noise present, optional ledger);
* sample-level DP: ``dp.sample_dp.train_private_round`` (Opacus DP-SGD, one
  accountant per client kept across rounds).

Every client takes part in every round (cohort = population, ``sampling="fixed"``),
so central and distributed DP are accounted on the same footing (replace-one
neighbours, no sampling amplification); see docs/dp_utility.md for why.

A Flower simulation with 100+ SuperNodes would be far too slow on a 2-core machine
(one Ray actor process per node, four message round trips per SecAgg+ round; not
attempted), so the loop runs the same core objects in one process.

Why a top-level module and not ``sgs_flower.dp``: the study drives ``pipeline`` and
``digits`` (top-level modules) as well as ``dp`` and ``secagg``, and ``pipeline``
imports ``dp``; inside ``dp`` it would make ``dp`` import a module that imports ``dp``.
Like ``pipeline``, it sits above the core packages, and none of them imports it
(tests/test_layering.py). No ``flwr``, no ``sgs_flower.app``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sgs_flower.digits import (
    NUM_CLASSES,
    Split,
    evaluate,
    get_weights,
    make_loader,
    partition_iid,
    set_weights,
    train,
    train_test_split,
)
from sgs_flower.dp.aggregator import DPAggregator
from sgs_flower.dp.config import DPConfig
from sgs_flower.dp.noise import skellam_share
from sgs_flower.dp.sample_dp import (
    Criterion,
    SampleDPSettings,
    noise_multiplier_for,
    train_private_round,
)
from sgs_flower.pipeline import UpdateSpec, decode_update, encode_update, flatten, unflatten
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol

MODES = ("none", "sample-dp", "central-dp", "distributed-dp")
#: The word width of the study's rounds without DP (a DP round takes its plan's width).
FIELD_BITS = 32


@dataclass(frozen=True)
class Study:
    """Every knob of one study (``--quick``: 5 rounds, tail 2, seed 0 only)."""

    population: int = 100
    rounds: int = 20
    target_epsilon: float = 8.0
    delta: float = 1e-5
    seed: int = 0
    # client training (same for every mode)
    local_epochs: int = 5
    local_lr: float = 0.5
    batch_size: int = 16  # >= every client's 14-15 examples: full-batch local steps
    # user-level DP (central / distributed)
    clip_norm: float = 1.0
    dp_server_lr: float = 1.0
    dp_server_momentum: float = 0.5
    # no DP and sample-DP: plain FedAvg of the securely aggregated deltas
    clip_range: float = 8.0  # per-coordinate range of the encoding (nothing is clipped)
    # sample-DP (Opacus)
    sample_max_grad_norm: float = 1.0
    sample_lr: float = 1.0
    # the released model: the mean of the global models of the last ``tail`` rounds
    # (post-processing of released aggregates, so free in privacy; 1 = last iterate)
    tail: int = 10  # scripts/dp_utility.py sets rounds // 2 unless --tail is given


@dataclass
class Row:
    mode: str
    accuracy: float
    loss: float
    epsilon_consumer: float | None
    epsilon_server: float | None
    seconds: float
    noise_multiplier: float | None = None
    last_accuracy: float = 0.0
    clipped_clients: int = 0  # user-level DP: client deltas longer than clip_norm
    clipped_coordinates: int = 0  # no DP / sample-DP: coordinates outside +-clip_range
    curve: list[float] = field(default_factory=list)


def digits_train_step(model: nn.Module, loader: torch.utils.data.DataLoader, epochs: int,
                optimizer: torch.optim.Optimizer, criterion: Criterion) -> float:
    """The app's loop, handed to the DP core (which takes its training step from the caller)."""
    return train(model, loader, epochs, 0.0, optimizer=optimizer, criterion=criterion)


def make_model() -> nn.Module:
    """Multinomial logistic regression on the 64 pixels (650 parameters)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES))


def _secure_sum(
    vectors: dict[int, np.ndarray], server_round: int, vector_length: int, field_bits: int
) -> tuple[np.ndarray, int]:
    """One real SecAgg+ round over the cohort; returns the unmasked sum and survivors."""
    ids = tuple(sorted(vectors))
    params = RoundParams(run_id=1, round_id=server_round, cohort=ids, vector_length=vector_length,
                         field_bits=field_bits)
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in ids}
    outcome = run_protocol(server, clients, vectors)
    return outcome.total, len(outcome.survivors)


def _eps(x: float) -> float | None:
    return None if not math.isfinite(x) else x


def run_mode(mode: str, study: Study, ledger_dir: Path | None = None) -> Row:
    """Train the model federated under ``mode``; returns its test accuracy and epsilons."""
    t0 = time.perf_counter()
    torch.manual_seed(study.seed)
    rng = np.random.default_rng([study.seed, MODES.index(mode), 0])  # rounding, rotation
    noise_rng = np.random.default_rng([study.seed, MODES.index(mode), 1])  # DP noise
    train_split, test_split = train_test_split()
    parts = partition_iid(len(train_split), study.population, study.seed)
    clients = [Split(train_split.x[idx], train_split.y[idx]) for idx in parts]
    n = study.population

    net = make_model()
    global_w = get_weights(net)
    model_size = int(flatten(global_w).size)
    momentum = np.zeros(model_size)
    tail_sum = np.zeros(model_size)

    agg: DPAggregator | None = None
    if mode in ("central-dp", "distributed-dp"):
        dp = DPConfig(
            mode=mode,  # type: ignore[arg-type]
            clip_norm=study.clip_norm, target_epsilon=study.target_epsilon, rounds=study.rounds,
            delta=study.delta, min_survivors=n if mode == "distributed-dp" else None,
            sampling="fixed", accountant="rdp",
        )
        ledger = ledger_dir / f"{mode}-seed{study.seed}.jsonl" if ledger_dir else None
        if ledger is not None and ledger.exists():
            ledger.unlink()
        agg = DPAggregator(dp, ledger_path=ledger)  # the strategy's default: the width per round

    sample: SampleDPSettings | None = None
    states: dict[int, dict[str, Any] | None] = {}
    sample_eps = 0.0
    if mode == "sample-dp":
        # Every client has 14-15 examples, so ceil(len / batch) batches: one sample rate.
        batches = max(math.ceil(len(c) / study.batch_size) for c in clients)
        z = noise_multiplier_for(study.target_epsilon, study.delta, 1.0 / batches,
                                 study.rounds * study.local_epochs * batches)
        sample = SampleDPSettings(noise_multiplier=z, max_grad_norm=study.sample_max_grad_norm,
                                  delta=study.delta, max_epsilon=study.target_epsilon)

    row = Row(mode, 0.0, 0.0, None, None, 0.0)
    for r in range(1, study.rounds + 1):
        plan = None
        if agg is not None:
            plan = agg.plan(r, n, n, model_size)
            fields = dict(plan.spec_fields)
            if "rotation_seed" in fields:  # public per-round seed; fixed here so runs repeat
                fields["rotation_seed"] = int(rng.integers(0, 2**31))
            spec = UpdateSpec(max_cohort=n, max_weight=1, field_bits=plan.field_bits, **fields)
            row.noise_multiplier = plan.noise_multiplier
        else:
            spec = UpdateSpec(clip_range=study.clip_range, max_cohort=n, max_weight=1, field_bits=FIELD_BITS)

        flat_global = flatten(global_w)
        vectors: dict[int, np.ndarray] = {}
        for cid, data in enumerate(clients):
            local = make_model()
            set_weights(local, global_w)
            loader = make_loader(data, study.batch_size, shuffle=True, seed=study.seed * 100_003 + r * 1009 + cid)
            if sample is not None:
                res = train_private_round(local, loader, study.local_epochs, study.sample_lr, sample, states.get(cid),
                                          train_step=digits_train_step)
                states[cid] = res.state
                sample_eps = max(sample_eps, res.epsilon)
            else:
                train(local, loader, study.local_epochs, study.local_lr)
            delta = flatten(get_weights(local)) - flat_global
            if agg is not None and float(np.linalg.norm(delta)) > study.clip_norm:
                row.clipped_clients += 1
            noise = None
            if spec.dp_mode == "distributed":  # the library's Skellam share, from a seeded generator
                noise = skellam_share(spec.dp_dimension(model_size), spec.noise_mu_share, noise_rng)
            encoded = encode_update(delta, {}, 1, spec, rng=rng, integer_noise=noise)
            row.clipped_coordinates += encoded.clipped if agg is None else 0
            vectors[cid + 1] = encoded.vector

        total, survivors = _secure_sum(vectors, r, spec.vector_length(model_size), spec.field_bits)
        decoded = decode_update(total, spec, survivors, model_size)
        if agg is not None and plan is not None:
            mean = agg.release(plan, decoded.weighted_delta_sum, decoded.count, dropouts=n - survivors, rng=noise_rng)
            momentum = study.dp_server_momentum * momentum + mean
            step = study.dp_server_lr * momentum
        else:
            step = decoded.mean_delta  # FedAvg: the mean delta, server lr 1
        global_w = unflatten(flat_global + step, global_w)
        set_weights(net, global_w)
        row.curve.append(round(evaluate(net, test_split)[1], 4))
        if r > study.rounds - study.tail:
            tail_sum += flatten(global_w)

    row.last_accuracy = row.curve[-1]
    set_weights(net, unflatten(tail_sum / min(study.tail, study.rounds), global_w))
    row.loss, row.accuracy = evaluate(net, test_split)
    if agg is not None:
        spent = agg.spent()
        row.epsilon_consumer, row.epsilon_server = _eps(spent.consumer), _eps(spent.server)
        if agg.ledger is not None:
            agg.record_evaluation(study.rounds, {"accuracy": row.accuracy, "loss": row.loss})
    elif sample is not None:
        row.epsilon_consumer = row.epsilon_server = sample_eps
        row.noise_multiplier = sample.noise_multiplier
    row.seconds = time.perf_counter() - t0
    return row


def _fmt_eps(x: float | None) -> str:
    return "∞" if x is None else f"{x:.2f}"


GUARANTEE = {
    "none": "none",
    "sample-dp": "per example (DP-SGD on each client; max over clients)",
    "central-dp": "per client (user level); server trusted",
    "distributed-dp": "per client (user level); also against the server",
}


@dataclass
class Summary:
    """One mode over all seeds."""

    mode: str
    accuracies: list[float]
    last_accuracies: list[float]
    epsilon_consumer: float | None  # the largest over seeds (None: infinite)
    epsilon_server: float | None
    noise_multiplier: float | None
    clipped_fraction: float  # user-level DP: share of client updates longer than clip_norm
    clipped_coordinates: int  # no DP / sample-DP: coordinates outside +-clip_range
    seconds: float

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def accuracy_std(self) -> float:
        return float(np.std(self.accuracies))


def _worst(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else max(v for v in values if v is not None)


def summarize(mode: str, rows: list[Row], study: Study) -> Summary:
    return Summary(
        mode=mode,
        accuracies=[r.accuracy for r in rows],
        last_accuracies=[r.last_accuracy for r in rows],
        epsilon_consumer=None if mode == "none" else _worst([r.epsilon_consumer for r in rows]),
        epsilon_server=None if mode == "none" else _worst([r.epsilon_server for r in rows]),
        noise_multiplier=rows[0].noise_multiplier,
        clipped_fraction=sum(r.clipped_clients for r in rows) / (len(rows) * study.rounds * study.population),
        clipped_coordinates=sum(r.clipped_coordinates for r in rows),
        seconds=sum(r.seconds for r in rows),
    )


def table(summaries: list[Summary], study: Study) -> str:
    lines = [
        "| mode | guarantee | epsilon (consumers) | epsilon (server) | delta | noise multiplier "
        "| test accuracy | last round | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        delta = "-" if s.mode == "none" else f"{study.delta:g}"
        z = "-" if s.noise_multiplier is None else f"{s.noise_multiplier:.3f}"
        acc = f"{100 * s.accuracy:.1f} %"
        if len(s.accuracies) > 1:
            acc += f" ± {100 * s.accuracy_std:.1f}"
        lines.append(
            f"| {s.mode} | {GUARANTEE[s.mode]} | {_fmt_eps(s.epsilon_consumer)} | {_fmt_eps(s.epsilon_server)} "
            f"| {delta} | {z} | {acc} | {100 * float(np.mean(s.last_accuracies)):.1f} % | {s.seconds:.1f} |"
        )
    return "\n".join(lines)


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def result_of(summaries: list[Summary], study: Study, seeds: list[int], seconds: float) -> dict[str, Any]:
    """The study's JSON object (the last line ``scripts/dp_utility.py`` prints)."""
    result: dict[str, Any] = {
        "population": study.population, "cohort": study.population, "rounds": study.rounds, "tail": study.tail,
        "seeds": seeds, "delta": study.delta, "target_epsilon": study.target_epsilon,
    }
    keys = {"none": "none", "sample-dp": "sample", "central-dp": "central", "distributed-dp": "distributed"}
    for s in summaries:
        key = keys[s.mode]
        result[f"acc_{key}"] = round(s.accuracy, 4)
        result[f"acc_{key}_per_seed"] = [round(a, 4) for a in s.accuracies]
        result[f"acc_last_{key}"] = round(float(np.mean(s.last_accuracies)), 4)
        if s.mode != "none":
            result[f"epsilon_{key}"] = _round(s.epsilon_consumer)
            result[f"epsilon_server_{key}"] = _round(s.epsilon_server)
            result[f"noise_multiplier_{key}"] = _round(s.noise_multiplier)
        if s.mode in ("central-dp", "distributed-dp"):
            result[f"clipped_fraction_{key}"] = round(s.clipped_fraction, 3)
        else:
            result[f"clipped_coordinates_{key}"] = s.clipped_coordinates
        result[f"seconds_{key}"] = round(s.seconds, 1)
    user_level = [s.epsilon_consumer for s in summaries if s.mode in ("central-dp", "distributed-dp")]
    result["epsilon"] = _round(_worst(user_level)) if user_level else None
    result["seconds"] = round(seconds, 1)
    return result
