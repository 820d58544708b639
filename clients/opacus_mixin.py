"""Sample-level DP-SGD for class-based clients, through Opacus.

``OpacusPrivacyMixin.train_privately`` makes the user's model, optimizer and data
loader private (``PrivacyEngine.make_private``) for one round of local training and
keeps ONE accountant per client across rounds: its history is saved in
``Context.state`` and restored next round, so the epsilon reported is cumulative (a
fresh PrivacyEngine per round, as in Flower's Opacus example, reports the epsilon of
one round only). A client whose next round would exceed its budget refuses to train.
"""

from __future__ import annotations

import json

import torch
from flwr.app import ConfigRecord, Context

from sgs_flower.dp.sample_dp import (
    PrivateRoundResult,
    SampleDPSettings,
    TrainStep,
    train_private_round,
)

STATE_KEY = "sgs.sample_dp"


class OpacusPrivacyMixin:
    """Mix into a client class; call :meth:`train_privately` instead of a plain loop."""

    def train_privately(
        self,
        net: torch.nn.Module,
        loader: torch.utils.data.DataLoader,
        epochs: int,
        lr: float,
        settings: SampleDPSettings,
        context: Context,
        *,
        train_step: TrainStep,
        momentum: float = 0.0,
    ) -> PrivateRoundResult:
        """One private round in the user's own loop ``train_step`` (model, loader,
        epochs, optimizer, criterion) -> loss; the accountant lives in ``context.state``."""
        rec = context.state.config_records.get(STATE_KEY)
        state = json.loads(str(rec["accountant"])) if rec is not None else None
        result = train_private_round(
            net, loader, epochs, lr, settings, state, train_step=train_step, momentum=momentum
        )
        context.state[STATE_KEY] = ConfigRecord({"accountant": json.dumps(result.state), "epsilon": result.epsilon})
        return result
