"""One request at the site, from its policy to its answer: the site without a framework.

:func:`on_train` and :func:`on_evaluate` are what a framework adapter calls for each
train and evaluate request (``clients.secagg_mod`` for Flower). The site assumes the
server may lie: it follows its own policy (``sgs_flower.secagg.policy``), never the
server. A request without the protocol record is refused while the policy requires
secure aggregation (the default), so a server cannot downgrade a site to plaintext.
Error replies name the check that failed, never a value of the site's: the full
message goes to the local log only; after any refusal the site leaves the round.

A refusal is a :class:`~sgs_flower.site.state.Refused` (the adapter turns its cause
into an error reply); any other exception is a fault of the site's own and left to the
framework.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from sgs_flower.evaluation import is_eval_round
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    MalformedMessageError,
    PolicyError,
    ProtocolError,
    SecAggError,
    StaleMessageError,
)
from sgs_flower.secagg.model_memory import memory_entry, remember, sketch_from_bytes
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.wire import Stage
from sgs_flower.site import retry
from sgs_flower.site.evaluate import on_eval_input
from sgs_flower.site.model_key import KEY_RECORD, answer_key_request
from sgs_flower.site.parts import has_next_part, next_part, protocol_part
from sgs_flower.site.request import (
    PASS,
    Answer,
    Encoder,
    EvaluateStep,
    KeyAnswer,
    Names,
    Pass,
    Request,
    TrainStep,
)
from sgs_flower.site.state import Refused, Site, identity, load_policy, state_file
from sgs_flower.site.store import EVAL_STATE_KEY, PENDING_KEY, STATE_KEY, Store
from sgs_flower.site.train import on_masked_input

logger = logging.getLogger("sgs_flower.client")


def answer_at_quantum(arrived: float, policy: ClientPolicy) -> None:
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


def _admit_plain(policy: ClientPolicy, kind: str) -> Pass:
    """A request without the protocol record: refused while the site requires secure
    aggregation (it would send the site's update or metrics in the clear), else PASS."""
    if not policy.require_secure_aggregation:
        return PASS
    logger.warning("refused a plain %s message: this site requires secure aggregation", kind)
    if kind == "train":
        raise Refused(PolicyError(
            "this site requires secure aggregation and refuses a plain train message (a site that "
            "accepts plain rounds sets sgs-require-secagg=false in its node config or SGS_NODE_CONFIG)"
        ))
    raise Refused(PolicyError(
        "this site requires secure aggregation and refuses a plain evaluate message, which would send its "
        "evaluation metrics to the server in the clear (run the server with SecAggStrategy, which evaluates "
        "securely; a site that accepts plain rounds sets sgs-require-secagg=false)"
    ))


def on_train(node_id: int, node_config: Mapping[str, Any], store: Store, request: Request, train: TrainStep,
             encoder: Encoder, arrived: float) -> Answer | KeyAnswer | Pass:
    """Answer one train request: a model-key request, a protocol exchange (at the masked
    input the user's ``train`` runs), or :data:`PASS` for a plain request the site's
    policy admits. Raises :class:`Refused`. ``arrived``: ``time.monotonic()`` when the
    request reached the site (for ``sgs-reply-quantum``)."""
    policy = load_policy(node_config)
    if KEY_RECORD in request.configs:
        return _on_key_request(node_id, policy, store, request)
    if wire.RECORD_KEY not in request.configs:
        return _admit_plain(policy, "train")
    site = Site.open(node_id, policy, store)
    try:
        client = site.load_client(STATE_KEY)
    except (SecAggError, ValueError, KeyError, TypeError) as exc:  # corrupt saved state: start afresh
        logger.warning("discarding unreadable secure-aggregation state: %r", exc)
        client = site.fresh_client()
        site.lend(client)
    try:
        rec, stage, server_msg = protocol_part(request)
        if is_eval_round(server_msg.round_id):
            raise StaleMessageError("a train message carries an evaluation round's id; refused (rounds of the two "
                                    "kinds never mix)")
        names: Names | None = None
        if stage == Stage.MASKED_INPUT:
            client.expect_masked_input(server_msg)
            reply, names = on_masked_input(site, request, client, server_msg, train, encoder)
            answer_at_quantum(arrived, policy)
        elif stage == Stage.RETRY:
            reply = retry.on_retry(site, request, client, server_msg, encoder)
        else:
            reply = client.handle(server_msg)
    except Exception as exc:
        # this round's part was refused: the site leaves this round, and the next
        # round's part riding on it (if any) is not looked at (an error reply has no content)
        logger.warning("secure aggregation refused a message: %s: %s", type(exc).__name__, exc)
        client.abandon()
        site.save_client(client)
        raise Refused(exc) from exc
    ahead = _next_round(client, rec, server_msg)
    site.save_client(client)
    if stage == Stage.CONSISTENCY:
        _remember_signed(site, client)
    return Answer(stage, reply, names, ahead)


def _on_key_request(node_id: int, policy: ClientPolicy, store: Store, request: Request) -> KeyAnswer:
    """A model-key request (model-confidential mode): answered without training."""
    try:
        ident = identity(store, policy)
        path = state_file(node_id, policy, ident)
        return KeyAnswer(answer_key_request(request.configs[KEY_RECORD], request.run_id, int(node_id), ident, policy,
                                            store, path))
    except Exception as exc:
        logger.warning("model-key request refused: %s: %s", type(exc).__name__, exc)
        raise Refused(exc) from exc


def _next_round(client: SecAggClient, rec: Mapping[str, Any],
                server_msg: wire.Message) -> tuple[Stage, wire.Message] | str | None:
    """The reply to the next round's part riding on the request, if any: its payload, or
    the refusal's text (the site then leaves the next round only)."""
    if not has_next_part(rec):
        return None
    try:
        next_stage, next_msg = next_part(rec)
        return next_stage, client.handle_next(next_msg, server_msg)
    except ProtocolError as exc:
        logger.warning("secure aggregation refused the next round's part: %s: %s", type(exc).__name__, exc)
        return f"{type(exc).__name__}: {exc}"[: wire.MAX_ERROR_TEXT]
    except Exception as exc:  # e.g. ThresholdError: named by type only
        logger.warning("secure aggregation could not take the next round's part: %r", exc)
        return f"{type(exc).__name__}: the site does not take part in the next round (details in its log)"


def _remember_signed(site: Site, client: SecAggClient) -> None:
    """The signed survivor set is remembered (never twice), with the model's sketch."""
    site.take_back(client)
    pending = site.store.get(PENDING_KEY)
    if pending is not None and str(pending["digest"]) in site.state.history:
        digest = bytes.fromhex(str(pending["digest"]))
        sketch = sketch_from_bytes(bytes(pending["sketch"]))
        entry = memory_entry(digest, site.state.history[digest.hex()], sketch, float(pending["step"]))
        site.state.models = remember(site.state.models, entry)
    site.save()


def on_evaluate(node_id: int, node_config: Mapping[str, Any], store: Store, request: Request, evaluate: EvaluateStep,
                arrived: float) -> Answer | Pass:
    """Answer one exchange of a secure evaluation round, on its own protocol instance:
    only evaluation round ids are accepted, and never a pipelined part. A plain evaluate
    request is refused while the site requires secure aggregation (else :data:`PASS`).
    Raises :class:`Refused`."""
    policy = load_policy(node_config)
    if wire.RECORD_KEY not in request.configs:
        return _admit_plain(policy, "evaluate")
    site = Site.open(node_id, policy, store)
    rec_state = store.get(EVAL_STATE_KEY)
    try:
        client = (site.fresh_client() if rec_state is None
                  else SecAggClient.from_state_dict(rec_state, site.identity, policy))
    except (SecAggError, ValueError, KeyError, TypeError) as exc:
        logger.warning("discarding unreadable secure-evaluation state: %r", exc)
        client = site.fresh_client()
    site.lend(client)
    try:
        rec, stage, server_msg = protocol_part(request)
        if not is_eval_round(server_msg.round_id):
            raise StaleMessageError("an evaluate message carries a train round's id; refused (rounds of the two "
                                    "kinds never mix)")
        if has_next_part(rec):
            raise MalformedMessageError("an evaluation round is never pipelined: its message carries no next part")
        names: Names | None = None
        if stage == Stage.MASKED_INPUT:
            client.expect_masked_input(server_msg)
            reply, names = on_eval_input(site, request, client, server_msg, evaluate)
            answer_at_quantum(arrived, policy)
        elif stage == Stage.RETRY:
            raise StaleMessageError("an evaluation round has no retry (its weight scale is max_weight)")
        else:
            reply = client.handle(server_msg)
    except Exception as exc:
        logger.warning("secure evaluation refused a message: %s: %s", type(exc).__name__, exc)
        client.abandon()
        site.save_client(client, EVAL_STATE_KEY, with_history=False)
        raise Refused(exc) from exc
    site.save_client(client, EVAL_STATE_KEY, with_history=False)
    if stage == Stage.CONSISTENCY:  # the signed survivor set is remembered, under the evaluation's own key
        site.take_back(client)
        site.save()
    return Answer(stage, reply, names)
