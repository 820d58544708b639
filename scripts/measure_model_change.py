"""How far an honest global model moves per round, next to each site's own update
(the scale of the near-copy rule, ``sgs-min-model-change``, default 0.01).

A site refuses to sign a second survivor set for a model closer than ``min_change x``
its own update norm to one it already signed for (sgs_flower/secagg/model_memory.py).
An honest FedAvg round over another set moves the model by the cohort's mean update;
this prints, for the app's digits CNN and its default training (lr 0.05, momentum 0.9,
2 local epochs, batch 16), the smallest ratio |m_{r+1} - m_r| / |delta_u| over every
site and round, for IID and Dirichlet(0.5) partitions and 10 and 100 sites. The
default must stay well below it. Plain FedAvg in process (no secure aggregation: the
distances are the same). ``--quick``: 10 sites only.

    python scripts/measure_model_change.py [--quick]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from sgs_flower.digits import (
    get_weights,
    load_partition,
    make_loader,
    make_model,
    set_weights,
    train,
)
from sgs_flower.pipeline import flatten, unflatten


def study(n: int, partitioning: str, rounds: int) -> float:
    torch.manual_seed(0)
    net = make_model("cnn")
    global_w = get_weights(net)
    parts = [load_partition(i, n, partitioning, 0.5, 0) for i in range(n)]
    ratios = []
    for r in range(rounds):
        flat = flatten(global_w)
        deltas, weights = [], []
        for i, data in enumerate(parts):
            local = make_model("cnn")
            set_weights(local, global_w)
            opt = torch.optim.SGD(local.parameters(), lr=0.05, momentum=0.9)
            train(local, make_loader(data, 16, shuffle=True, seed=r * 1009 + i), 2, 0.05, optimizer=opt)
            deltas.append(flatten(get_weights(local)) - flat)
            weights.append(len(data))
        step = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
        ratios += [float(np.linalg.norm(step) / np.linalg.norm(d)) for d in deltas]
        global_w = unflatten(flat + step, global_w)
    return min(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    out = {}
    for n in (10,) if args.quick else (10, 100):
        for partitioning in ("iid", "dirichlet"):
            out[f"min_ratio_{partitioning}_n{n}"] = round(study(n, partitioning, args.rounds), 4)
            print(f"{n} sites, {partitioning}: smallest |model step| / |site update| = {out[f'min_ratio_{partitioning}_n{n}']}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
