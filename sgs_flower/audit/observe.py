"""What the server can observe: one client's update, a DP-noised update, a secure aggregate.

Every observation is produced by the app's own training code (``task.train``), so the
audit attacks the update a real client would send, not an idealised gradient. The
result is an :class:`Observation`: the flat vector the server sees plus the public
facts an honest-but-curious server knows anyway (the global model, the client
hyperparameters, how many examples the aggregate covers, clip norm and noise).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sgs_flower import digits as task


@dataclass(frozen=True)
class Observation:
    """One vector released to the server, and what it is known to be made of.

    ``update`` is a flat float64 model delta (new - old weights) or a mean of such
    deltas. ``n_images`` is the number of examples behind it (secure aggregation
    releases the weight sum). ``local_steps``, ``lr`` and ``momentum`` describe the
    client training that produced each delta; ``batch_size`` the batch it used.
    """

    update: np.ndarray
    n_images: int
    local_steps: int
    lr: float
    momentum: float
    batch_size: int


def flat(weights: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate arrays (``task.get_weights`` order) into one float64 vector."""
    return np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights])


def client_update(
    global_weights: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int = 0,
) -> np.ndarray:
    """The flat delta a client sends after ``task.train`` on (x, y) from the global model.

    With ``batch_size >= len(y)`` each epoch is one step, so ``epochs`` is the number
    of local steps.
    """
    net = task.Net()
    task.set_weights(net, global_weights)
    torch.manual_seed(seed)
    loader = task.make_loader(task.Split(x, y), batch_size=batch_size, shuffle=True, seed=seed)
    task.train(net, loader, epochs=epochs, lr=lr)
    return flat(task.get_weights(net)) - flat(global_weights)


def clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``update`` down to L2 norm ``clip_norm`` if it is longer (DP sensitivity bound)."""
    norm = float(np.linalg.norm(update))
    return update if norm <= clip_norm else update * (clip_norm / norm)


def gaussian(dim: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """Isotropic Gaussian noise (the continuous stand-in for the DP noise of ``sgs_flower.dp``)."""
    return rng.normal(0.0, std, size=dim)


def secure_mean(updates: Sequence[np.ndarray], seed: int = 0) -> np.ndarray:
    """The mean of the cohort's updates as secure aggregation releases it to the server.

    Runs the real masking/unmasking simulation when ``sgs_flower.secagg.simulate`` is
    available. Secure aggregation releases exactly the (weighted) mean up to fixed-point
    quantisation -- the sum and the mean differ only by the public total weight -- so
    without it the exact mean is the same observation, and we fall back to it.
    """
    stacked = np.stack([np.asarray(u, dtype=np.float64) for u in updates])
    try:
        from sgs_flower.secagg.simulate import simulate_round
    except ImportError:
        return stacked.mean(axis=0)
    bound = float(np.abs(stacked).max()) * 1.01 + 1e-12
    try:
        res = simulate_round(list(stacked), None, clip_range=bound, seed=seed)
    except Exception as exc:  # an unfinished simulator must not hide the audit's result
        warnings.warn(f"secagg simulate_round failed ({exc!r}); using the exact mean", stacklevel=2)
        return stacked.mean(axis=0)
    return np.asarray(res.aggregate, dtype=np.float64).reshape(stacked.shape[1:])
