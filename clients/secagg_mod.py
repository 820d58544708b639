"""Client side: a Flower mod that runs SecAgg+ around the user's unchanged train function.

Add it to a function-style ClientApp with ``@app.train(mods=[secagg_mod])`` (or the
mixin below for class-based clients). The mod answers the four protocol exchanges; at
the masked-input stage (the message that brings the global model and train config) it
calls the user's train function with the usual train message, turns the reply into the delta
``new - global`` plus ``num-examples`` and the train metrics, encodes and masks them,
and sends only the masked vector. Train messages without the protocol record pass
through untouched, so the same ClientApp also works with a plain strategy.

Protocol state (keys and shares, a few hundred bytes) lives in ``Context.state``
between messages; the model is never stored there. A mod that cannot proceed
replies with a Flower error message naming why, instead of crashing the node.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import cast

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

from sgs_flower.pipeline import EncodedUpdate, UpdateSpec, binding_digest, encode_update
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import EncodingError, MalformedMessageError, SecAggError
from sgs_flower.secagg.wire import Stage

logger = logging.getLogger("sgs_flower.client")

STATE_KEY = "sgs.secagg.client"  # the protocol state machine (a few hundred bytes)

CallNext = Callable[[Message, Context], Message]
# (delta, metrics, weight, spec, context) -> encoded words; the DP mixin swaps this in.
Encoder = Callable[[np.ndarray, dict[str, float], int, UpdateSpec, Context], EncodedUpdate]


def default_encoder(delta: np.ndarray, metrics: dict[str, float], weight: int, spec: UpdateSpec, context: Context) -> EncodedUpdate:
    return encode_update(delta, metrics, weight, spec)


def _load_client(context: Context) -> SecAggClient:
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None:
        return SecAggClient(int(context.node_id))
    return SecAggClient.from_state_dict(dict(rec))


def _save_client(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord(client.state_dict())


def _error_reply(msg: Message, exc: BaseException, code: int = ErrorCode.MOD_FAILED_PRECONDITION) -> Message:
    return Message(Error(code=code, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


def _protocol_reply(msg: Message, stage: Stage, reply: wire.Message) -> Message:
    rec = ConfigRecord({wire.FIELD_STAGE: int(stage), wire.FIELD_PAYLOAD: wire.encode(reply, detach_vector=True)})
    content = RecordDict({wire.RECORD_KEY: rec})
    if isinstance(reply, wire.MaskedInput):
        # raw words (no np.save round trip); Flower still chunks the Array for transport
        vec = reply.vector.astype(reply.vector.dtype.newbyteorder("<"), copy=False)
        raw = Array(dtype=vec.dtype.str, shape=(vec.size,), stype=wire.RAW_STYPE, data=vec.tobytes())
        content[wire.VECTOR_KEY] = ArrayRecord({wire.FIELD_VECTOR: raw})
    return Message(content, reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Flower mod: run the secure-aggregation protocol for train messages that carry it."""
    return run_secagg(msg, context, call_next, default_encoder)


def run_secagg(msg: Message, context: Context, call_next: CallNext, encoder: Encoder) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN or wire.RECORD_KEY not in msg.content.config_records:
        return call_next(msg, context)
    try:
        client = _load_client(context)
    except (SecAggError, ValueError, KeyError) as exc:  # corrupt saved state: start afresh
        logger.warning("discarding unreadable secure-aggregation state: %r", exc)
        client = SecAggClient(int(context.node_id))
    try:
        rec = msg.content.config_records[wire.RECORD_KEY]
        stage = Stage(int(cast(int, rec[wire.FIELD_STAGE])))
        payload = rec[wire.FIELD_PAYLOAD]
        if not isinstance(payload, bytes):
            raise MalformedMessageError("protocol payload is not bytes")
        server_msg = wire.decode(payload)
        reply: wire.Message
        if stage == Stage.MASKED_INPUT:
            masked = _on_masked_input(msg, context, client, server_msg, rec, call_next, encoder)
            if isinstance(masked, Message):
                _save_client(context, client)
                return masked  # the user's train function failed: its error goes back
            reply = masked
        else:
            reply = client.handle(server_msg)
    except (SecAggError, ValueError, KeyError) as exc:
        logger.warning("secure aggregation refused a message: %s: %s", type(exc).__name__, exc)
        _save_client(context, client)
        return _error_reply(msg, exc)
    _save_client(context, client)
    return _protocol_reply(msg, stage, reply)


def _on_masked_input(
    msg: Message,
    context: Context,
    client: SecAggClient,
    server_msg: wire.Message,
    rec: ConfigRecord,
    call_next: CallNext,
    encoder: Encoder,
) -> wire.Message | Message:
    a_key, c_key, w_key = str(rec["arrays-key"]), str(rec["config-key"]), str(rec["weight-key"])
    model = msg.content.array_records[a_key]
    cfg = msg.content.config_records.get(c_key, ConfigRecord())
    spec = UpdateSpec.from_config(dict(msg.content.config_records[wire.SPEC_KEY]))
    # The masks are keyed with the digest of exactly what this client trains on.
    digest = binding_digest([(k, v.numpy()) for k, v in model.items()], dict(cfg), spec.to_config())
    # The user's train function sees the ordinary train message of a plain round.
    train_msg = Message(content=RecordDict({a_key: model, c_key: cfg}), metadata=msg.metadata)  # type: ignore[call-overload]
    try:
        out = call_next(train_msg, context)
    except Exception as exc:  # the user's code failed: this client drops out of the round
        client.abandon()
        logger.warning("train function failed; leaving the secure round: %r", exc)
        return _error_reply(msg, exc, ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
    if out.has_error():
        client.abandon()
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
    delta = np.concatenate([(n.numpy() - g.numpy()).ravel() for n, g in zip(new.values(), model.values(), strict=True)])
    scalar_metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    encoded = encoder(delta, scalar_metrics, weight, spec, context)
    if encoded.clipped:
        logger.warning(
            "%d of %d update coordinates exceeded clip_range=%g and were clipped before masking",
            encoded.clipped, delta.size, spec.clip_range,
        )
    return client.handle(server_msg, vector=encoded.vector, bound_digest=digest)


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
