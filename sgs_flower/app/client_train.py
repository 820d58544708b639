"""The ClientApp's training: ordinary PyTorch training of the digits model on this
node's partition, or DP-SGD through Opacus under the sample-dp preset.

Kept apart from :mod:`sgs_flower.app.client_app` so that a client process that only
answers a protocol message (key advertisement, consistency, unmask) never imports
torch, Opacus or dp-accounting: in a deployment every message starts a new
``flwr-clientapp`` process, and those imports cost seconds each time.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from clients.opacus_mixin import OpacusPrivacyMixin
from sgs_flower.app.settings import Settings, resolve
from sgs_flower.digits import Split, load_partition, make_loader, make_model, set_weights
from sgs_flower.digits import train as train_fn
from sgs_flower.dp.sample_dp import Criterion, SampleDPSettings, noise_multiplier_for


def _partition(context: Context) -> tuple[int, int]:
    return int(cast(int, context.node_config["partition-id"])), int(cast(int, context.node_config["num-partitions"]))


class DigitsClient(OpacusPrivacyMixin):
    """The per-round client object (the mixin adds sample-level DP-SGD)."""


def private_step(
    model: torch.nn.Module, loader: torch.utils.data.DataLoader, epochs: int,
    optimizer: torch.optim.Optimizer, criterion: Criterion,
) -> float:
    """The app's own training loop, handed to the DP core (which never imports the app)."""
    return train_fn(model, loader, epochs, 0.0, optimizer=optimizer, criterion=criterion)


def sample_dp_settings(s: Settings, data: Split, batch_size: int, epochs: int) -> SampleDPSettings:
    """This client's DP-SGD settings; with ``target-epsilon`` its z is calibrated for the run.

    Each client calibrates for its own sample rate (Opacus' Poisson rate, one over the
    batches per epoch) and all the steps the run will take (rounds x epochs x batches),
    so that finishing the run spends at most ``target-epsilon`` per example. The
    calibration is cached per process (same sizes, same z).
    """
    target = float(s["target-epsilon"])
    z = float(s["noise-multiplier"])
    if target > 0:
        batches = max(1, math.ceil(len(data) / batch_size))
        z = noise_multiplier_for(target, float(s["delta"]), 1.0 / batches, int(s["num-server-rounds"]) * epochs * batches)
    return SampleDPSettings(
        noise_multiplier=z, max_grad_norm=float(s["clip-norm"]), delta=float(s["delta"]),
        max_epsilon=float(s["max-epsilon"]) or None, grad_sample_mode=s["grad-sample-mode"],
    )


def train_digits(msg: Message, context: Context) -> Message:
    """One round of the app's training on this node's partition (plain or DP-SGD)."""
    s = resolve(dict(context.run_config))
    pid, n = _partition(context)
    data = load_partition(pid, n, s["partitioning"], float(s["dirichlet-alpha"]), int(s["seed"]))
    cfg = msg.content.config_records["config"]
    server_round = int(cast(int, cfg.get("server-round", 0)))
    seed = int(s["seed"]) * 1_000_003 + server_round * 1009 + pid
    torch.manual_seed(seed)
    net = make_model(s["model"])
    set_weights(net, [a.numpy() for a in msg.content.array_records["arrays"].values()])
    batch_size = int(cast(int, cfg["batch-size"]))
    loader = make_loader(data, batch_size, shuffle=True, seed=seed)
    epochs, lr = int(cast(int, cfg["local-epochs"])), float(cast(float, cfg["lr"]))
    momentum = float(s["client-momentum"])
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": len(data)}
    if s["dp-mode"] == "sample":
        dp = sample_dp_settings(s, data, batch_size, epochs)
        out = DigitsClient().train_privately(
            net, loader, epochs, lr, dp, context, train_step=private_step, momentum=momentum
        )
        metrics.update({"train_loss": out.loss, "dp-epsilon": out.epsilon})
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
        metrics["train_loss"] = train_fn(net, loader, epochs, lr, optimizer=opt)
    reply = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)
