"""Client side: a Flower mod that runs SecAgg+ around the user's unchanged train and
evaluate functions.

Add it to every handler of a function-style ClientApp, ``app = ClientApp(mods=[secagg_mod])``
(or the mixin below for class-based clients); messages of any other type (query, ...)
pass through it untouched. The mod answers the protocol exchanges (five in a
round set up in full, three when the next round's keys rode on the previous round's
consistency and unmask exchanges: a message then carries a second part, which the mod
hands to the protocol client's instance of that round, see ``SecAggClient.handle_next``); at
the masked-input stage (the message that brings the global model and train config) it
calls the user's train function with the usual train message, turns the reply into the delta
``new - global`` plus ``num-examples`` and the train metrics, encodes and masks them,
and sends only the masked vector.

Evaluate messages (the mod must wrap the evaluate function too: ``ClientApp(mods=[...])``
does; ``@app.train(mods=[secagg_mod])`` alone does not, and the server then stops at its
first federated evaluation naming the fix) run the same protocol as a separate evaluation round
(:func:`run_secure_evaluate`): the user's evaluate runs at the masked-input stage and
only its masked metrics and ``num-examples`` leave the site.

The mod assumes the server may lie. It follows the site's :class:`ClientPolicy`
(``--node-config`` keys ``sgs-*``, see ``sgs_flower.secagg.policy``), never the server:

- a train or evaluate message without the protocol record is refused while the policy
  requires secure aggregation (the default), so a server cannot downgrade a site to plaintext;
- the site's Ed25519 identity key comes from its node config (``sgs-identity-key``);
  without one, a key is made for the run and kept in ``Context.state`` (a roster cannot
  pin such a key: see the README's threat model);
- under distributed DP the site computes the noise of the released sum from the whole
  spec, in its own units, and checks it against its own floor and budget
  (``sgs_flower.dp.site``) before it trains;
- every check that can refuse runs before training, on what the server sent (record
  names, spec) and the site's own policy: whether a site errs must not depend on its
  data. After training nothing is refused: a failed or unusable update is sent as the
  protocol's unusable vector (``pipeline.encode_failure``), counted inside the sum;
- error replies name the check that failed, never a value of the site's: the full
  message goes to the local log only; after any refusal the site leaves the round;
- the survivor sets it signed, sketches of the models it signed them for (no second
  set for a near copy, ``sgs_flower.secagg.model_memory``) and its DP spend live in a
  state file that outlasts the run (``sgs-state-file``, by default one per site under
  ``$SGS_STATE_DIR`` or ``$FLWR_HOME/sgs-flower/sites``).

Protocol state (keys and shares, a few hundred bytes) lives in ``Context.state``
between messages. The global model is never stored there; the site's own update (its
weight and metrics there, its delta in a file beside its state file) is kept from its
masked input until the next round's (or its last retry), so that a retry of the masked input (``Stage.RETRY``, docs/protocol.md
"Retry") re-encodes it at a wider range or another weight scale without retraining.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
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

from clients import confidential_site
from clients.records import read_arrays
from sgs_flower.confidential.masked_model import Layout, RoundContext, flat_model, layout_of, seal
from sgs_flower.dp.site import SiteAccountant, SiteBudgetError, SiteState, default_state_file
from sgs_flower.evaluation import (
    check_eval_spec,
    eval_binding_digest,
    eval_history_key,
    is_eval_round,
)
from sgs_flower.pipeline import (
    EncodedUpdate,
    UpdateSpec,
    binding_digest,
    check_retry_spec,
    encode_failure,
    encode_update,
    int_size_of,
    metric_slot_names,
    model_delta,
    model_digest,
    spec_digest,
)
from sgs_flower.secagg import bls, wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    EncodingError,
    InconsistentRequestError,
    MalformedMessageError,
    PolicyError,
    ProtocolError,
    SecAggError,
    StaleMessageError,
)
from sgs_flower.secagg.identity import generate_identity, identity_public
from sgs_flower.secagg.model_memory import (
    memory_entry,
    model_sketch,
    near_sets,
    remember,
    sketch_bytes,
    sketch_from_bytes,
)
from sgs_flower.secagg.policy import ClientPolicy, site_policy
from sgs_flower.secagg.wire import Stage

logger = logging.getLogger("sgs_flower.client")

STATE_KEY = "sgs.secagg.client"  # the protocol state machine (a few hundred bytes)
PENDING_KEY = "sgs.secagg.pending-model"  # sketch of the model trained on, until the survivor set is signed
NAMES_KEY = "sgs.secagg.metric-names"  # the metric names of the last usable train reply
KEPT_KEY = "sgs.secagg.kept"  # the round's update (metrics, weight, spec), kept for a retry of its masked input
KEPT_DELTA_SUFFIX = ".kept-delta.npy"  # ... and its delta (outside DP only), in a file beside the site's state
STALE_DELTA_SECONDS = 3600.0  # a kept delta this old is left over from an earlier run
MEMORY_STATE = "memory"  # sgs-state-file value: remember only for this run
IDENTITY_KEY = "sgs.secagg.identity"  # a run-scoped identity, when the site configured none
FEDERATION_KEY = "sgs.secagg.federation"  # identity keys learnt at the run's first round (no roster)
BLS_VERIFIED_KEY = "sgs.secagg.bls-verified"  # digests of the peers' BLS keys this site checked (bls.py)
SITE_KEY = "sgs.secagg.site"  # SiteState, when the site configured no state file

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._:/+-]{0,63}")
_PROTOCOL_RECORDS = {wire.RECORD_KEY, wire.SPEC_KEY, wire.VECTOR_KEY}

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


def _state_file(context: Context, policy: ClientPolicy, ident: bytes) -> Path | None:
    """The site's state file: its own, else the default one (named by its identity key's
    fingerprint when it configured one, else by its node id); None for ``memory``."""
    if policy.state_file == MEMORY_STATE:
        return None
    if policy.state_file:
        return Path(policy.state_file)
    if policy.identity_key is not None:
        name = "identity-" + hashlib.sha256(identity_public(ident)).hexdigest()[:24]
    else:
        name = f"node-{int(context.node_id)}"
    return default_state_file(name)


def _load_site(context: Context, path: Path | None) -> SiteState:
    """The site's state from ``path`` (:func:`_state_file`), or from the run's
    ``Context.state`` when it is None."""
    if path is not None:
        if path.exists():
            return SiteState.load(path)
        site = SiteState()
        site.save(path)  # its sketch key must be the same at every later message
        return site
    rec = context.state.config_records.get(SITE_KEY)
    if rec is not None:
        return SiteState.from_json(str(rec["json"]))
    site = SiteState()
    context.state[SITE_KEY] = ConfigRecord({"json": site.to_json()})  # keep the run's sketch key
    return site


def _save_site(context: Context, path: Path | None, site: SiteState) -> None:
    if path is not None:
        site.save(path)
    else:
        context.state[SITE_KEY] = ConfigRecord({"json": site.to_json()})


def _load_client(context: Context, ident: bytes, policy: ClientPolicy, site: SiteState) -> SecAggClient:
    rec = context.state.config_records.get(STATE_KEY)
    client = (
        SecAggClient(int(context.node_id), identity=ident, policy=policy)
        if rec is None
        else SecAggClient.from_state_dict(dict(rec), ident, policy)
    )
    _from_site(context, client, site)
    return client


def _save_client(context: Context, client: SecAggClient) -> None:
    context.state[STATE_KEY] = ConfigRecord(client.state_dict())
    _save_run_memory(context, client)


def _from_site(context: Context, client: SecAggClient, site: SiteState) -> None:
    """Hand a protocol instance (train or evaluation) what the site remembers: the sets it
    signed and the roster epochs it signed under (its state file), and the run's memory
    (:func:`_load_run_memory`)."""
    client.history = dict(site.history) | client.history
    client.roster_epochs = list(site.roster_epochs)
    _load_run_memory(context, client)


def _into_site(client: SecAggClient, site: SiteState) -> None:
    """Take back what a consistency stage added to the site's memory (saved by the caller)."""
    site.history = dict(client.history)
    site.roster_epochs = list(client.roster_epochs)


def _load_run_memory(context: Context, client: SecAggClient) -> None:
    """The federation learnt at the run's first round (whole-group participation without
    a roster, :mod:`sgs_flower.secagg.groups`): one record for the train and the
    evaluation instances, so both check survivor sets against the same groups. Also the
    peers' BLS keys this site already checked (a deployed site runs each message in a new
    process: :func:`sgs_flower.secagg.bls.trust_verified`)."""
    rec = context.state.config_records.get(FEDERATION_KEY)
    if rec is not None:
        client.federation = frozenset(bytes(k) for k in rec["keys"])  # type: ignore[union-attr,arg-type]
    verified = context.state.config_records.get(BLS_VERIFIED_KEY)
    if verified is not None:
        bls.trust_verified(bytes(verified["digests"]))  # type: ignore[arg-type]


def _save_run_memory(context: Context, client: SecAggClient) -> None:
    if client.federation and FEDERATION_KEY not in context.state.config_records:
        context.state[FEDERATION_KEY] = ConfigRecord({"keys": sorted(client.federation)})
    count = bls.verified_count()  # joined only when the site checked new keys (every message passes here)
    kept = context.state.config_records.get(BLS_VERIFIED_KEY)
    if count and (kept is None or len(bytes(kept["digests"])) != count * bls.DIGEST_BYTES):  # type: ignore[arg-type]
        context.state[BLS_VERIFIED_KEY] = ConfigRecord({"digests": bls.verified_digests()})


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
    if isinstance(reply, wire.MaskedInput | wire.RetryInput):
        # packed at the round's width (no np.save round trip); Flower still chunks the Array
        data = wire.pack_words(reply.vector, reply.field_bits)
        raw = Array(dtype="|u1", shape=(len(data),), stype=wire.PACKED_STYPE, data=data)
        content[wire.VECTOR_KEY] = ArrayRecord({wire.FIELD_VECTOR: raw})
    return Message(content, reply_to=msg)


def _stage(rec: ConfigRecord) -> Stage:
    raw = rec.get(wire.FIELD_STAGE)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw not in {int(s) for s in Stage}:
        raise MalformedMessageError("protocol record names no valid stage")
    return Stage(raw)


# ---------------------------------------------------------------- the mod
def secagg_mod(msg: Message, context: Context, call_next: CallNext) -> Message:
    """Flower mod: run the secure-aggregation protocol for train and evaluate messages;
    any other message type (query, ...) goes to ``call_next`` untouched."""
    return run_secagg(msg, context, call_next, default_encoder)


def _answer_at_quantum(arrived: float, policy: ClientPolicy) -> None:
    """Hold a masked-input reply until a multiple of ``sgs-reply-quantum`` after the
    request arrived (issue 29): the site trains inside that exchange, so an immediate
    reply tells the server its training time, which grows with its num-examples
    (measured: ~0.15 ms per example, docs/threat_model.md). With a quantum above the
    longest training the reply time is the quantum for every site."""
    if policy.reply_quantum <= 0:
        return
    elapsed = time.monotonic() - arrived
    target = max(1, math.ceil(elapsed / policy.reply_quantum)) * policy.reply_quantum
    time.sleep(max(0.0, target - elapsed))


def run_secagg(msg: Message, context: Context, call_next: CallNext, encoder: Encoder) -> Message:
    arrived = time.monotonic()
    if msg.metadata.message_type == MessageType.EVALUATE:
        return run_secure_evaluate(msg, context, call_next, arrived)
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    policy = _policy_or_refusal(msg, context)
    if isinstance(policy, Message):
        return policy
    if confidential_site.KEY_RECORD in msg.content.config_records:
        return _on_key_message(msg, context, policy)
    if wire.RECORD_KEY not in msg.content.config_records:
        if policy.require_secure_aggregation:
            logger.warning("refused a plain train message: this site requires secure aggregation")
            return _error_reply(msg, PolicyError(
                "this site requires secure aggregation and refuses a plain train message (a site that "
                "accepts plain rounds sets sgs-require-secagg=false in its node config or SGS_NODE_CONFIG)"
            ))
        return call_next(msg, context)
    ident = _identity(context, policy)
    state_path = _state_file(context, policy, ident)
    site = _site_or_refusal(msg, context, state_path)
    if isinstance(site, Message):
        return site
    try:
        client = _load_client(context, ident, policy, site)
    except (SecAggError, ValueError, KeyError, TypeError) as exc:  # corrupt saved state: start afresh
        logger.warning("discarding unreadable secure-aggregation state: %r", exc)
        client = SecAggClient(int(context.node_id), identity=ident, policy=policy)
        _from_site(context, client, site)
    try:
        rec, stage, server_msg = _protocol_part(msg)
        if is_eval_round(server_msg.round_id):
            raise StaleMessageError("a train message carries an evaluation round's id; refused (rounds of the two "
                                    "kinds never mix)")
        reply: wire.Message
        names: tuple[list[str], list[str]] | None = None
        if stage == Stage.MASKED_INPUT:
            client.expect_masked_input(server_msg)
            reply, names = _on_masked_input(msg, context, client, server_msg, rec, call_next, encoder, policy, site,
                                            state_path)
            _answer_at_quantum(arrived, policy)
        elif stage == Stage.RETRY:
            reply = _on_retry(msg, context, client, server_msg, encoder, policy, state_path)
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
    if stage == Stage.CONSISTENCY:  # the signed survivor set is remembered (never twice), with the model's sketch
        _into_site(client, site)
        pending = context.state.config_records.get(PENDING_KEY)
        if pending is not None and str(pending["digest"]) in site.history:
            digest = bytes.fromhex(str(pending["digest"]))
            sketch = sketch_from_bytes(bytes(pending["sketch"]))  # type: ignore[arg-type]
            entry = memory_entry(digest, site.history[digest.hex()], sketch, float(pending["step"]))  # type: ignore[arg-type]
            site.models = remember(site.models, entry)
        _save_site(context, state_path, site)
    return _protocol_reply(msg, stage, reply, names, ahead)


def _policy_or_refusal(msg: Message, context: Context) -> ClientPolicy | Message:
    """The site's policy, or the error reply when its own configuration is broken: it
    says so and takes no part (it neither trains nor evaluates)."""
    try:
        return _policy(context)
    except SecAggError as exc:
        logger.error("secure aggregation: bad site policy: %s", exc)
        return _error_reply(msg, PolicyError(f"this site's secure-aggregation policy is invalid ({type(exc).__name__})"))


def _site_or_refusal(msg: Message, context: Context, state_path: Path | None) -> SiteState | Message:
    """The site's state, or the error reply when it cannot be read. Never start afresh
    here: that would forget the site's privacy spend and the survivor sets it signed;
    the site's operator must repair or move the file."""
    try:
        return _load_site(context, state_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.error("secure aggregation: unreadable site state: %r", exc)
        return _error_reply(msg, PolicyError("this site's state (sgs-state-file) is unreadable; it does not take part"))


def _on_key_message(msg: Message, context: Context, policy: ClientPolicy) -> Message:
    """A model-key request (model-confidential mode): answered without training."""
    try:
        ident = _identity(context, policy)
        return confidential_site.on_key_message(msg, context, ident, policy, _state_file(context, policy, ident))
    except Exception as exc:
        logger.warning("model-key request refused: %s: %s", type(exc).__name__, exc)
        return _error_reply(msg, exc)


def _protocol_part(msg: Message) -> tuple[ConfigRecord, Stage, wire.Message]:
    """The request's protocol record, its stage and its decoded payload (size-limited by
    :func:`wire.decode`); the record's stage must be the payload's."""
    rec = msg.content.config_records[wire.RECORD_KEY]
    stage = _stage(rec)
    payload = rec.get(wire.FIELD_PAYLOAD)
    if not isinstance(payload, bytes):
        raise MalformedMessageError("protocol payload is not bytes")
    server_msg = wire.decode(payload)
    if server_msg.stage != stage:
        raise MalformedMessageError("protocol record's stage differs from its payload's")
    return rec, stage, server_msg


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
    if is_eval_round(next_msg.round_id):
        raise StaleMessageError("the next round's part carries an evaluation round's id; refused")
    return Stage(raw), next_msg


def _record_names(rec: ConfigRecord, msg: Message) -> tuple[str, str, str]:
    """The server-chosen names of the model's ArrayRecord, the train ConfigRecord and the
    weight metric, checked before training: each a plain name; the two records present
    in the request, distinct, and not protocol records (a name the user's train step
    does not expect would make it fail, and a failure must not depend on the site)."""
    names = []
    for field in ("arrays-key", "config-key", "weight-key"):
        value = rec.get(field)
        if not isinstance(value, str) or not _NAME.fullmatch(value):
            raise MalformedMessageError(
                f"protocol record field {field!r} must be a name of 1..64 letters, digits or ' ._:/+-'"
            )
        names.append(value)
    a_key, c_key, w_key = names
    if {a_key, c_key} & _PROTOCOL_RECORDS or a_key == c_key:
        raise MalformedMessageError("arrays-key and config-key must name two different records, not protocol records")
    if a_key not in msg.content.array_records:
        raise MalformedMessageError(f"arrays-key {a_key!r} names no ArrayRecord of the masked-input request")
    if c_key not in msg.content.config_records:
        raise MalformedMessageError(f"config-key {c_key!r} names no ConfigRecord of the masked-input request")
    return a_key, c_key, w_key


class _Unusable(Exception):
    """The site's update cannot be used; carried inside the masked vector, never as an
    error reply (``reason`` is one of :data:`FAILURE_REASONS`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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
    state_path: Path | None,
) -> tuple[wire.Message, tuple[list[str], list[str]]]:
    """Check everything the server chose, train, encode, mask.

    Every check that can refuse runs before training on what the server sent and the
    site's own policy and state (so it fails the same way whatever the site's data).
    After training nothing is refused: a train step that raised, a malformed reply, a
    weight out of range or a non-finite value makes the site send :func:`encode_failure`
    instead, a vector of the same length at the same stage with the reason counted
    inside it (outside DP) or a noisy flag (under DP)."""
    a_key, c_key, w_key = _record_names(rec, msg)
    if wire.SPEC_KEY not in msg.content.config_records:
        raise MalformedMessageError("masked-input request lacks the update spec")
    wire_model = msg.content.array_records[a_key]
    cfg = msg.content.config_records[c_key]
    spec = UpdateSpec.from_config(dict(msg.content.config_records[wire.SPEC_KEY]))
    check_spec_against_setup(spec, client.round_setup())
    policy.check_width(spec.field_bits)
    if policy.require_distributed_dp and spec.dp_mode != "distributed":
        raise PolicyError("this site requires distributed DP (sgs-require-dp) and the round's spec has none")
    if policy.require_confidential and not spec.model_key:
        raise PolicyError("this site requires the model-confidential mode (sgs-require-confidential) and the "
                          "round's spec names no model key")
    key_state = None
    model = wire_model
    if spec.model_key:  # the model the user's code trains on: unmasked here, MAC and freshness checked
        key_state = confidential_site.load_key_state(context, state_path, policy)
        model, key_state = confidential_site.open_model(wire_model, spec.model_key, server_msg.run_id, key_state)
        confidential_site.save_key_state(context, state_path, key_state)
    named = read_arrays(model)
    model_size = int(sum(a.size for _, a in named))
    if spec.dp_mode == "none" and spec.int_size != int_size_of([a for _, a in named]):
        raise MalformedMessageError("the update spec's int_size does not match the global model's integer entries")
    if spec.vector_length(model_size) > policy.max_vector_length:
        raise PolicyError("the round's vector exceeds this site's limit (sgs-max-vector)")
    # The model is hashed once: its digest keys the masks (with config and spec) and is
    # what the site remembers so that one model is never aggregated twice.
    m_digest = model_digest(named if model is wire_model else read_arrays(wire_model))
    digest = binding_digest(m_digest, dict(cfg), spec.to_config())
    sketch = model_sketch((a for _, a in named), bytes.fromhex(site.sketch_key))
    if spec.dp_mode == "distributed":
        accountant = SiteAccountant(policy.dp_min_noise_multiplier, policy.dp_max_epsilon, policy.dp_delta,
                                    list(site.dp_events))
        eps = accountant.admit(spec.dp_contribution(model_size))
        site.dp_events = accountant.events
        _save_site(context, state_path, site)  # spent before the masked input leaves the site
        logger.info("distributed DP: this site's epsilon against the server is now %.4g (delta %g)", eps, policy.dp_delta)
    # The user's train function sees the ordinary train message of a plain round.
    train_msg = Message(content=RecordDict({a_key: model, c_key: cfg}), metadata=msg.metadata)  # type: ignore[call-overload]
    names = _remembered_names(context, spec)
    step = 0.0
    failed = ""
    delta = np.zeros(0)
    scalar_metrics: dict[str, Any] = {}
    weight = 0
    try:
        delta, scalar_metrics, weight, names = _train_and_check(train_msg, context, call_next, model, named, w_key, spec)
        step = float(np.linalg.norm(delta))
        if not np.isfinite(step) or not all(np.isfinite(v) for v in scalar_metrics.values()):
            raise _Unusable("non-finite update or metric", "the update or a train metric holds NaN or inf")
        if spec.model_key:  # this mode sums whole models (the server's rule is the identity)
            delta = delta + flat_model([a for _, a in named])
        try:
            encoded = encoder(delta, scalar_metrics, weight, spec, context)
        except Exception as exc:  # a custom encoder's failure may depend on the data too: never an error reply
            raise _Unusable("the site's encoder raised", repr(exc)) from exc
    except _Unusable as exc:
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
    if spec.dp_mode != "none":
        names = ([], [])
    layout = layout_of(named)
    if key_state is not None:
        seal(encoded.vector, key_state.key, RoundContext(server_msg.run_id, server_msg.round_id, spec, layout), 0,
             int(context.node_id), model_size)
    near = near_sets(site.models, sketch, step, policy.min_model_change)
    masked = client.handle(server_msg, vector=encoded.vector, bound_digest=digest, model_digest=m_digest,
                           min_survivors=spec.min_survivors if spec.dp_mode == "distributed" else 0,
                           near_sets=near)
    context.state[PENDING_KEY] = ConfigRecord({"digest": m_digest.hex(), "sketch": sketch_bytes(sketch), "step": step})
    _keep(context, server_msg, spec, model_size, failed, delta if not failed else None, scalar_metrics, weight,
          _kept_delta_file(context, state_path), layout)
    return masked, names


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


def _kept_delta_file(context: Context, state_path: Path | None) -> Path:
    """Where the site keeps its round's delta for a retry: beside its state file (or
    where the default one would be, for a ``memory`` site), one file per site, replaced
    each round.

    Why a file and not ``Context.state``: the context travels with every message (to a
    Ray actor in simulation, to the ``flwr-clientapp`` process in a deployment), so a
    model-sized delta there was copied at every consistency and unmask message (at
    m = 5e6 and 50 sites those two exchanges went from 0.25 and 0.45 s to 1.3 and 1.6 s)."""
    state = state_path or default_state_file(f"node-{int(context.node_id)}")
    return state.with_name(f"{state.stem}{KEPT_DELTA_SUFFIX}")


def _collect_stale_deltas(folder: Path, keep: Path) -> None:
    """Delete kept deltas in ``folder`` older than an hour, other than ``keep``: a run's
    last round leaves its sites' files (no message says no retry will come), and in a
    simulation every run's nodes have new ids, so new names."""
    cutoff = time.time() - STALE_DELTA_SECONDS
    for f in folder.glob(f"*{KEPT_DELTA_SUFFIX}"):
        try:
            if f != keep and f.stat().st_mtime < cutoff:
                f.unlink(missing_ok=True)
        except OSError:  # another site's process removed it first
            continue


def _drop_kept_delta(path: str) -> None:
    if path:
        Path(path).unlink(missing_ok=True)


def _keep(
    context: Context, server_msg: wire.Message, spec: UpdateSpec, model_size: int, failed: str,
    delta: np.ndarray | None, metrics: dict[str, Any], weight: int, delta_file: Path, layout: Layout = (),
) -> None:
    """Keep this round's update until the next round's masked input, for a retry of its
    masked input (re-encoded, never retrained). Under DP only the spec is kept (a retry
    is refused there); a site whose update was unusable keeps only the reason. The delta
    goes to ``delta_file`` (see :func:`_kept_delta_file`), written atomically."""
    old = context.state.config_records.get(KEPT_KEY)
    if old is not None:
        _drop_kept_delta(str(old.get("delta-file", "")))
    keep_delta = delta is not None and spec.dp_mode == "none"
    if keep_delta:
        assert delta is not None
        delta_file.parent.mkdir(parents=True, exist_ok=True)
        _collect_stale_deltas(delta_file.parent, delta_file)
        tmp = delta_file.with_name(delta_file.name + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(delta), allow_pickle=False)
        tmp.replace(delta_file)
    context.state[KEPT_KEY] = ConfigRecord({
        "run": int(server_msg.run_id), "round": int(server_msg.round_id), "spec": json.dumps(spec.to_config()),
        "retries": "[]", "failed": failed, "model-size": model_size, "weight": int(weight),
        "metric-names": list(metrics), "metric-values": [float(v) for v in metrics.values()],
        "delta-file": str(delta_file) if keep_delta else "",
        "layout": json.dumps([list(e) for e in layout]),  # the model-confidential mode seals a retry with it
    })


def _on_retry(
    msg: Message, context: Context, client: SecAggClient, server_msg: wire.Message, encoder: Encoder,
    policy: ClientPolicy, state_path: Path | None,
) -> wire.Message:
    """A retry of this round's masked input (docs/protocol.md, "Retry"): every check runs
    on what the server sent and the site's own state (never its data) before anything is
    encoded; then the kept update is re-encoded under the retry spec (or the unusable
    vector again, for a site whose update was unusable) and masked under the retry's
    context. Nothing after the checks can fail, so the reply's kind never depends on
    the site's data."""
    client.expect_retry(server_msg)
    kept = context.state.config_records.get(KEPT_KEY)
    if kept is None or (int(kept["run"]), int(kept["round"])) != (server_msg.run_id, server_msg.round_id):  # type: ignore[arg-type]
        raise StaleMessageError(f"this site keeps no update of round {server_msg.round_id} to retry")
    if wire.SPEC_KEY not in msg.content.config_records:
        raise MalformedMessageError("retry request lacks the retry spec")
    new = UpdateSpec.from_config(dict(msg.content.config_records[wire.SPEC_KEY]))
    base = UpdateSpec.from_config(json.loads(str(kept["spec"])))
    earlier = [UpdateSpec.from_config(d) for d in json.loads(str(kept["retries"]))]
    check_retry_spec(base, earlier, new)
    model_size = int(kept["model-size"])  # type: ignore[arg-type]
    failed = str(kept["failed"])
    delta_file = str(kept.get("delta-file", ""))
    if not failed and not (delta_file and Path(delta_file).exists()):
        raise StaleMessageError("this site no longer keeps its update of this round")
    encoded: EncodedUpdate | None = None
    if not failed:
        delta = np.load(delta_file, allow_pickle=False)
        names_raw, values_raw = kept["metric-names"], kept["metric-values"]
        assert isinstance(names_raw, list) and isinstance(values_raw, list)
        metrics = {str(k): float(v) for k, v in zip(names_raw, values_raw, strict=True)}  # type: ignore[arg-type]
        try:
            encoded = encoder(delta, metrics, int(kept["weight"]), new, context)  # type: ignore[arg-type]
        except Exception as exc:  # the first encoding succeeded; whatever happens, never an error reply
            logger.warning("re-encoding this site's update for the retry failed: %r", exc)
            failed = "the site's encoder raised"
    if encoded is None:
        encoded = encode_failure(new, model_size, failed)
    if new.model_key:  # sealed under the key again, with this attempt's masks and MAC
        key_state = confidential_site.load_key_state(context, state_path, policy)
        if key_state.key_id != new.model_key:
            raise StaleMessageError("this site no longer holds the round's model key")
        layout: Layout = tuple((str(k), tuple(int(d) for d in shape), str(dt))
                               for k, shape, dt in json.loads(str(kept["layout"])))
        seal(encoded.vector, key_state.key, RoundContext(server_msg.run_id, server_msg.round_id, new, layout),
             len(earlier) + 1, int(context.node_id), model_size)
    reply = client.handle(server_msg, vector=encoded.vector, bound_digest=spec_digest(new))
    retries = [*json.loads(str(kept["retries"])), new.to_config()]
    kept["retries"] = json.dumps(retries)
    if len(retries) >= wire.MAX_RETRIES:
        _drop_kept_delta(delta_file)
        kept["delta-file"] = ""
    logger.info("answered retry %d of round %s at range +-%g (integer entries +-%g), weight scale %d",
                len(retries), server_msg.round_id, new.clip_range, new.int_clip_range, new.weight_unit)
    return reply


def _remembered_names(context: Context, spec: UpdateSpec) -> tuple[list[str], list[str]]:
    """The metric names a site whose update is unusable reports: those of its last usable
    train reply, split into slots under this round's spec, as a usable reply would be.
    (A site that fails in its first round of a run has none to report: see
    docs/threat_model.md.)"""
    rec = context.state.config_records.get(NAMES_KEY)
    if rec is None:
        return [], []
    template: dict[str, Any] = {str(n): 0.0 for n in rec["numeric"]} | {str(n): "" for n in rec["other"]}  # type: ignore[union-attr]
    slots, left_out = metric_slot_names(template, spec)
    return list(slots), list(left_out)


def _remember_names(context: Context, metrics: dict[str, Any], w_key: str) -> None:
    numeric = sorted(k for k, v in metrics.items() if k != w_key and isinstance(v, int | float)
                     and not isinstance(v, bool))
    other = sorted(k for k in metrics if k != w_key and k not in numeric)
    context.state[NAMES_KEY] = ConfigRecord({"numeric": numeric, "other": other})


def _train_and_check(
    train_msg: Message,
    context: Context,
    call_next: CallNext,
    model: ArrayRecord,
    named: list[tuple[str, np.ndarray]],
    w_key: str,
    spec: UpdateSpec,
) -> tuple[np.ndarray, dict[str, Any], int, tuple[list[str], list[str]]]:
    """The user's training and the checks of its reply; raises :class:`_Unusable`."""
    try:
        out = call_next(train_msg, context)
    except Exception as exc:  # the user's code failed: this site sends an unusable vector
        raise _Unusable("train step raised", repr(exc)) from exc
    if out.has_error():
        raise _Unusable("train step raised", f"the train function replied with an error: {out.error.reason}")
    arrays = list(out.content.array_records.values())
    metric_recs = list(out.content.metric_records.values())
    if len(arrays) != 1 or len(metric_recs) != 1:
        raise _Unusable("train reply malformed", f"train reply must hold exactly one ArrayRecord and one "
                        f"MetricRecord, got {len(arrays)} and {len(metric_recs)}")
    new, metrics = arrays[0], metric_recs[0]
    if list(new.keys()) != list(model.keys()):
        raise _Unusable("train reply malformed", "train reply's arrays do not match the global model's keys")
    # Every numeric metric but the weight takes a slot (sorted by name); under DP none does.
    other: dict[str, Any] = {k: v for k, v in metrics.items() if k != w_key}
    names = metric_slot_names(other, spec)
    _remember_names(context, dict(metrics), w_key)
    if names[1] and spec.metric_slots:
        logger.warning("train metrics %s are not aggregated: more than metric_slots=%d numeric metrics, or not "
                       "numbers (the server is told their names)", names[1], spec.metric_slots)
    if w_key not in metrics:
        raise _Unusable("train reply malformed", f"train reply's metrics lack '{w_key}', the weight of its update")
    raw_weight = metrics[w_key]
    max_weight = spec.max_weight if spec.dp_mode == "none" else None
    if (isinstance(raw_weight, bool) or not isinstance(raw_weight, int | float) or not np.isfinite(raw_weight)
            or float(raw_weight) != int(raw_weight)):
        raise _Unusable("train reply malformed", f"'{w_key}' must be a whole number, got {raw_weight!r}")
    weight = int(raw_weight)
    if max_weight is not None and not 1 <= weight <= max_weight:  # under DP every client has weight 1
        raise _Unusable("weight outside 1..max_weight", f"'{w_key}' = {weight} is outside 1..{max_weight} "
                        "(max_weight); raise max-weight on the server")
    # Float entries, then integer ones (BatchNorm counters): each part has its own range.
    try:
        delta = model_delta([n.numpy() for n in new.values()], [g for _, g in named])
    except EncodingError as exc:
        raise _Unusable("train reply malformed", str(exc)) from exc
    scalar_metrics: dict[str, Any] = {k: float(v) for k, v in other.items() if k in names[0]}
    return delta, scalar_metrics, weight if spec.dp_mode == "none" else 1, (list(names[0]), list(names[1]))


# ---------------------------------------------------------------- secure evaluation
EVAL_STATE_KEY = "sgs.secagg.eval-client"  # the evaluation rounds' own protocol instance
EVAL_NAMES_KEY = "sgs.secagg.eval-metric-names"  # the metric names of the last usable evaluate reply


def _local_model_message(msg: Message, context: Context, policy: ClientPolicy, state_path: Path | None) -> Message:
    """The evaluate message the user's code sees, from the request's model and config
    (protocol records already removed). The one place the evaluated model reaches the
    site's code: in the model-confidential mode the key-masked model is unmasked here
    (MAC and freshness checked, :func:`confidential_site.open_for_evaluation`), before
    the user's evaluate runs, and a plaintext model is refused once this site unmasked
    the run's masked one; a refusal (an unreadable key file included) is an error reply
    before the user's code runs, never one that depends on the site's data."""
    records = msg.content.array_records
    masked = any(confidential_site.is_masked(a) for a in records.values())
    if not masked and not confidential_site.has_key_state(context, state_path):
        return msg  # this site never took part in the model-confidential mode
    state = confidential_site.load_key_state(context, state_path, policy)
    content = RecordDict({k: v for k, v in msg.content.config_records.items()})
    for name, arrays in records.items():
        plain, state = confidential_site.open_for_evaluation(arrays, msg.metadata.run_id, state)
        content[name] = plain
    if masked:  # the newest model it unmasked moved on
        confidential_site.save_key_state(context, state_path, state)
    return Message(content=content, metadata=msg.metadata)  # type: ignore[call-overload]


def run_secure_evaluate(msg: Message, context: Context, call_next: CallNext, arrived: float | None = None) -> Message:
    """Answer one exchange of a secure evaluation round (``sgs_flower.evaluation``).

    The same protocol as training, on its own protocol instance (``EVAL_STATE_KEY``), so
    a train round set up ahead is never disturbed; only evaluation round ids are accepted
    here, and never a pipelined part. At the masked-input stage the user's evaluate runs
    (:func:`_evaluate_and_encode`); its metrics leave the site only masked. A plain
    evaluate message is refused while the site requires secure aggregation: it would
    send this site's metrics to the server in the clear. ``arrived``: when the message
    reached the mod (for ``sgs-reply-quantum``; now when not given)."""
    arrived = time.monotonic() if arrived is None else arrived
    policy = _policy_or_refusal(msg, context)
    if isinstance(policy, Message):
        return policy
    if wire.RECORD_KEY not in msg.content.config_records:
        if policy.require_secure_aggregation:
            logger.warning("refused a plain evaluate message: this site requires secure aggregation")
            return _error_reply(msg, PolicyError(
                "this site requires secure aggregation and refuses a plain evaluate message, which would send its "
                "evaluation metrics to the server in the clear (run the server with SecAggStrategy, which evaluates "
                "securely; a site that accepts plain rounds sets sgs-require-secagg=false)"
            ))
        return call_next(msg, context)
    ident = _identity(context, policy)
    state_path = _state_file(context, policy, ident)
    site = _site_or_refusal(msg, context, state_path)
    if isinstance(site, Message):
        return site
    rec_state = context.state.config_records.get(EVAL_STATE_KEY)
    try:
        client = (SecAggClient(int(context.node_id), identity=ident, policy=policy) if rec_state is None
                  else SecAggClient.from_state_dict(dict(rec_state), ident, policy))
    except (SecAggError, ValueError, KeyError, TypeError) as exc:
        logger.warning("discarding unreadable secure-evaluation state: %r", exc)
        client = SecAggClient(int(context.node_id), identity=ident, policy=policy)
    _from_site(context, client, site)
    try:
        rec, stage, server_msg = _protocol_part(msg)
        if not is_eval_round(server_msg.round_id):
            raise StaleMessageError("an evaluate message carries a train round's id; refused (rounds of the two "
                                    "kinds never mix)")
        if wire.FIELD_NEXT_PAYLOAD in rec or wire.FIELD_NEXT_STAGE in rec:
            raise MalformedMessageError("an evaluation round is never pipelined: its message carries no next part")
        reply: wire.Message
        names: tuple[list[str], list[str]] | None = None
        if stage == Stage.MASKED_INPUT:
            client.expect_masked_input(server_msg)
            reply, names = _evaluate_and_encode(msg, context, client, server_msg, rec, call_next, policy, state_path)
            _answer_at_quantum(arrived, policy)
        elif stage == Stage.RETRY:
            raise StaleMessageError("an evaluation round has no retry (its weight scale is max_weight)")
        else:
            reply = client.handle(server_msg)
    except Exception as exc:
        logger.warning("secure evaluation refused a message: %s: %s", type(exc).__name__, exc)
        client.abandon()
        _save_eval_client(context, client)
        return _error_reply(msg, exc)
    _save_eval_client(context, client)
    if stage == Stage.CONSISTENCY:  # the signed survivor set is remembered, under the evaluation's own key
        _into_site(client, site)
        _save_site(context, state_path, site)
    return _protocol_reply(msg, stage, reply, names)


def _save_eval_client(context: Context, client: SecAggClient) -> None:
    """The evaluation instance's state, without the survivor-set memory: that lives in
    the site's state (reloaded at every message), and ``Context.state`` travels with
    every message, so it is not carried twice (the train instance already carries it)."""
    state = client.state_dict()
    state["history_models"], state["history_sets"] = [], []
    context.state[EVAL_STATE_KEY] = ConfigRecord(state)
    _save_run_memory(context, client)


def _evaluate_and_encode(
    msg: Message,
    context: Context,
    client: SecAggClient,
    server_msg: wire.Message,
    rec: ConfigRecord,
    call_next: CallNext,
    policy: ClientPolicy,
    state_path: Path | None,
) -> tuple[wire.Message, tuple[list[str], list[str]]]:
    """Check what the server chose, run the user's evaluate, encode and mask its metrics.

    As in training, every check that can refuse runs first, on what the server sent; after
    the user's code ran nothing is refused: an evaluate that raised or replied unusably
    makes the site send :func:`encode_failure` (weight 0, counted inside the sum), so the
    server cannot tell from the reply which site failed."""
    a_key, c_key, w_key = _record_names(rec, msg)
    if wire.SPEC_KEY not in msg.content.config_records:
        raise MalformedMessageError("masked-input request lacks the update spec")
    spec = UpdateSpec.from_config(dict(msg.content.config_records[wire.SPEC_KEY]))
    check_eval_spec(spec, policy.max_vector_length)
    model = msg.content.array_records[a_key]
    cfg = msg.content.config_records[c_key]
    m_digest = model_digest(read_arrays(model))
    digest = eval_binding_digest(m_digest, dict(cfg), spec)
    plain = Message(content=RecordDict({a_key: model, c_key: cfg}), metadata=msg.metadata)  # type: ignore[call-overload]
    eval_msg = _local_model_message(plain, context, policy, state_path)
    names = _remembered_eval_names(context, spec)
    try:
        metrics, weight, names = _evaluate_and_check(eval_msg, context, call_next, w_key, spec)
        encoded = encode_update(np.zeros(0), metrics, weight, spec)
    except _Unusable as exc:
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
    eval_msg: Message, context: Context, call_next: CallNext, w_key: str, spec: UpdateSpec,
) -> tuple[dict[str, float], int, tuple[list[str], list[str]]]:
    """The user's evaluate and the checks of its reply (one MetricRecord holding the
    weight ``w_key``, a whole number in 1..max_weight); raises :class:`_Unusable`. The
    failure reasons are the pipeline's (:data:`FAILURE_REASONS`, named for training)."""
    try:
        out = call_next(eval_msg, context)
    except Exception as exc:
        raise _Unusable("train step raised", f"the evaluate function raised: {exc!r}") from exc
    if out.has_error():
        raise _Unusable("train step raised", f"the evaluate function replied with an error: {out.error.reason}")
    metric_recs = list(out.content.metric_records.values())
    if len(metric_recs) != 1:
        raise _Unusable("train reply malformed", f"evaluate reply must hold exactly one MetricRecord, got "
                        f"{len(metric_recs)}")
    metrics = metric_recs[0]
    other: dict[str, Any] = {k: v for k, v in metrics.items() if k != w_key}
    names = metric_slot_names(other, spec)
    numeric = sorted(k for k, v in other.items() if isinstance(v, int | float) and not isinstance(v, bool))
    context.state[EVAL_NAMES_KEY] = ConfigRecord({"numeric": numeric, "other": sorted(set(other) - set(numeric))})
    if names[1]:
        logger.warning("evaluation metrics %s are not aggregated: more than metric_slots=%d numeric metrics, or not "
                       "numbers (the server is told their names)", names[1], spec.metric_slots)
    raw_weight = metrics.get(w_key)
    if (raw_weight is None or isinstance(raw_weight, bool) or not isinstance(raw_weight, int | float)
            or not np.isfinite(raw_weight) or float(raw_weight) != int(raw_weight)):
        raise _Unusable("train reply malformed", f"evaluate reply's '{w_key}' must be a whole number")
    weight = int(raw_weight)
    if not 1 <= weight <= spec.max_weight:
        raise _Unusable("weight outside 1..max_weight", f"'{w_key}' = {weight} is outside 1..{spec.max_weight}")
    values = {k: float(v) for k, v in other.items() if k in names[0]}
    if not all(np.isfinite(v) for v in values.values()):
        raise _Unusable("non-finite update or metric", "an evaluation metric holds NaN or inf")
    return values, weight, (list(names[0]), list(names[1]))


def _remembered_eval_names(context: Context, spec: UpdateSpec) -> tuple[list[str], list[str]]:
    """The evaluation metric names a site whose evaluation is unusable reports: those of
    its last usable evaluate reply (as :func:`_remembered_names` does for training)."""
    rec = context.state.config_records.get(EVAL_NAMES_KEY)
    if rec is None:
        return [], []
    template: dict[str, Any] = {str(n): 0.0 for n in rec["numeric"]} | {str(n): "" for n in rec["other"]}  # type: ignore[union-attr]
    slots, left_out = metric_slot_names(template, spec)
    return list(slots), list(left_out)


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
