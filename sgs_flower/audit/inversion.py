"""Gradient inversion: reconstruct training images from an observed model update.

The attack is the one the literature shows works on small images (Geiping et al.
2020, "Inverting Gradients"): optimise dummy images so that the update they would
produce points in the same direction as the observed one (cosine similarity, which
ignores the unknown scale from clipping or averaging), plus a total-variation prior
that favours natural, piecewise-smooth images, with pixels kept in [0, 1]. Labels are
recovered first from the last layer's bias, as in iDLG (Zhao et al. 2020): with
cross-entropy, the bias gradient is ``softmax - onehot``, negative only at the true
classes.

Two ways to model the client's computation (the audit reports the worse of them):

* ``"gradient"``: treat the update as (minus) one gradient of the mean loss. Exact for
  one local step, an approximation for several.
* ``"unrolled"``: replay the client's K local SGD-with-momentum steps on the dummy
  batch and match the resulting delta (only meaningful when each step sees the
  whole local batch, i.e. K epochs of one batch).

Several independent problems (e.g. 16 single-image updates) are solved at once with
``torch.func.vmap``, which is what makes the audit fit in minutes on a CPU. Run it
with ``torch.set_num_threads(1)`` on a shared machine: these are many tiny kernels, and
oversubscribed threads made it 5-20x slower in our measurements.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from sgs_flower.audit.observe import Observation

Mode = Literal["gradient", "unrolled"]
Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AttackConfig:
    """Budget and prior of the inversion attack."""

    iterations: int = 300
    lr: float = 0.1
    tv_weight: float = 1e-2
    mode: Mode = "gradient"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"AttackConfig.iterations must be >= 1, got {self.iterations}")
        if not self.lr > 0:
            raise ValueError(f"AttackConfig.lr must be > 0, got {self.lr}")
        if self.tv_weight < 0:
            raise ValueError(f"AttackConfig.tv_weight must be >= 0, got {self.tv_weight}")
        if self.mode not in ("gradient", "unrolled"):
            raise ValueError(
                f"AttackConfig.mode must be 'gradient' or 'unrolled', got {self.mode!r}"
            )


def params_from_weights(net: nn.Module, weights: Sequence[np.ndarray]) -> Params:
    """The model's parameters as a name -> tensor dict (``task.get_weights`` order)."""
    names = [name for name, _ in net.named_parameters()]
    if len(names) != len(weights):
        raise ValueError(f"model has {len(names)} parameters, got {len(weights)} arrays")
    return {
        n: torch.as_tensor(np.asarray(w), dtype=torch.float32)
        for n, w in zip(names, weights, strict=True)
    }


def _unflatten(vec: np.ndarray, params: Params) -> Params:
    out, i = {}, 0
    for name, p in params.items():
        out[name] = torch.as_tensor(vec[i : i + p.numel()], dtype=torch.float32).reshape(p.shape)
        i += p.numel()
    if i != len(vec):
        raise ValueError(f"update has {len(vec)} entries, the model {i}")
    return out


def recover_labels(update: np.ndarray, params: Params, n_images: int) -> np.ndarray:
    """Labels from the last layer's bias delta (iDLG, extended to batches).

    The bias gradient of mean cross-entropy is ``mean(softmax) - label histogram``: the
    true classes are where it is negative, i.e. where the delta (= -lr x gradient) is
    positive. One image: the arg-max. Several: the positive classes, with the images
    shared out in proportion to the size of each entry (largest remainder); this needs
    no knowledge of the update's scale, which clipping and noise hide.
    """
    bias_name = list(params)[-1]
    bias = _unflatten(update, params)[bias_name].numpy().astype(np.float64)
    if n_images == 1:
        return np.array([int(bias.argmax())])
    pos = np.clip(bias, 0.0, None)
    if not pos.any():
        pos = bias - bias.min() + 1e-12
    order = np.argsort(-pos)
    present = [c for c in order if pos[c] > 0][:n_images]
    counts = np.zeros_like(pos, dtype=np.int64)
    counts[present] = 1
    rest = n_images - len(present)
    if rest > 0:
        share = pos / pos.sum() * rest
        counts += np.floor(share).astype(np.int64)
        left = n_images - counts.sum()
        for c in np.argsort(-(share - np.floor(share)))[:left]:
            counts[c] += 1
    return np.repeat(np.arange(len(pos)), counts)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (
        x[..., :, 1:] - x[..., :, :-1]
    ).abs().mean()


def _flat(tensors: Params) -> torch.Tensor:
    return torch.cat([t.flatten() for t in tensors.values()])


def _make_objective(
    net: nn.Module, params: Params, obs: Observation, cfg: AttackConfig
) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """1 - cos(simulated update, observed update) + TV prior, for one problem."""

    def loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, p, (x,)), y)

    def simulated_update(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cfg.mode == "gradient":
            return -_flat(grad(loss)(params, x, y))
        p, buf = dict(params), None
        for _ in range(obs.local_steps):
            g = grad(loss)(p, x, y)
            buf = g if buf is None else {k: obs.momentum * buf[k] + g[k] for k in g}
            p = {k: p[k] - obs.lr * buf[k] for k in p}
        return _flat(p) - _flat(params)

    def objective(x: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sim = simulated_update(x, y)
        cos = (sim * target).sum() / (sim.norm() * target.norm() + 1e-12)
        return 1.0 - cos + cfg.tv_weight * _total_variation(x)

    return objective


def invert(
    net: nn.Module,
    weights: Sequence[np.ndarray],
    observations: Sequence[Observation],
    cfg: AttackConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct the images behind each observation (all must have equal ``n_images``).

    Returns (images (P, n, 1, 8, 8) in [0, 1], labels (P, n)).
    """
    if not observations:
        raise ValueError("invert needs at least one observation")
    n = observations[0].n_images
    if any(o.n_images != n for o in observations):
        raise ValueError("all observations of one invert call must cover the same number of images")
    params = params_from_weights(net, weights)
    labels = np.stack([recover_labels(o.update, params, n) for o in observations])
    targets = torch.as_tensor(np.stack([o.update for o in observations]), dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.int64)
    objective = _make_objective(net, params, observations[0], cfg)
    step = vmap(grad(objective))
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.rand((len(observations), n, 1, 8, 8), generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    milestones = [int(cfg.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(cfg.iterations):
        x.grad = step(x.detach(), y, targets)
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    return x.detach().numpy(), labels
