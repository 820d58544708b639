"""The digits task: data, models and the plain training loop the app federates.

It lives in the core (not in ``sgs_flower/app``) because the audits and the DP study
use it too, and the core never imports the Flower app.

Everything here is ordinary PyTorch with no Flower and no privacy code: it is the
"user's training code" that the secure-aggregation mod and the DP mixins must leave
unchanged. The data is scikit-learn's bundled ``load_digits`` (1,797 real 8x8
images), so nothing is downloaded at run time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)


@dataclass(frozen=True)
class Split:
    """A set of images (N, 1, 8, 8) in [0, 1] and their labels (N,)."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as float32 images in [0, 1] with int64 labels (dataset order)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0).reshape(-1, *IMAGE_SHAPE)
    y = digits.target.astype(np.int64)
    return x, y


@lru_cache(maxsize=4)
def train_test_split(test_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split]:
    """A fixed, stratified held-out test split; the rest is what the clients share."""
    x, y = load_digits_arrays()
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for label in range(NUM_CLASSES):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        test_idx.extend(idx[: round(len(idx) * test_fraction)].tolist())
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    return Split(x[~mask], y[~mask]), Split(x[mask], y[mask])


def partition_iid(n_examples: int, num_partitions: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle the indices and cut them into ``num_partitions`` near-equal parts."""
    if not 1 <= num_partitions <= n_examples:
        raise ValueError(
            f"num_partitions={num_partitions} must be between 1 and the {n_examples} examples"
        )
    perm = np.random.default_rng(seed).permutation(n_examples)
    return [np.sort(p) for p in np.array_split(perm, num_partitions)]


def partition_dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int = 0, min_size: int = 2
) -> list[np.ndarray]:
    """Label-skewed partitions: each class is spread over clients by Dirichlet(alpha).

    Smaller ``alpha`` gives more skew. Draws are repeated until every partition holds at
    least ``min_size`` examples, so no client is empty.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if num_partitions * min_size > len(labels):
        raise ValueError(
            f"{num_partitions} partitions of at least {min_size} examples need more than "
            f"the {len(labels)} examples available"
        )
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            props = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise RuntimeError(f"could not draw Dirichlet(alpha={alpha}) partitions with >= {min_size} each")


def load_partition(
    partition_id: int,
    num_partitions: int,
    partitioning: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> Split:
    """The training data of one client (one SuperNode), from the shared training split."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id} is outside 0..{num_partitions - 1}")
    train, _ = train_test_split()
    idx = _partitions(num_partitions, partitioning, alpha, seed)[partition_id]
    return Split(train.x[idx], train.y[idx])


@lru_cache(maxsize=8)
def _partitions(num_partitions: int, partitioning: str, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    """All partitions of the training split, computed once per process.

    A simulation runs many SuperNodes' ClientApps in one worker process; with 100+
    SuperNodes re-drawing (Dirichlet: possibly many times) per call would be wasted work.
    """
    train, _ = train_test_split()
    if partitioning == "iid":
        return tuple(partition_iid(len(train), num_partitions, seed))
    if partitioning == "dirichlet":
        # Fewer examples per client at large federations: ask for at least one example
        # each when two per client would not leave room for the skew.
        min_size = 2 if num_partitions * 4 <= len(train) else 1
        return tuple(partition_dirichlet(train.y, num_partitions, alpha, seed, min_size=min_size))
    raise ValueError(f"partitioning must be 'iid' or 'dirichlet', got {partitioning!r}")


class Net(nn.Module):
    """A small CNN for 8x8 digits (about 38k parameters, no batch norm so Opacus accepts it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class LogReg(nn.Module):
    """Multinomial logistic regression on the 64 pixels (650 parameters).

    The model that suits user-level DP at this data size: the DP noise norm grows with
    the square root of the parameter count, so at epsilon 8 over 100 clients the CNN
    drowns in noise while this model keeps about 90 % (docs/dp_utility.md).
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """One hidden layer of 32 units (2,410 parameters): between LogReg and the CNN."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": Net, "logreg": LogReg, "mlp": MLP}


def make_model(name: str = "cnn") -> nn.Module:
    """The model named by the run-config key ``model`` (``cnn``, ``logreg`` or ``mlp``)."""
    try:
        return MODELS[name]()
    except KeyError:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None


def get_weights(net: nn.Module) -> list[np.ndarray]:
    """The model's parameters as float32 numpy arrays, in ``state_dict`` order."""
    return [v.detach().cpu().numpy().astype(np.float32, copy=True) for v in net.state_dict().values()]


def set_weights(net: nn.Module, weights: Sequence[np.ndarray]) -> None:
    """Load arrays produced by :func:`get_weights` (same order and shapes) into ``net``."""
    keys = list(net.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"model has {len(keys)} tensors, got {len(weights)} arrays")
    state = {k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights, strict=True)}
    net.load_state_dict(state, strict=True)


def make_loader(split: Split, batch_size: int, shuffle: bool, seed: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over a split (a seeded generator makes client runs repeatable)."""
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(split.x), torch.from_numpy(split.y))
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)


def train(
    net: nn.Module,
    loader: torch.utils.data.DataLoader,
    epochs: int,
    lr: float,
    optimizer: torch.optim.Optimizer | None = None,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """Plain SGD training; returns the mean training loss of the last epoch.

    ``optimizer`` and ``criterion`` let a caller swap in private ones (Opacus' DP
    optimizer and, for ghost clipping, its loss wrapper) without changing the loop.
    """
    net.train()
    opt = optimizer or torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    loss_fn = criterion or nn.CrossEntropyLoss()
    last = 0.0
    for _ in range(max(1, epochs)):
        total, count = 0.0, 0
        for xb, yb in loader:
            if len(yb) == 0:
                continue
            opt.zero_grad()
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        last = total / max(count, 1)
    return last


@torch.no_grad()
def evaluate(net: nn.Module, split: Split, batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of ``net`` on ``split``."""
    net.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    x = torch.from_numpy(split.x)
    y = torch.from_numpy(split.y)
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = net(x[i : i + batch_size])
        loss += float(loss_fn(logits, y[i : i + batch_size]))
        correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    return loss / len(y), correct / len(y)
