"""Client side: a Flower mod that runs SecAgg+ around the user's unchanged train function.

Add it to a function-style ClientApp with ``@app.train(mods=[secagg_mod])`` (or the
mixin below for class-based clients). The mod answers the protocol exchanges (five in a
round set up in full, three when the next round's keys rode on the previous round's
consistency and unmask exchanges: a message then carries a second part, which the mod
hands to the protocol client's instance of that round, see ``SecAggClient.handle_next``); at
the masked-input stage (the message that brings the global model and train config) it
calls the user's train function with the usual train message, turns the reply into the delta
``new - global`` plus ``num-examples`` and the train metrics, encodes and masks them,
and sends only the masked vector.

The mod assumes the server may lie. It follows the site's :class:`ClientPolicy`
(``--node-config`` keys ``sgs-*``, see ``sgs_flower.secagg.policy``), never the server:

- a train message without the protocol record is refused while the policy requires
  secure aggregation (the default), so a server cannot downgrade a site to plaintext;
- the site's Ed25519 identity key comes from its node config (``sgs-identity-key``);
  without one, a key is made for the run and kept in ``Context.state`` (a roster cannot
  pin such a key: see the README's threat model);
- under distributed DP the site checks the server's noise against its own floor and
  budget (``sgs_flower.dp.site``) before it trains;
- error replies name the check that failed, never a value of the site's: the full
  message goes to the local log only; after any refusal the site leaves the round.

Protocol state (keys and shares, a few hundred bytes) lives in ``Context.state``
between messages; the model is never stored there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    RecordDict,
)
from flwr.common.constant import ErrorCode

from sgs_flower.dp.rotation import padded_length
from sgs_flower.dp.site import SiteAccountant, SiteBudgetError, SiteState
from sgs_flower.pipeline import (
    EncodedUpdate,
    UpdateSpec,
    binding_digest,
    encode_update,
    int_size_of,
    metric_slot_names,
    model_delta,
    model_digest,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    EncodingError,
    MalformedMessageError,
    PolicyError,
    ProtocolError,
    SecAggError,
)
from sgs_flower.secagg.identity import generate_identity
from sgs_flower.secagg.policy import ClientPolicy, site_policy
from sgs_flower.secagg.wire import Stage

logger = logging.getLogger("sgs_flower.client")

STATE_KEY = "sgs.secagg.client"  # the protocol state machine (a few hundred bytes)
IDENTITY_KEY = "sgs.secagg.identity"  # a run-scoped identity, when the site configured none
SITE_KEY = "sgs.secagg.site"  # SiteState, when the site configured no state file

CallNext = Callable[[Message, Context], Message]
# (delta, metrics, weight, spec, context) -> encoded words; the DP mixin swaps this in.
Encoder = Callable[[np.ndarray, dict[str, float], int, UpdateSpec, Context], EncodedUpdate]


def default_encoder(delta: np.ndarray, metrics: dict[str, float], weight: int, spec: UpdateSpec, context: Context) -> EncodedUpdate:
    return encode_update(delta, metrics, weight, spec)


# ---------------------------------------------------------------- site state
def _policy(context: Context) -> ClientPolicy:
    return site_policy(dict(context.node_config))


def _identity(context: Context, policy: ClientPolicy) -> bytes:
    if policy.identity_key is not None:
        return policy.identity_key
    rec = context.state.config_records.get(IDENTITY_KEY)
    if rec is not None and isinstance(rec.get("key"), bytes):
        return bytes(rec["key"])  # type: ignore[arg-type]
    key = generate_identity()
    context.state[IDENTITY_KEY] = ConfigRecord({"key": key})
    return key


def _load_site(context: Context, policy: ClientPolicy) -> SiteState:
    if policy.state_file:
        return SiteState.load(policy.state_file)
    rec = context.state.config_records.get(SITE_KEY)
    return SiteState.from_json(str(rec["json"])) if rec is not None else SiteState()


def _save_site(context: Context, policy: ClientPolicy, site: SiteState) -> None:
    if policy.state_file:
        site.save(policy.state_file)
    else:
        context.state[SITE_KEY] = ConfigRecord({"json": site.to_json()})


def _load_client(context: Context, ident: bytes, policy: ClientPolicy, site: SiteState) -> SecAggClient:
    rec = context.state.config_records.get(STATE_KEY)
    client = (
        SecAggClient(int(context.node_id), identity=ident, policy=policy)
        if rec is None
        else SecAggClient.from_state_dict(dict(rec), ident, policy)
    )
    client.history = dict(site.history) | client.history
    return client


def _save_client(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord(client.state_dict())


# ---------------------------------------------------------------- replies
def _error_reply(msg: Message, exc: BaseException, code: int = ErrorCode.MOD_FAILED_PRECONDITION) -> Message:
    """An error reply that names the check, never a value of the site's.

    Protocol refusals (:class:`ProtocolError`) describe only what the server sent;
    anything else (the site's data, its training, its budget) is reported by type."""
    reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, ProtocolError) else _public_reason(exc)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _public_reason(exc: BaseException) -> str:
    if isinstance(exc, SiteBudgetError):
        return f"SiteBudgetError: {exc}"  # fixed texts naming the rule, no numbers
    if isinstance(exc, EncodingError):
        return "EncodingError: this site's update could not be encoded under the round's spec (details in its log)"
    return f"{type(exc).__name__}: the site's train step failed (details in its log)"


def _protocol_reply(
    msg: Message,
    stage: Stage,
    reply: wire.Message,
    names: tuple[list[str], list[str]] | None = None,
    ahead: tuple[Stage, wire.Message] | str | None = None,
) -> Message:
    rec = ConfigRecord({wire.FIELD_STAGE: int(stage), wire.FIELD_PAYLOAD: wire.encode(reply, detach_vector=True)})
    if isinstance(ahead, str):  # the next round's part was refused: the check's name only
        rec[wire.FIELD_NEXT_ERROR] = ahead
    elif ahead is not None:
        rec[wire.FIELD_NEXT_STAGE] = int(ahead[0])
        rec[wire.FIELD_NEXT_PAYLOAD] = wire.encode(ahead[1])
    if names is not None:  # metric names in slot order, and those left out: names only, never values
        rec[wire.FIELD_METRIC_NAMES] = list(names[0])
        rec[wire.FIELD_METRICS_LEFT_OUT] = list(names[1])
    content = RecordDict({wire.RECORD_KEY: rec})
    if isinstance(reply, wire.MaskedInput):
        # raw words (no np.save round trip); Flower still chunks the Array for transport
        vec = reply.vector.astype(reply.vector.dtype.newbyteorder("<"), copy=False)
        raw = Array(dtype=vec.dtype.str, shape=(vec.size,), stype=wire.RAW_STYPE, data=vec.tobytes())
        content[wire.VECTOR_KEY] = ArrayRecord({wire.FIELD_VECTOR: raw})
    return Message(content, reply_to=msg)


def _stage(rec: ConfigRecord) -> Stage:
    raw = rec.get(wire.FIELD_STAGE)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw not in {int(s) for s in Stage}:
        raise MalformedMessageError("protocol record names no valid stage")
    return Stage(raw)


def _text_field(rec: ConfigRecord, key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise MalformedMessageError(f"protocol record field {key!r} must be a short text")
    return value


# ---------------------------------------------------------------- the mod
def secagg_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Flower mod: run the secure-aggregation protocol for train messages."""
    return run_secagg(msg, context, call_next, default_encoder)


def run_secagg(msg: Message, context: Context, call_next: CallNext, encoder: Encoder) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    try:
        policy = _policy(context)
    except SecAggError as exc:  # the site's own configuration is broken: say so, do not train
        logger.error("secure aggregation: bad site policy: %s", exc)
        return _error_reply(msg, PolicyError(f"this site's secure-aggregation policy is invalid ({type(exc).__name__})"))
    if wire.RECORD_KEY not in msg.content.config_records:
        if policy.require_secure_aggregation:
            logger.warning("refused a plain train message: this site requires secure aggregation")
            return _error_reply(msg, PolicyError(
                "this site requires secure aggregation and refuses a plain train message (a site that "
                "accepts plain rounds sets sgs-require-secagg=false in its node config or SGS_NODE_CONFIG)"
            ))
        return call_next(msg, context)
    ident = _identity(context, policy)
    try:
        site = _load_site(context, policy)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        # never start afresh here: that would forget the site's privacy spend and the
        # survivor sets it signed; the site's operator must repair or move the file
        logger.error("secure aggregation: unreadable site state: %r", exc)
        return _error_reply(msg, PolicyError("this site's state (sgs-state-file) is unreadable; it does not take part"))
    try:
        client = _load_client(context, ident, policy, site)
    except (SecAggError, ValueError, KeyError, TypeError) as exc:  # corrupt saved state: start afresh
        logger.warning("discarding unreadable secure-aggregation state: %r", exc)
        client = SecAggClient(int(context.node_id), identity=ident, policy=policy)
        client.history = dict(site.history)
    try:
        rec = msg.content.config_records[wire.RECORD_KEY]
        stage = _stage(rec)
        payload = rec.get(wire.FIELD_PAYLOAD)
        if not isinstance(payload, bytes):
            raise MalformedMessageError("protocol payload is not bytes")
        server_msg = wire.decode(payload)
        if server_msg.stage != stage:
            raise MalformedMessageError("protocol record's stage differs from its payload's")
        reply: wire.Message
        names: tuple[list[str], list[str]] | None = None
        if stage == Stage.MASKED_INPUT:
            client.expect_masked_input(server_msg)
            masked = _on_masked_input(msg, context, client, server_msg, rec, call_next, encoder, policy, site)
            if isinstance(masked, Message):
                client.abandon()
                _save_client(context, client)
                return masked  # the user's train function failed: its error goes back
            reply, names = masked
        else:
            reply = client.handle(server_msg)
    except Exception as exc:
        # this round's part was refused: the site leaves this round, and the next
        # round's part riding on it (if any) is not looked at (an error reply has no content)
        logger.warning("secure aggregation refused a message: %s: %s", type(exc).__name__, exc)
        client.abandon()
        _save_client(context, client)
        return _error_reply(msg, exc)
    ahead: tuple[Stage, wire.Message] | str | None = None
    if wire.FIELD_NEXT_PAYLOAD in rec or wire.FIELD_NEXT_STAGE in rec:
        try:
            next_stage, next_msg = _next_part(rec)
            ahead = next_stage, client.handle_next(next_msg, server_msg)
        except ProtocolError as exc:  # the site leaves the next round only
            logger.warning("secure aggregation refused the next round's part: %s: %s", type(exc).__name__, exc)
            ahead = f"{type(exc).__name__}: {exc}"[: wire.MAX_ERROR_TEXT]
        except Exception as exc:  # e.g. ThresholdError: named by type only
            logger.warning("secure aggregation could not take the next round's part: %r", exc)
            ahead = f"{type(exc).__name__}: the site does not take part in the next round (details in its log)"
    _save_client(context, client)
    if stage == Stage.CONSISTENCY:  # the signed survivor set is remembered (never twice)
        site.history = dict(client.history)
        _save_site(context, policy, site)
    return _protocol_reply(msg, stage, reply, names, ahead)


def _next_part(rec: ConfigRecord) -> tuple[Stage, wire.Message]:
    """The pipelined second part of a message: the next round's setup, size-limited by
    :func:`wire.decode` like any part, and only of a pipelined stage."""
    raw = rec.get(wire.FIELD_NEXT_STAGE)
    payload = rec.get(wire.FIELD_NEXT_PAYLOAD)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw not in {int(s) for s in wire.PIPELINED_STAGES}:
        raise MalformedMessageError("protocol record's next part names no pipelined stage")
    if not isinstance(payload, bytes):
        raise MalformedMessageError("protocol record's next part is not bytes")
    next_msg = wire.decode(payload)
    if int(next_msg.stage) != raw:
        raise MalformedMessageError("protocol record's next stage differs from its payload's")
    return Stage(raw), next_msg


def _on_masked_input(
    msg: Message,
    context: Context,
    client: SecAggClient,
    server_msg: wire.Message,
    rec: ConfigRecord,
    call_next: CallNext,
    encoder: Encoder,
    policy: ClientPolicy,
    site: SiteState,
) -> tuple[wire.Message, tuple[list[str], list[str]]] | Message:
    a_key, c_key, w_key = (_text_field(rec, k) for k in ("arrays-key", "config-key", "weight-key"))
    if a_key not in msg.content.array_records or wire.SPEC_KEY not in msg.content.config_records:
        raise MalformedMessageError("masked-input request lacks the global model or the update spec")
    model = msg.content.array_records[a_key]
    cfg = msg.content.config_records.get(c_key, ConfigRecord())
    spec = UpdateSpec.from_config(dict(msg.content.config_records[wire.SPEC_KEY]))
    named = [(k, v.numpy()) for k, v in model.items()]
    model_size = int(sum(a.size for _, a in named))
    if spec.dp_mode == "none" and spec.int_size != int_size_of([a for _, a in named]):
        raise MalformedMessageError("the update spec's int_size does not match the global model's integer entries")
    if spec.vector_length(model_size) > policy.max_vector_length:
        raise PolicyError("the round's vector exceeds this site's limit (sgs-max-vector)")
    # The model is hashed once: its digest keys the masks (with config and spec) and is
    # what the site remembers so that one model is never aggregated twice.
    m_digest = model_digest(named)
    digest = binding_digest(m_digest, dict(cfg), spec.to_config())
    if spec.dp_mode == "distributed":
        dim = padded_length(model_size) if spec.rotation_seed >= 0 else model_size
        accountant = SiteAccountant(policy.dp_min_noise_multiplier, policy.dp_max_epsilon, policy.dp_delta,
                                    list(site.dp_events))
        eps = accountant.admit(spec.noise_mu_share, spec.min_survivors, spec.bits_per_coordinate or 32, dim,
                               spec.max_cohort)
        site.dp_events = accountant.events
        _save_site(context, policy, site)  # spent before the masked input leaves the site
        logger.info("distributed DP: this site's epsilon against the server is now %.4g (delta %g)", eps, policy.dp_delta)
    # The user's train function sees the ordinary train message of a plain round.
    train_msg = Message(content=RecordDict({a_key: model, c_key: cfg}), metadata=msg.metadata)  # type: ignore[call-overload]
    try:
        out = call_next(train_msg, context)
    except Exception as exc:  # the user's code failed: this client drops out of the round
        logger.warning("train function failed; leaving the secure round: %r", exc)
        return _error_reply(msg, exc, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    if out.has_error():
        return Message(out.error, reply_to=msg)
    arrays = list(out.content.array_records.values())
    metric_recs = list(out.content.metric_records.values())
    if len(arrays) != 1 or len(metric_recs) != 1:
        raise EncodingError(
            f"train reply must hold exactly one ArrayRecord and one MetricRecord, got "
            f"{len(arrays)} and {len(metric_recs)}"
        )
    new, metrics = arrays[0], metric_recs[0]
    if list(new.keys()) != list(model.keys()):
        raise EncodingError("train reply's arrays do not match the global model's keys")
    if w_key not in metrics:
        raise EncodingError(f"train reply's metrics lack '{w_key}', the weight of this client's update")
    raw_weight = metrics[w_key]
    if not isinstance(raw_weight, int | float) or float(raw_weight) != int(raw_weight):
        raise EncodingError(f"'{w_key}' must be a whole number, got {raw_weight!r}")
    # Its range (1..max_weight) is checked by the encoder, which also sets it to 1 under DP.
    weight = int(raw_weight)
    # Float entries, then integer ones (BatchNorm counters): each part has its own range.
    delta = model_delta([n.numpy() for n in new.values()], [g for _, g in named])
    # Every numeric metric but the weight takes a slot (sorted by name); under DP none does.
    other: dict[str, Any] = {k: v for k, v in metrics.items() if k != w_key}
    names = metric_slot_names(other, spec)
    scalar_metrics: dict[str, Any] = {k: float(v) for k, v in other.items() if k in names[0]}
    if names[1] and spec.metric_slots:
        logger.warning("train metrics %s are not aggregated: more than metric_slots=%d numeric metrics, or not "
                       "numbers (the server is told their names)", names[1], spec.metric_slots)
    encoded = encoder(delta, scalar_metrics, weight, spec, context)
    if encoded.clipped:
        logger.warning(
            "%d of %d update coordinates exceeded the round's range (clip_range=%g, int_clip_range=%g) and were "
            "clipped before masking (the server sees the cohort's count and widens the range)",
            encoded.clipped, delta.size, spec.clip_range, spec.int_clip_range,
        )
    if spec.dp_mode != "none":
        names = ([], [])
    masked = client.handle(server_msg, vector=encoded.vector, bound_digest=digest, model_digest=m_digest,
                           min_survivors=spec.min_survivors if spec.dp_mode == "distributed" else 0)
    return masked, names


class SecAggClientMixin:
    """For class-based clients: ``secure_train`` wraps the class's own ``train``.

    ``@app.train()\ndef train(msg, ctx): return MyClient(ctx).secure_train(msg, ctx)``
    where ``MyClient(SecAggClientMixin)`` defines ``train(self, msg, context) -> Message``.
    """

    def train(self, msg: Message, context: Context) -> Message:  # pragma: no cover - user code
        raise NotImplementedError

    def encode_update(
        self, delta: np.ndarray, metrics: dict[str, float], weight: int, spec: UpdateSpec, context: Context
    ) -> EncodedUpdate:
        """Hook for subclasses and other mixins (the DP mixin clips and adds noise here)."""
        return default_encoder(delta, metrics, weight, spec, context)

    def secure_train(self, msg: Message, context: Context) -> Message:
        return run_secagg(msg, context, self.train, self.encode_update)
