"""What a sample-DP round costs next to a plain one: the client side, in process.

The ``sample-dp`` preset's configuration (10 SuperNodes' partitions, logistic
regression, batch 32, 2 local epochs, 10 rounds): every client trains every round
as the ClientApp does, once plainly and once with DP-SGD (``train_private_round``:
Opacus set-up, the budget check, training, accounting), with per-example hooks and
with ghost clipping. Wall time per round over all clients, best of ``--repeat``.

    python scripts/bench_sample_dp.py          # ~20 s
    python scripts/bench_sample_dp.py --model cnn --batch 128

The last line is one JSON object; the ``flwr run`` round ratio (Flower and SecAgg
included) is the benchmark line of scripts/app_results.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from typing import Any

import torch

from sgs_flower.app.client_train import private_step
from sgs_flower.digits import (
    get_weights,
    load_partition,
    make_loader,
    make_model,
    set_weights,
    train,
)
from sgs_flower.dp.sample_dp import SampleDPSettings, noise_multiplier_for, train_private_round


def bench(mode: str, args: argparse.Namespace) -> float:
    parts = [load_partition(i, args.nodes) for i in range(args.nodes)]
    init = get_weights(make_model(args.model))
    states: dict[int, dict[str, Any] | None] = {}
    t0 = time.perf_counter()
    for r in range(1, args.rounds + 1):
        for i, data in enumerate(parts):
            net = make_model(args.model)
            set_weights(net, init)
            loader = make_loader(data, args.batch, shuffle=True, seed=r * 1009 + i)
            if mode == "plain":
                opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum)
                train(net, loader, args.epochs, args.lr, optimizer=opt)
                continue
            batches = math.ceil(len(data) / args.batch)
            z = noise_multiplier_for(8.0, 1e-5, 1.0 / batches, args.rounds * args.epochs * batches)
            dp = SampleDPSettings(z, 1.0, 1e-5, max_epsilon=8.0, grad_sample_mode=mode)  # type: ignore[arg-type]
            res = train_private_round(net, loader, args.epochs, args.lr, dp, states.get(i),
                                      train_step=private_step, momentum=args.momentum)
            states[i] = res.state
    return (time.perf_counter() - t0) / args.rounds


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="logreg")
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1.0)
    ap.add_argument("--momentum", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    out: dict[str, float] = {}
    for mode in ("plain", "hooks", "ghost"):
        out[mode] = round(min(bench(mode, args) for _ in range(args.repeat)), 4)
    for mode in ("hooks", "ghost"):
        out[f"{mode}_over_plain"] = round(out[mode] / out["plain"], 2)
    print(f"benchmark (client side, {args.model}, {args.nodes} clients, batch {args.batch}, {args.epochs} epochs): "
          f"plain {out['plain']:.3f} s/round, DP-SGD hooks {out['hooks']:.3f} s ({out['hooks_over_plain']}x), "
          f"ghost {out['ghost']:.3f} s ({out['ghost_over_plain']}x)")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
