"""An evaluation round's masked input at the site (``sgs_flower.evaluation``).

The same protocol as training, on its own protocol instance, so a train round set up
ahead is never disturbed. At the masked-input stage the user's evaluate runs; its
metrics and ``num-examples`` leave the site only masked. As in training, every check
that can refuse runs first, on what the server sent; after the user's code ran nothing
is refused: an evaluate that raised or replied unusably makes the site send
``pipeline.encode_failure`` (weight 0, counted inside the sum), so the server cannot
tell from the reply which site failed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from sgs_flower.evaluation import check_eval_spec, eval_binding_digest, eval_history_key
from sgs_flower.pipeline import (
    UpdateSpec,
    encode_failure,
    encode_update,
    metric_slot_names,
    model_digest,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import EncodingError, MalformedMessageError
from sgs_flower.site.model_key import open_models
from sgs_flower.site.parts import record_names
from sgs_flower.site.request import EvaluateStep, Names, Request, Unusable
from sgs_flower.site.state import Site
from sgs_flower.site.store import EVAL_NAMES_KEY, Store
from sgs_flower.site.train import remembered_names, whole_weight

logger = logging.getLogger("sgs_flower.client")


def on_eval_input(site: Site, request: Request, client: SecAggClient, server_msg: wire.Message,
                  evaluate: EvaluateStep) -> tuple[wire.Message, Names]:
    """Check what the server chose, run the user's evaluate, encode and mask its metrics."""
    a_key, c_key, w_key = record_names(request.configs[wire.RECORD_KEY], request)
    if wire.SPEC_KEY not in request.configs:
        raise MalformedMessageError("masked-input request lacks the update spec")
    spec = UpdateSpec.from_config(dict(request.configs[wire.SPEC_KEY]))
    check_eval_spec(spec, site.policy.max_vector_length)
    model = request.models[a_key]
    m_digest = model_digest(model.read())
    digest = eval_binding_digest(m_digest, dict(request.configs[c_key]), spec)
    plain = open_models({a_key: model}, request.run_id, site.policy, site.store, site.state_path)[a_key]
    names = remembered_names(site.store, EVAL_NAMES_KEY, spec)
    try:
        metrics, weight, names = _evaluate_and_check(site.store, lambda: evaluate(a_key, c_key, plain), w_key, spec)
        encoded = encode_update(np.zeros(0), metrics, weight, spec)
    except Unusable as exc:
        logger.warning("this site's evaluation cannot be used this round (%s): %s; it sends the protocol's "
                       "'unusable' vector instead", exc.reason, exc)
        encoded = encode_failure(spec, 0, exc.reason)
    except EncodingError as exc:
        logger.warning("this site's evaluation metrics could not be encoded: %s", exc)
        encoded = encode_failure(spec, 0, "the site's encoder raised")
    masked = client.handle(server_msg, vector=encoded.vector, bound_digest=digest,
                           model_digest=eval_history_key(m_digest))
    return masked, names


def _evaluate_and_check(
    store: Store, run_step: Callable[[], Mapping[str, Any]], w_key: str, spec: UpdateSpec,
) -> tuple[dict[str, float], int, Names]:
    """The user's evaluate and the checks of its reply (one metric record holding the
    weight ``w_key``, a whole number in 1..max_weight); raises :class:`Unusable`. The
    failure reasons are the pipeline's (``FAILURE_REASONS``, named for training)."""
    metrics = run_step()
    other: dict[str, Any] = {k: v for k, v in metrics.items() if k != w_key}
    names = metric_slot_names(other, spec)
    numeric = sorted(k for k, v in other.items() if isinstance(v, int | float) and not isinstance(v, bool))
    store.put(EVAL_NAMES_KEY, {"numeric": numeric, "other": sorted(set(other) - set(numeric))})
    if names[1]:
        logger.warning("evaluation metrics %s are not aggregated: more than metric_slots=%d numeric metrics, or not "
                       "numbers (the server is told their names)", names[1], spec.metric_slots)
    raw_weight = metrics.get(w_key)
    if not whole_weight(raw_weight):
        raise Unusable("train reply malformed", f"evaluate reply's '{w_key}' must be a whole number")
    weight = int(raw_weight)  # type: ignore[arg-type]
    if not 1 <= weight <= spec.max_weight:
        raise Unusable("weight outside 1..max_weight", f"'{w_key}' = {weight} is outside 1..{spec.max_weight}")
    values = {k: float(v) for k, v in other.items() if k in names[0]}
    if not all(np.isfinite(v) for v in values.values()):
        raise Unusable("non-finite update or metric", "an evaluation metric holds NaN or inf")
    return values, weight, (list(names[0]), list(names[1]))
