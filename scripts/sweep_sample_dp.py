"""The small sweep behind the ``sample-dp`` preset (README, "sample-dp preset").

In-process FedAvg over the app's 10 IID partitions (the same ``load_partition`` the
SuperNodes use), DP-SGD on each client through ``dp.sample_dp.train_private_round``
(Opacus, one accountant per client across rounds, z calibrated by Opacus for a
per-example epsilon of ``--epsilon`` over the whole run), the released model the mean
of the last ``rounds // 2`` global models as in the app. It skips SecAgg (the secure
sum equals the plain one to 2e-6 per coordinate) so a grid point takes seconds.

    python scripts/sweep_sample_dp.py            # the grid in the README
    python scripts/sweep_sample_dp.py --models logreg --batches 32 --lrs 0.5 --epochs 1

Prints one line per setting and, last, the best setting as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
import warnings

import numpy as np
import torch

from sgs_flower.digits import (
    evaluate,
    get_weights,
    load_partition,
    make_loader,
    make_model,
    set_weights,
    train_test_split,
)
from sgs_flower.dp.sample_dp import (
    SampleDPSettings,
    noise_multiplier_for,
    train_private_round,
)
from sgs_flower.dp_utility import digits_train_step


def run(model: str, batch: int, lr: float, epochs: int, rounds: int, momentum: float, clip: float,
        epsilon: float, tail_rounds: int = 3, delta: float = 1e-5, nodes: int = 10, seed: int = 0) -> dict[str, float]:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    parts = [load_partition(i, nodes) for i in range(nodes)]
    _, test = train_test_split()
    net = make_model(model)
    global_w = get_weights(net)
    states: dict[int, dict | None] = {}
    tail: list[list[np.ndarray]] = []
    eps = 0.0
    for r in range(1, rounds + 1):
        new, weights = [], []
        for i, data in enumerate(parts):
            batches = math.ceil(len(data) / batch)
            z = noise_multiplier_for(epsilon, delta, 1.0 / batches, rounds * epochs * batches)
            dp = SampleDPSettings(z, clip, delta, max_epsilon=epsilon, grad_sample_mode="ghost")
            local = make_model(model)
            set_weights(local, global_w)
            loader = make_loader(data, batch, shuffle=True, seed=seed * 1_000_003 + r * 1009 + i)
            res = train_private_round(local, loader, epochs, lr, dp, states.get(i), train_step=digits_train_step, momentum=momentum)
            states[i] = res.state
            eps = max(eps, res.epsilon)
            new.append(get_weights(local))
            weights.append(len(data))
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_w = [np.sum([wi * m[k] for wi, m in zip(w, new, strict=True)], axis=0).astype(np.float32)
                    for k in range(len(global_w))]
        if r > rounds - tail_rounds:
            tail.append(global_w)
    set_weights(net, global_w)
    last = evaluate(net, test)[1]
    set_weights(net, [np.mean([t[k] for t in tail], axis=0) for k in range(len(global_w))])
    acc = evaluate(net, test)[1]
    return {"accuracy": round(acc, 4), "last": round(last, 4), "epsilon": round(eps, 3),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="logreg,mlp")
    ap.add_argument("--batches", default="32,64")
    ap.add_argument("--lrs", default="0.5,1.0")
    ap.add_argument("--epochs", default="1,2")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--tail", type=int, default=3, help="release the mean of the last TAIL global models")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    best: dict = {}
    for model, batch, lr, epochs in itertools.product(
        args.models.split(","), map(int, args.batches.split(",")), map(float, args.lrs.split(",")),
        map(int, args.epochs.split(",")),
    ):
        out = run(model, batch, lr, epochs, args.rounds, args.momentum, args.clip, args.epsilon, args.tail)
        row = {"model": model, "batch": batch, "lr": lr, "epochs": epochs, "rounds": args.rounds, **out}
        print(f"| {model} | {batch} | {lr:g} | {epochs} | {args.rounds} | {100 * out['accuracy']:.1f} % "
              f"| {100 * out['last']:.1f} % | {out['epsilon']:.2f} | {out['seconds']:.1f} |", flush=True)
        if not best or row["accuracy"] > best["accuracy"]:
            best = row
    print(json.dumps(best))
    return best


if __name__ == "__main__":
    main()
