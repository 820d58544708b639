"""The ClientApp: ordinary PyTorch training of the digits CNN on this node's partition.

The train function is the user's code and knows nothing about secure aggregation: the
``secagg_mod`` runs the protocol around it when the server asks for it, and lets plain
train messages through.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients import secagg_mod

app = ClientApp(mods=[secagg_mod])  # every handler: a federated evaluation would be secure too


@app.train()
def train(msg: Message, context: Context) -> Message:
    """The user's train function. The training code (torch, Opacus) is imported here,
    on the first message that trains, not with the app: ``secagg_mod`` answers the
    protocol-only messages without calling this function, and in a deployment each
    message is a new process (see :mod:`sgs_flower.app.client_train`)."""
    from sgs_flower.app.client_train import train_digits

    return train_digits(msg, context)
