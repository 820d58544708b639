"""A train round's masked input at the site: check what the server chose, train, encode, mask.

Every check that can refuse runs before training, on what the server sent and the
site's own policy and state, so it fails the same way whatever the site's data. After
training nothing is refused: a train step that raised, a malformed reply, a weight out
of range or a non-finite value makes the site send ``pipeline.encode_failure`` instead,
a vector of the same length at the same stage with the reason counted inside it
(outside DP) or a noisy flag (under DP).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from sgs_flower.confidential.masked_model import RoundContext, flat_model, layout_of, seal
from sgs_flower.dp.site import SiteAccountant
from sgs_flower.pipeline import (
    EncodedUpdate,
    UpdateSpec,
    binding_digest,
    encode_failure,
    int_size_of,
    metric_slot_names,
    model_delta,
    model_digest,
    validation_layout,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    EncodingError,
    InconsistentRequestError,
    MalformedMessageError,
    PolicyError,
    StaleMessageError,
)
from sgs_flower.secagg.model_memory import model_sketch, near_sets, sketch_bytes
from sgs_flower.site import model_key, retry
from sgs_flower.site.parts import record_names
from sgs_flower.site.request import (
    Encoder,
    ModelRecord,
    Names,
    Request,
    TrainReply,
    TrainStep,
    Unusable,
)
from sgs_flower.site.state import Site
from sgs_flower.site.store import NAMES_KEY, PENDING_KEY, Store

logger = logging.getLogger("sgs_flower.client")


def check_spec_against_setup(spec: UpdateSpec, setup: wire.Setup | None) -> None:
    """Refuse, before training, a spec that does not fit the round the site set up.

    The spec's width must be the masking width of the round's setup (both are bound:
    the setup's in the share and mask contexts, the spec's in the digest that keys
    the masks), and its cohort bound must cover the cohort: the site's own overflow
    check (:class:`~sgs_flower.secagg.quantize.QuantizationConfig`) reads
    ``max_cohort``, so a server that understates it could make the sum wrap."""
    if setup is None:
        raise StaleMessageError("no round is awaiting this site's masked input")
    if spec.field_bits != setup.field_bits:
        raise InconsistentRequestError(
            f"the update spec's word width ({spec.field_bits} bits) differs from the round's masking width "
            f"({setup.field_bits} bits, from its setup): refused before training"
        )
    if spec.max_cohort < len(setup.cohort):
        raise InconsistentRequestError(
            f"the update spec is sized for {spec.max_cohort} clients but the round's cohort has "
            f"{len(setup.cohort)}: its sum could wrap; refused before training"
        )


def _check_spec(site: Site, client: SecAggClient, spec: UpdateSpec) -> None:
    """The spec against the round's setup and the site's own policy."""
    check_spec_against_setup(spec, client.round_setup())
    site.policy.check_width(spec.field_bits)
    if site.policy.require_distributed_dp and spec.dp_mode != "distributed":
        raise PolicyError("this site requires distributed DP (sgs-require-dp) and the round's spec has none")
    site.policy.check_validation(bool(spec.validation))
    if site.policy.require_confidential and not spec.model_key:
        raise PolicyError("this site requires the model-confidential mode (sgs-require-confidential) and the "
                          "round's spec names no model key")


def _admit_dp(site: Site, spec: UpdateSpec, model_size: int) -> None:
    """Spend the round's distributed-DP cost from the site's own budget, before the masked
    input leaves the site (``sgs_flower.dp.site``); refuses past the floor or budget."""
    policy = site.policy
    accountant = SiteAccountant(policy.dp_min_noise_multiplier, policy.dp_max_epsilon, policy.dp_delta,
                                list(site.state.dp_events))
    eps = accountant.admit(spec.dp_contribution(model_size))
    site.state.dp_events = accountant.events
    site.save()
    logger.info("distributed DP: this site's epsilon against the server is now %.4g (delta %g)", eps, policy.dp_delta)


def on_masked_input(
    site: Site, request: Request, client: SecAggClient, server_msg: wire.Message, train: TrainStep, encoder: Encoder,
) -> tuple[wire.Message, Names]:
    """Check everything the server chose, train, encode, mask (see the module docstring)."""
    rec = request.configs[wire.RECORD_KEY]
    a_key, c_key, w_key = record_names(rec, request)
    if wire.SPEC_KEY not in request.configs:
        raise MalformedMessageError("masked-input request lacks the update spec")
    wire_model = request.models[a_key]
    cfg = request.configs[c_key]
    spec = UpdateSpec.from_config(dict(request.configs[wire.SPEC_KEY]))
    _check_spec(site, client, spec)
    key_state = None
    model = wire_model
    if spec.model_key:  # the model the user's code trains on: unmasked here, MAC and freshness checked
        key_state = model_key.load_key_state(site.store, site.state_path, site.policy)
        model, key_state = model_key.open_model(wire_model, spec.model_key, server_msg.run_id, key_state)
        model_key.save_key_state(site.store, site.state_path, key_state)
    named = model.read()
    model_size = int(sum(a.size for _, a in named))
    if spec.dp_mode == "none" and spec.int_size != int_size_of([a for _, a in named]):
        raise MalformedMessageError("the update spec's int_size does not match the global model's integer entries")
    if spec.vector_length(model_size) > site.policy.max_vector_length:
        raise PolicyError("the round's vector exceeds this site's limit (sgs-max-vector)")
    # input validation (issue 31): the bound and body the rest of the spec implies, checked
    # before training (a server cannot set a bound an honest update fails, or one that passes anything)
    validation = validation_layout(spec, model_size)
    # The model is hashed once: its digest keys the masks (with config and spec) and is
    # what the site remembers so that one model is never aggregated twice.
    m_digest = model_digest(named if model is wire_model else wire_model.read())
    digest = binding_digest(m_digest, dict(cfg), spec.to_config())
    sketch = model_sketch((a for _, a in named), bytes.fromhex(site.state.sketch_key))
    if spec.dp_mode == "distributed":
        _admit_dp(site, spec, model_size)
    names = remembered_names(site.store, NAMES_KEY, spec)
    encoded, delta, metrics, weight, failed, step, names = _train_and_encode(
        site.store, lambda: train(a_key, c_key, model), model, named, w_key, spec, encoder, names)
    if spec.dp_mode != "none":
        names = ([], [])
    layout = layout_of(named)
    if key_state is not None:
        seal(encoded.vector, key_state.key, RoundContext(server_msg.run_id, server_msg.round_id, spec, layout), 0,
             site.node_id, model_size)
    near = near_sets(site.state.models, sketch, step, site.policy.min_model_change)
    masked = client.handle(server_msg, vector=encoded.vector, bound_digest=digest, model_digest=m_digest,
                           min_survivors=spec.min_survivors if spec.dp_mode == "distributed" else 0,
                           near_sets=near, validation=validation)
    site.store.put(PENDING_KEY, {"digest": m_digest.hex(), "sketch": sketch_bytes(sketch), "step": step})
    retry.keep(site, server_msg, spec, model_size, failed, delta if not failed else None, metrics, weight, layout)
    return masked, names


def _train_and_encode(
    store: Store, run_step: Callable[[], TrainReply], model: ModelRecord, named: list[tuple[str, np.ndarray]],
    w_key: str, spec: UpdateSpec, encoder: Encoder, names: Names,
) -> tuple[EncodedUpdate, np.ndarray, dict[str, Any], int, str, float, Names]:
    """The user's training, the checks of its reply and the encoding: an unusable update
    becomes the protocol's unusable vector (``failed`` names the reason)."""
    step, failed, weight = 0.0, "", 0
    delta = np.zeros(0)
    metrics: dict[str, Any] = {}
    model_size = int(sum(a.size for _, a in named))
    try:
        delta, metrics, weight, names = _train_and_check(store, run_step, model, named, w_key, spec)
        step = float(np.linalg.norm(delta))
        if not np.isfinite(step) or not all(np.isfinite(v) for v in metrics.values()):
            raise Unusable("non-finite update or metric", "the update or a train metric holds NaN or inf")
        if spec.model_key:  # this mode sums whole models (the server's rule is the identity)
            delta = delta + flat_model([a for _, a in named])
        try:
            encoded = encoder(delta, metrics, weight, spec)
        except Exception as exc:  # a custom encoder's failure may depend on the data too: never an error reply
            raise Unusable("the site's encoder raised", repr(exc)) from exc
    except Unusable as exc:
        logger.warning("this site's update cannot be used this round (%s): %s; it sends the protocol's "
                       "'unusable' vector instead, so the server learns only how many sites failed", exc.reason, exc)
        encoded = encode_failure(spec, model_size, exc.reason)
        failed = exc.reason
    if encoded.clipped:
        logger.warning(
            "%d of %d update coordinates exceeded the round's range (clip_range=%g, int_clip_range=%g); they are "
            "counted inside the masked vector and the server retries at a wider range before releasing anything",
            encoded.clipped, model_size, spec.clip_range, spec.int_clip_range,
        )
    return encoded, delta, metrics, weight, failed, step, names


def remembered_names(store: Store, key: str, spec: UpdateSpec) -> Names:
    """The metric names a site whose update (or evaluation) is unusable reports: those of
    its last usable reply, split into slots under this round's spec, as a usable reply
    would be. (A site that fails in its first round of a run has none to report: see
    docs/threat_model.md.)"""
    rec = store.get(key)
    if rec is None:
        return [], []
    template: dict[str, Any] = {str(n): 0.0 for n in rec["numeric"]} | {str(n): "" for n in rec["other"]}
    slots, left_out = metric_slot_names(template, spec)
    return list(slots), list(left_out)


def remember_names(store: Store, key: str, metrics: dict[str, Any], w_key: str) -> None:
    """Keep the names of a usable reply's metrics (numbers, and the others), never values."""
    numeric = sorted(k for k, v in metrics.items() if k != w_key and isinstance(v, int | float)
                     and not isinstance(v, bool))
    other = sorted(k for k in metrics if k != w_key and k not in numeric)
    store.put(key, {"numeric": numeric, "other": other})


def whole_weight(raw: Any) -> bool:
    """Whether a reply's weight is a whole, finite number (a bool is not one)."""
    return (not isinstance(raw, bool) and isinstance(raw, int | float) and bool(np.isfinite(raw))
            and float(raw) == int(raw))


def _train_and_check(
    store: Store, run_step: Callable[[], TrainReply], model: ModelRecord, named: list[tuple[str, np.ndarray]],
    w_key: str, spec: UpdateSpec,
) -> tuple[np.ndarray, dict[str, Any], int, Names]:
    """The user's training and the checks of its reply; raises :class:`Unusable`."""
    out = run_step()
    if list(out.keys) != list(model.keys):
        raise Unusable("train reply malformed", "train reply's arrays do not match the global model's keys")
    metrics = out.metrics
    # Every numeric metric but the weight takes a slot (sorted by name); under DP none does.
    other: dict[str, Any] = {k: v for k, v in metrics.items() if k != w_key}
    names = metric_slot_names(other, spec)
    remember_names(store, NAMES_KEY, dict(metrics), w_key)
    if names[1] and spec.metric_slots:
        logger.warning("train metrics %s are not aggregated: more than metric_slots=%d numeric metrics, or not "
                       "numbers (the server is told their names)", names[1], spec.metric_slots)
    if w_key not in metrics:
        raise Unusable("train reply malformed", f"train reply's metrics lack '{w_key}', the weight of its update")
    raw_weight = metrics[w_key]
    max_weight = spec.max_weight if spec.dp_mode == "none" else None
    if not whole_weight(raw_weight):
        raise Unusable("train reply malformed", f"'{w_key}' must be a whole number, got {raw_weight!r}")
    weight = int(raw_weight)
    if max_weight is not None and not 1 <= weight <= max_weight:  # under DP every client has weight 1
        raise Unusable("weight outside 1..max_weight", f"'{w_key}' = {weight} is outside 1..{max_weight} "
                       "(max_weight); raise max-weight on the server")
    # Float entries, then integer ones (BatchNorm counters): each part has its own range.
    try:
        delta = model_delta(out.arrays(), [g for _, g in named])
    except EncodingError as exc:
        raise Unusable("train reply malformed", str(exc)) from exc
    scalar_metrics: dict[str, Any] = {k: float(v) for k, v in other.items() if k in names[0]}
    return delta, scalar_metrics, weight if spec.dp_mode == "none" else 1, (list(names[0]), list(names[1]))
