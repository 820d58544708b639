"""The ClientApp: ordinary PyTorch training of the digits CNN on this node's partition.

The train function is the user's code and knows nothing about secure aggregation: the
``secagg_mod`` runs the protocol around it when the server asks for it, and lets plain
train messages through.
"""

from __future__ import annotations

from typing import cast

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import secagg_mod
from clients.opacus_mixin import OpacusPrivacyMixin
from sgs_flower.app.settings import resolve
from sgs_flower.app.task import Net, load_partition, make_loader, set_weights
from sgs_flower.app.task import train as train_fn
from sgs_flower.dp.sample_dp import SampleDPSettings

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    return int(cast(int, context.node_config["partition-id"])), int(cast(int, context.node_config["num-partitions"]))


class DigitsClient(OpacusPrivacyMixin):
    """The per-round client object (the mixin adds sample-level DP-SGD)."""


@app.train(mods=[secagg_mod])
def train(msg: Message, context: Context) -> Message:
    s = resolve(dict(context.run_config))
    pid, n = _partition(context)
    data = load_partition(pid, n, s["partitioning"], float(s["dirichlet-alpha"]), int(s["seed"]))
    cfg = msg.content.config_records["config"]
    server_round = int(cast(int, cfg.get("server-round", 0)))
    seed = int(s["seed"]) * 1_000_003 + server_round * 1009 + pid
    torch.manual_seed(seed)
    net = Net()
    set_weights(net, [a.numpy() for a in msg.content.array_records["arrays"].values()])
    loader = make_loader(data, int(cast(int, cfg["batch-size"])), shuffle=True, seed=seed)
    epochs, lr = int(cast(int, cfg["local-epochs"])), float(cast(float, cfg["lr"]))
    metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": len(data)}
    if s["dp-mode"] == "sample":
        dp = SampleDPSettings(
            noise_multiplier=float(s["noise-multiplier"]), max_grad_norm=float(s["clip-norm"]),
            delta=float(s["delta"]), max_epsilon=float(s["max-epsilon"]) or None,
        )
        out = DigitsClient().train_privately(net, loader, epochs, lr, dp, context)
        metrics.update({"train_loss": out.loss, "dp-epsilon": out.epsilon})
    else:
        metrics["train_loss"] = train_fn(net, loader, epochs, lr)
    reply = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)
