"""Client side: a Flower mod that runs SecAgg+ around the user's unchanged train and
evaluate functions.

Add it to every handler of a function-style ClientApp, ``app = ClientApp(mods=[secagg_mod])``
(or the mixin below for class-based clients); messages of any other type (query, ...)
pass through it untouched. Evaluate messages must pass through it too:
``ClientApp(mods=[...])`` does; ``@app.train(mods=[secagg_mod])`` alone does not, and the
server then stops at its first federated evaluation naming the fix.

This module is an adapter. The site itself, without Flower, is :mod:`sgs_flower.site`:
its policy and refusals (``--node-config`` keys ``sgs-*``, see
``sgs_flower.secagg.policy``; it assumes the server may lie), its identity, its state
file, model memory and DP spend, the update kept for a retry, the model key, the
evaluation round and the protocol instances between messages. Here a Flower ``Message``
becomes a :class:`~sgs_flower.site.request.Request` and the site's answer becomes the
reply (the protocol record, the masked vector packed at the round's width); the
site's run-scoped memory goes to ``Context.state`` (:class:`clients.records.ContextStore`);
the user's train and evaluate are called with the usual messages of a plain round, and
what they return is handed to the site, which turns it into the delta ``new - global``,
``num-examples`` and the metrics, encodes and masks them: only the masked vector leaves
the site. A refusal (:class:`~sgs_flower.site.state.Refused`) becomes a Flower error
reply that names the check, never a value of the site's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
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

from clients.confidential_site import key_reply
from clients.records import ContextStore, array_record, model_record, request_of
from sgs_flower.dp.site import SiteBudgetError
from sgs_flower.pipeline import EncodedUpdate, UpdateSpec, encode_update
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import EncodingError, ProtocolError
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.site import exchange
from sgs_flower.site.model_key import open_models
from sgs_flower.site.request import (
    PASS,
    Answer,
    EvaluateStep,
    KeyAnswer,
    ModelRecord,
    Pass,
    TrainReply,
    TrainStep,
    Unusable,
)
from sgs_flower.site.retry import KEPT_DELTA_SUFFIX, STALE_DELTA_SECONDS
from sgs_flower.site.state import MEMORY_STATE, Refused, identity, state_file
from sgs_flower.site.store import (
    BLS_VERIFIED_KEY,
    EVAL_NAMES_KEY,
    EVAL_STATE_KEY,
    FEDERATION_KEY,
    IDENTITY_KEY,
    KEPT_KEY,
    NAMES_KEY,
    PENDING_KEY,
    SITE_KEY,
    STATE_KEY,
)
from sgs_flower.site.train import check_spec_against_setup

__all__ = [
    "BLS_VERIFIED_KEY", "EVAL_NAMES_KEY", "EVAL_STATE_KEY", "FEDERATION_KEY", "IDENTITY_KEY", "KEPT_DELTA_SUFFIX",
    "KEPT_KEY", "MEMORY_STATE", "NAMES_KEY", "PENDING_KEY", "SITE_KEY", "STALE_DELTA_SECONDS", "STATE_KEY",
    "CallNext", "Encoder", "SecAggClientMixin", "check_spec_against_setup", "default_encoder", "run_secagg",
    "run_secure_evaluate", "secagg_mod",
]

CallNext = Callable[[Message, Context], Message]
# (delta, metrics, weight, spec, context) -> encoded words; the DP mixin swaps this in.
Encoder = Callable[[np.ndarray, dict[str, float], int, UpdateSpec, Context], EncodedUpdate]


def default_encoder(delta: np.ndarray, metrics: dict[str, float], weight: int, spec: UpdateSpec, context: Context) -> EncodedUpdate:
    return encode_update(delta, metrics, weight, spec)


# ---------------------------------------------------------------- the mod
def secagg_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Flower mod: run the secure-aggregation protocol for train and evaluate messages;
    any other message type (query, ...) goes to ``call_next`` untouched."""
    return run_secagg(msg, context, call_next, default_encoder)


def run_secagg(msg: Message, context: Context, call_next: CallNext, encoder: Encoder) -> Message:
    """Answer one train message through the site (evaluate ones: :func:`run_secure_evaluate`)."""
    arrived = time.monotonic()
    if msg.metadata.message_type == MessageType.EVALUATE:
        return run_secure_evaluate(msg, context, call_next, arrived)
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)

    def encode(delta: np.ndarray, metrics: dict[str, float], weight: int, spec: UpdateSpec) -> EncodedUpdate:
        return encoder(delta, metrics, weight, spec, context)

    try:
        out = exchange.on_train(int(context.node_id), context.node_config, ContextStore(context), request_of(msg),
                                _train_step(msg, context, call_next), encode, arrived)
    except Refused as refused:
        return _error_reply(msg, refused.cause)
    return _reply(msg, context, call_next, out)


def run_secure_evaluate(msg: Message, context: Context, call_next: CallNext, arrived: float | None = None) -> Message:
    """Answer one exchange of a secure evaluation round (``sgs_flower.evaluation``) through
    the site: at the masked-input stage the user's evaluate runs, and its metrics leave
    the site only masked. ``arrived``: when the message reached the mod (for
    ``sgs-reply-quantum``; now when not given)."""
    arrived = time.monotonic() if arrived is None else arrived
    try:
        out = exchange.on_evaluate(int(context.node_id), context.node_config, ContextStore(context), request_of(msg),
                                   _evaluate_step(msg, context, call_next), arrived)
    except Refused as refused:
        return _error_reply(msg, refused.cause)
    return _reply(msg, context, call_next, out)


def _reply(msg: Message, context: Context, call_next: CallNext, out: Answer | KeyAnswer | Pass) -> Message:
    if out is PASS:  # a plain message the site's policy admits: the user's code answers it
        return call_next(msg, context)
    if isinstance(out, KeyAnswer):
        return key_reply(msg, out)
    assert isinstance(out, Answer)
    return _protocol_reply(msg, out)


# ---------------------------------------------------------------- the user's code
def _plain_message(msg: Message, a_key: str, c_key: str, model: ModelRecord) -> Message:
    """The message the user's train or evaluate sees: the ordinary one of a plain round
    (the plaintext model, the config), with the request's metadata."""
    content = RecordDict({a_key: array_record(model), c_key: msg.content.config_records[c_key]})
    return Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]


def _train_step(msg: Message, context: Context, call_next: CallNext) -> TrainStep:
    """The user's train, called as Flower calls it; a raise, an error reply or a reply
    that is not one ArrayRecord and one MetricRecord is :class:`Unusable`."""
    def step(a_key: str, c_key: str, model: ModelRecord) -> TrainReply:
        try:
            out = call_next(_plain_message(msg, a_key, c_key, model), context)
        except Exception as exc:  # the user's code failed: this site sends an unusable vector
            raise Unusable("train step raised", repr(exc)) from exc
        if out.has_error():
            raise Unusable("train step raised", f"the train function replied with an error: {out.error.reason}")
        arrays = list(out.content.array_records.values())
        metric_recs = list(out.content.metric_records.values())
        if len(arrays) != 1 or len(metric_recs) != 1:
            raise Unusable("train reply malformed", f"train reply must hold exactly one ArrayRecord and one "
                           f"MetricRecord, got {len(arrays)} and {len(metric_recs)}")
        new = arrays[0]
        return TrainReply(list(new.keys()), lambda: [n.numpy() for n in new.values()], metric_recs[0])
    return step


def _evaluate_step(msg: Message, context: Context, call_next: CallNext) -> EvaluateStep:
    """The user's evaluate, called as Flower calls it; its one MetricRecord, else :class:`Unusable`."""
    def step(a_key: str, c_key: str, model: ModelRecord) -> Mapping[str, Any]:
        try:
            out = call_next(_plain_message(msg, a_key, c_key, model), context)
        except Exception as exc:
            raise Unusable("train step raised", f"the evaluate function raised: {exc!r}") from exc
        if out.has_error():
            raise Unusable("train step raised", f"the evaluate function replied with an error: {out.error.reason}")
        metric_recs = list(out.content.metric_records.values())
        if len(metric_recs) != 1:
            raise Unusable("train reply malformed", f"evaluate reply must hold exactly one MetricRecord, got "
                           f"{len(metric_recs)}")
        return metric_recs[0]
    return step


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


def _protocol_reply(msg: Message, answer: Answer) -> Message:
    rec = ConfigRecord({wire.FIELD_STAGE: int(answer.stage),
                        wire.FIELD_PAYLOAD: wire.encode(answer.reply, detach_vector=True)})
    if isinstance(answer.ahead, str):  # the next round's part was refused: the check's name only
        rec[wire.FIELD_NEXT_ERROR] = answer.ahead
    elif answer.ahead is not None:
        rec[wire.FIELD_NEXT_STAGE] = int(answer.ahead[0])
        rec[wire.FIELD_NEXT_PAYLOAD] = wire.encode(answer.ahead[1])
    if answer.names is not None:  # metric names in slot order, and those left out: names only, never values
        rec[wire.FIELD_METRIC_NAMES] = list(answer.names[0])
        rec[wire.FIELD_METRICS_LEFT_OUT] = list(answer.names[1])
    content = RecordDict({wire.RECORD_KEY: rec})
    reply = answer.reply
    if isinstance(reply, wire.MaskedInput | wire.RetryInput):
        # packed at the round's width (no np.save round trip); Flower still chunks the Array
        data = wire.pack_words(reply.vector, reply.field_bits)
        raw = Array(dtype="|u1", shape=(len(data),), stype=wire.PACKED_STYPE, data=data)
        content[wire.VECTOR_KEY] = ArrayRecord({wire.FIELD_VECTOR: raw})
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------- the site's files, from a Context
def _identity(context: Context, policy: ClientPolicy) -> bytes:
    """The site's identity key (its own, else the run's, kept in ``Context.state``)."""
    return identity(ContextStore(context), policy)


def _state_file(context: Context, policy: ClientPolicy, ident: bytes) -> Path | None:
    """The site's state file (None: kept in ``Context.state``, ``sgs-state-file=memory``)."""
    return state_file(int(context.node_id), policy, ident)


def _local_model_message(msg: Message, context: Context, policy: ClientPolicy, state_path: Path | None) -> Message:
    """The evaluate message the user's code would see for ``msg`` (protocol records
    removed): its key-masked models unmasked, or a refusal raised, as the site does
    before the user's evaluate runs (:func:`sgs_flower.site.model_key.open_models`)."""
    models = {k: model_record(v) for k, v in msg.content.array_records.items()}
    opened = open_models(models, int(msg.metadata.run_id), policy, ContextStore(context), state_path)
    if opened is models:
        return msg  # this site never took part in the model-confidential mode
    content = RecordDict(dict(msg.content.config_records))
    for name, model in opened.items():
        content[name] = array_record(model)
    return Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]


# ---------------------------------------------------------------- class-based clients
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

    def evaluate(self, msg: Message, context: Context) -> Message:  # pragma: no cover - user code
        raise NotImplementedError

    def secure_evaluate(self, msg: Message, context: Context) -> Message:
        """``@app.evaluate()`` counterpart of :meth:`secure_train`: the class's own
        ``evaluate``, its metrics aggregated securely."""
        return run_secure_evaluate(msg, context, self.evaluate)
