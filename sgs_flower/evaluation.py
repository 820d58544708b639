"""Secure federated evaluation: what server and sites must agree on (no ``flwr`` here).

A secure evaluation round is an ordinary SecAgg+ round (same stages, signatures,
consistency check and site policy) whose masked vector has an *empty* model part: only
the numeric evaluation metrics in metric slots, the weight (the reply's
``num-examples``) and the counters of :class:`~sgs_flower.pipeline.UpdateSpec`. The
server learns the weighted means and the total weight, never one site's value.

Why the round is bound apart from training (docs/protocol.md, "Secure evaluation"):

- its round id is the server round with :data:`EVAL_ROUND_FLAG` set, so its share
  context, masks and consistency signatures can never be taken for a train round's
  (a train round id never has the flag; the mod refuses either kind on the other's
  message type), and the site runs it on its own protocol instance, so an evaluation
  never disturbs a train round set up ahead (pipelining);
- the digest that keys its masks and the key under which the site remembers the
  survivor set it signed are domain-separated from training's (:func:`eval_binding_digest`,
  :func:`eval_history_key`): one evaluated model is never summed over two survivor
  sets, and evaluating model ``x`` never blocks training from ``x`` (the next round
  trains from the model the previous evaluation evaluated).

Why a 64-bit field: the vector holds the metric slots' limbs (2 per part at 64 bits:
the metrics are exact, issue 28), the counters and 2 words (about a hundred), so its
width costs nothing, and it lets the weight scale be ``max_weight`` (no weight can
exceed it, so no retry is ever needed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from sgs_flower.pipeline import UpdateSpec, binding_digest
from sgs_flower.secagg.errors import MalformedMessageError

#: Set in the round id of every evaluation round, never in a train round's.
EVAL_ROUND_FLAG = 1 << 62
#: Field width of an evaluation round's vector (see the module docstring).
EVAL_FIELD_BITS = 64
#: The clip range of the (empty) model part; metrics are encoded relative to their own range.
_EVAL_CLIP_RANGE = 1.0
_DOMAIN = b"sgs-flower/evaluation/v1"


def eval_round_id(server_round: int) -> int:
    """The protocol round id of server round ``server_round``'s evaluation."""
    if not 0 <= server_round < EVAL_ROUND_FLAG:
        raise ValueError(f"server round {server_round} is out of range for an evaluation round id")
    return EVAL_ROUND_FLAG | server_round


def is_eval_round(round_id: int) -> bool:
    return bool(round_id & EVAL_ROUND_FLAG)


def eval_spec(
    max_cohort: int,
    max_weight: int,
    metric_slots: int,
    metric_range: float,
    metric_ranges: tuple[tuple[str, float], ...] = (),
) -> UpdateSpec:
    """The spec of an evaluation round: no model, ``metric_slots`` metrics weighted by
    ``num-examples`` (at most ``max_weight``), no DP (docs/threat_model.md)."""
    return UpdateSpec(
        clip_range=_EVAL_CLIP_RANGE, max_cohort=max_cohort, max_weight=max_weight, field_bits=EVAL_FIELD_BITS,
        metric_slots=metric_slots, metric_range=metric_range, metric_ranges=metric_ranges, weight_scale=0,
    )


def check_eval_spec(spec: UpdateSpec, max_vector_length: int) -> None:
    """A site's check of the spec a server sent with an evaluation request: the shape of
    :func:`eval_spec` only (no model part, no DP fields it would ignore), within the
    site's vector limit. Raises :class:`MalformedMessageError` naming the field."""
    if spec.dp_mode != "none" or spec.int_size or spec.noise_headroom or spec.rotation_seed >= 0:
        raise MalformedMessageError("an evaluation spec carries no DP, rotation or integer part")
    if spec.weight_scale not in (0, spec.max_weight):
        raise MalformedMessageError("an evaluation spec's weight_scale must be its max_weight")
    if spec.vector_length(0) > max_vector_length:
        raise MalformedMessageError("the evaluation vector exceeds this site's limit (sgs-max-vector)")


def eval_binding_digest(model: bytes, config: Mapping[str, Any], spec: UpdateSpec) -> bytes:
    """What keys an evaluation round's masks: the model digest, the evaluate config and
    the spec, under a label of its own (never equal to a train round's binding)."""
    return hashlib.sha256(_DOMAIN + b"/binding" + binding_digest(model, config, spec.to_config())).digest()


def eval_history_key(model: bytes) -> bytes:
    """Where a site remembers the survivor set it signed for evaluating ``model``
    (its model digest): apart from training's entry for the same model."""
    return hashlib.sha256(_DOMAIN + b"/history" + model).digest()
