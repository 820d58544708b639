"""Server side of the model-key phase (model-confidential mode) over a Flower ``Grid``:
the phase is the driver's (:mod:`sgs_flower.driver.model_key`, relay only: the server
never sees the key); this runs it over a ``Grid`` on its own (tests, tools)."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.common.logger import FLOWER_LOGGER
from flwr.serverapp import Grid

from sgs_flower.driver.model_key import KEY_RECORD, KeyPhaseResult
from sgs_flower.driver.model_key import ensure_model_key as _ensure_model_key
from strategies.grid_transport import GridTransport

__all__ = ["KEY_RECORD", "KeyPhaseResult", "ensure_model_key"]


def ensure_model_key(grid: Grid, nodes: Iterable[int], run_id: int, timeout: float, max_poll: float,
                     want: str = "") -> KeyPhaseResult:
    """Make every node in ``nodes`` hold the sites' model key (``want``: the key id the
    run already uses, if any); returns the key id and the nodes known to hold it."""
    return _ensure_model_key(GridTransport(grid, max_poll), nodes, run_id, timeout, want, FLOWER_LOGGER)
