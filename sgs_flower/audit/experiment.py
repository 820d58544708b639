"""The leakage audit: attack every view the server can have, score it, pick the worst case.

Settings (what the server observes, all produced by the app's ``task.train``):

* (a) one client's plaintext update: batch 1, 4, 8 with one local step, and batch 1
  with several local steps;
* (b) that single-image update after DP: clipped to ``C`` (the median plaintext norm,
  so clipping barely bites -- the attacker's best case) plus Gaussian noise calibrated
  to epsilon in {1, 8, 100} at delta = 1e-5 for ONE release (the whole budget spent on
  the attacked round: the least noise any run with that budget can add, so again the
  attacker's best case);
* (c) the secure aggregate of n clients holding one image each (FedSGD), n = 4, 10,
  16, 64, and of 10 clients holding their whole app partition (144 images, 5 local
  steps);
* (d) the default protected configuration: secure aggregation of n = 10 single-image
  clients plus distributed DP (each client clips to ``C``; the noise on the sum has std
  z * C with z calibrated for epsilon = 8, delta = 1e-5, one release -- as in (b)).

Each setting is attacked on the untrained and on a trained model, with each attack
variant that applies; the table keeps every row and :func:`worst_cases` picks, per
setting, the row with the highest identification rate (then PSNR).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sgs_flower import digits as task
from sgs_flower.audit import metrics
from sgs_flower.audit.calibrate import noise_multiplier_for_epsilon
from sgs_flower.audit.inversion import AttackConfig, Mode, invert
from sgs_flower.audit.observe import Observation, client_update, clip, gaussian, secure_mean

#: Client hyperparameters the audit assumes (the server knows them: it sends them).
CLIENT_LR = 0.1
CLIENT_MOMENTUM = 0.9  # task.train uses SGD with momentum 0.9
SEVERAL_STEPS = 4
DEFAULT_EPSILON = 8.0
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class Setting:
    """One thing the server might observe, and how to build it.

    ``clients`` clients per observation, each with ``images`` images (0: its whole app
    partition of ``partitions``), trained ``steps`` local steps. ``secure``: the
    server sees only the cohort mean. ``epsilon``: DP clipping + noise (None: none).
    """

    key: str
    group: str
    label: str
    problems: int
    clients: int = 1
    images: int = 1
    steps: int = 1
    secure: bool = False
    epsilon: float | None = None
    partitions: int = 0
    modes: tuple[Mode, ...] = ("gradient",)
    recon: int = 0  # images to reconstruct per observation (0: all of them)


def settings(quick: bool) -> list[Setting]:
    """The audited settings; ``quick`` keeps the acceptance-relevant ones only."""
    a1 = Setting("plain_b1", "a", "plain update, batch 1, 1 step", problems=16)
    dp8 = Setting("dp_eps8_b1", "b", "DP eps=8, batch 1", problems=16, epsilon=8.0)
    sa10 = Setting(
        "secagg_n10", "c", "secure sum, 10 clients x 1 img", problems=2, clients=10, secure=True
    )
    prot = Setting(
        "protected_n10",
        "d",
        "secure sum + DP eps=8 (default)",
        problems=2 if quick else 4,
        clients=10,
        secure=True,
        epsilon=DEFAULT_EPSILON,
    )
    if quick:
        return [a1, dp8, sa10, prot]
    return [
        a1,
        Setting("plain_b4", "a", "plain update, batch 4, 1 step", problems=4, images=4),
        Setting("plain_b8", "a", "plain update, batch 8, 1 step", problems=2, images=8),
        Setting(
            "plain_b1_k4",
            "a",
            f"plain update, batch 1, {SEVERAL_STEPS} steps",
            problems=16,
            steps=SEVERAL_STEPS,
            modes=("gradient", "unrolled"),
        ),
        Setting("dp_eps1_b1", "b", "DP eps=1, batch 1", problems=16, epsilon=1.0),
        dp8,
        Setting("dp_eps100_b1", "b", "DP eps=100, batch 1", problems=16, epsilon=100.0),
        Setting(
            "secagg_n4", "c", "secure sum, 4 clients x 1 img", problems=4, clients=4, secure=True
        ),
        sa10,
        Setting(
            "secagg_n16", "c", "secure sum, 16 clients x 1 img", problems=1, clients=16, secure=True
        ),
        Setting(
            "secagg_n64", "c", "secure sum, 64 clients x 1 img", problems=1, clients=64, secure=True
        ),
        Setting(
            "secagg_n10_part",
            "c",
            "secure sum, 10 clients x partition, 5 steps",
            problems=1,
            clients=10,
            images=0,
            partitions=10,
            secure=True,
            recon=16,
        ),
        prot,
    ]


@dataclass
class Row:
    """Scores of one (setting, model, attack) run and of the mean-image baseline."""

    setting: Setting
    model: str
    mode: str
    scores: metrics.LeakageScores
    baseline: metrics.LeakageScores
    chance_ident: float
    seconds: float
    #: reconstruction shown for each target id (for the picture)
    shown: dict[int, np.ndarray] = field(default_factory=dict)


def trained_weights(seed: int = 0, epochs: int = 8) -> list[np.ndarray]:
    """A model trained on the app's training split (about 95 % test accuracy)."""
    torch.manual_seed(seed)
    net = task.Net()
    train_split, _ = task.train_test_split()
    task.train(
        net, task.make_loader(train_split, 32, shuffle=True, seed=seed), epochs=epochs, lr=0.05
    )
    return task.get_weights(net)


def _client_data(s: Setting, ids: np.ndarray, cid: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(x, y, epochs, batch_size) of one client."""
    x_all, y_all = task.load_digits_arrays()
    if s.images == 0:
        part = task.load_partition(cid, s.partitions)
        return part.x, part.y, 1, 32
    return x_all[ids], y_all[ids], s.steps, len(ids)


def build(
    s: Setting, weights: Sequence[np.ndarray], pool: np.ndarray, seed: int
) -> tuple[list[Observation], list[np.ndarray]]:
    """The observations of one setting and, per observation, the dataset ids behind it."""
    x_all, _ = task.load_digits_arrays()
    # an independent noise stream per setting (same seed, different epsilon => different noise)
    rng = np.random.default_rng([seed, sum(map(ord, s.key))])
    per_client = max(s.images, 1)
    observations, candidates = [], []
    for p in range(s.problems):
        updates, ids_all = [], []
        for c in range(s.clients):
            start = (p * s.clients + c) * per_client
            ids = pool[start : start + per_client]
            x, y, epochs, bs = _client_data(s, ids, c)
            updates.append(
                client_update(
                    weights, x, y, epochs=epochs, lr=CLIENT_LR, batch_size=bs, seed=seed + c
                )
            )
            if s.images == 0:
                part = task.load_partition(c, s.partitions)
                ids_all.append(_dataset_ids(part.x, x_all))
            else:
                ids_all.append(ids)
        if s.epsilon is not None:
            clip_norm = float(np.median([np.linalg.norm(u) for u in updates]))
            updates = [clip(u, clip_norm) for u in updates]
            z = noise_multiplier_for_epsilon(s.epsilon, DEFAULT_DELTA, 1)
            # Distributed DP: each client adds a share so that the SUM carries std z*C.
            share = z * clip_norm / np.sqrt(len(updates))
            updates = [u + gaussian(len(u), share, rng) for u in updates]
        obs_vec = secure_mean(updates, seed=seed) if s.secure else updates[0]
        n_imgs = sum(len(i) for i in ids_all)
        steps = s.steps if s.images else 5
        observations.append(
            Observation(obs_vec, s.recon or n_imgs, steps, CLIENT_LR, CLIENT_MOMENTUM, per_client)
        )
        candidates.append(np.concatenate(ids_all))
    return observations, candidates


def _dataset_ids(x: np.ndarray, x_all: np.ndarray) -> np.ndarray:
    """Dataset indices of images (exact match; the partitions are subsets of the data)."""
    return metrics.nearest_index(x, x_all)


def _score(
    recons: np.ndarray, labels: np.ndarray, candidates: Sequence[np.ndarray]
) -> tuple[metrics.LeakageScores, dict[int, np.ndarray]]:
    x_all, y_all = task.load_digits_arrays()
    rec, tgt, tid, lab_p, lab_t = [], [], [], [], []
    shown: dict[int, np.ndarray] = {}
    for r, lab, cand in zip(recons, labels, candidates, strict=True):
        assign = cand[metrics.match(r, x_all[cand])]
        rec.append(r)
        tgt.append(x_all[assign])
        tid.append(assign)
        lab_p.append(lab)
        # labels are scored against the images the reconstructions stand for
        lab_t.append(y_all[assign] if len(cand) > len(r) else y_all[cand])
        shown.update({int(i): img for i, img in zip(assign, r, strict=True)})
    scores = metrics.score(
        np.concatenate(rec),
        np.concatenate(tgt),
        np.concatenate(tid),
        x_all,
        np.concatenate(lab_p),
        np.concatenate(lab_t),
    )
    return scores, shown


def _baseline(
    observations: Sequence[Observation], candidates: Sequence[np.ndarray]
) -> metrics.LeakageScores:
    """The mean image for every reconstruction, the commonest label for every label."""
    x_all, y_all = task.load_digits_arrays()
    mean_img = x_all.mean(axis=0)
    mode = int(np.bincount(y_all).argmax())
    recons = np.stack([np.repeat(mean_img[None], o.n_images, axis=0) for o in observations])
    labels = np.full((len(observations), observations[0].n_images), mode)
    return _score(recons, labels, candidates)[0]


def run_setting(
    s: Setting, model: str, weights: Sequence[np.ndarray], pool: np.ndarray, cfg: AttackConfig
) -> list[Row]:
    """Attack one setting on one model with every applicable attack variant."""
    observations, candidates = build(s, weights, pool, cfg.seed)
    baseline = _baseline(observations, candidates)
    chance = float(np.mean([min(len(c), 1797) / 1797 for c in candidates]))
    rows = []
    for mode in s.modes:
        t0 = time.perf_counter()
        recon, labels = invert(
            task.Net(),
            weights,
            observations,
            AttackConfig(
                iterations=cfg.iterations,
                lr=cfg.lr,
                tv_weight=cfg.tv_weight,
                mode=mode,
                seed=cfg.seed,
            ),
        )
        scores, shown = _score(recon, labels, candidates)
        rows.append(Row(s, model, mode, scores, baseline, chance, time.perf_counter() - t0, shown))
    return rows


def run_audit(quick: bool = False, iterations: int | None = None, seed: int = 0) -> list[Row]:
    """Run every setting on the untrained model and (unless ``quick``) a trained one."""
    torch.manual_seed(seed)
    models = {"untrained": task.get_weights(task.Net())}
    if not quick:
        models["trained"] = trained_weights(seed)
    n_pool = max(s.problems * s.clients * max(s.images, 1) for s in settings(quick) if s.images)
    pool = np.random.default_rng(seed).choice(1797, size=n_pool, replace=False)
    cfg = AttackConfig(iterations=iterations or (150 if quick else 200), seed=seed)
    rows: list[Row] = []
    for s in settings(quick):
        for name, w in models.items():
            rows.extend(run_setting(s, name, w, pool, cfg))
    return rows


def worst_cases(rows: Sequence[Row]) -> list[Row]:
    """Per setting (in order), the row with the most leakage: identification, then PSNR."""
    best: dict[str, Row] = {}
    for r in rows:
        cur = best.get(r.setting.key)
        if cur is None or (r.scores.ident, r.scores.psnr) > (cur.scores.ident, cur.scores.psnr):
            best[r.setting.key] = r
    return list(best.values())
