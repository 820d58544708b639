"""The site's half of the model-confidential mode, for the client mod.

Two jobs: answer the model-key messages (``sgs.model-key``: status, wrap, install; see
:mod:`sgs_flower.confidential.model_key`), and, at a round's masked input, turn the
masked model the server sent into the plaintext model the user's code trains or
evaluates on (checking its MAC and freshness), then seal the site's encoded vector
under the key (:func:`sgs_flower.confidential.masked_model.seal`).

Where the key lives: in a file beside the site's state file (``<state>.model-key.json``,
mode 0600), or in ``Context.state`` for a site whose state is run-scoped
(``sgs-state-file=memory``). The ``sgs-flower unmask`` command reads that file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.records import read_arrays
from sgs_flower.confidential import masked_model as mm
from sgs_flower.confidential import model_key as mk
from sgs_flower.secagg.errors import MalformedMessageError, ModelIntegrityError, ModelKeyError
from sgs_flower.secagg.policy import ClientPolicy

logger = logging.getLogger("sgs_flower.client")

KEY_RECORD = "sgs.model-key"  # the model-key phase's request and reply record
KEY_STATE = "sgs.model-key.state"  # the key state of a site whose state is run-scoped
KEY_FILE_SUFFIX = ".model-key.json"


def key_file(state_path: Path | None) -> Path | None:
    """The site's model-key file, beside its state file (None: kept in Context.state)."""
    return None if state_path is None else state_path.with_name(state_path.name + KEY_FILE_SUFFIX)


def load_key_state(context: Context, state_path: Path | None, policy: ClientPolicy) -> mk.KeyState:
    """The site's key state under its current roster (a changed roster drops the key)."""
    roster = mk.roster_digest(policy.roster)
    path = key_file(state_path)
    if path is None:
        rec = context.state.config_records.get(KEY_STATE)
        state = mk.KeyState.from_json(str(rec["json"])) if rec is not None else mk.KeyState.fresh(roster)
    elif path.exists():
        state = mk.load_key_file(path)
    else:
        state = mk.KeyState.fresh(roster)
    return state.for_roster(roster)


def has_key_state(context: Context, state_path: Path | None) -> bool:
    """Whether this site keeps model-key state at all (it took part in the mode)."""
    path = key_file(state_path)
    return context.state.config_records.get(KEY_STATE) is not None if path is None else path.exists()


def save_key_state(context: Context, state_path: Path | None, state: mk.KeyState) -> None:
    path = key_file(state_path)
    if path is None:
        context.state[KEY_STATE] = ConfigRecord({"json": state.to_json()})
    else:
        mk.save_key_file(path, state)


def _reply(msg: Message, fields: dict[str, object]) -> Message:
    return Message(RecordDict({KEY_RECORD: ConfigRecord(fields)}), reply_to=msg)  # type: ignore[arg-type]


def on_key_message(msg: Message, context: Context, ident: bytes, policy: ClientPolicy,
                   state_path: Path | None) -> Message:
    """Answer one model-key request; a refusal raises (the mod turns it into an error reply)."""
    rec = msg.content.config_records[KEY_RECORD]
    op, run_id = rec.get("op"), msg.metadata.run_id
    state = load_key_state(context, state_path, policy)
    node = int(context.node_id)
    if op == "status":
        path = key_file(state_path)
        if path is None or not path.exists():  # the kx key announced must be the one that unwraps
            save_key_state(context, state_path, state)
        return _reply(msg, mk.announce(state, ident, node, run_id).to_record())
    if op == "wrap":
        recipients = _announcements(rec)
        state, envelopes = mk.wrap_for(state, ident, run_id, recipients, policy.roster)
        save_key_state(context, state_path, state)
        logger.info("model key %s wrapped for nodes %s", state.key_id, [a.node for a in recipients])
        return _reply(msg, {"key-id": state.key_id, "leader": mk.announce(state, ident, node, run_id).identity,
                            "envelopes": [e for e, _, _ in envelopes], "signatures": [s for _, s, _ in envelopes],
                            "refused": [r for _, _, r in envelopes]})
    if op == "install":
        try:
            kid, leader = str(rec["key-id"]), bytes(rec["leader"])  # type: ignore[arg-type]
            envelope, sig = bytes(rec["envelope"]), bytes(rec["signature"])  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"malformed model-key install request: {exc!r}") from exc
        state = mk.install(state, ident, run_id, kid, leader, envelope, sig, policy.roster)
        save_key_state(context, state_path, state)
        logger.info("model key %s installed", state.key_id)
        return _reply(msg, {"key-id": state.key_id})
    raise MalformedMessageError(f"unknown model-key operation {op!r}")


def _announcements(rec: ConfigRecord) -> list[mk.Announcement]:
    fields = ("node", "identity", "kx-pk", "roster", "key-id", "sig")
    try:
        columns = [list(rec[f"recipients.{f}"]) for f in fields]  # type: ignore[arg-type]
    except (KeyError, TypeError) as exc:
        raise MalformedMessageError(f"malformed model-key wrap request: {exc!r}") from exc
    if len({len(c) for c in columns}) != 1 or not columns[0] or len(columns[0]) > 100_000:
        raise MalformedMessageError("model-key wrap request: recipient columns differ in length or are empty")
    return [mk.Announcement.from_record(dict(zip(fields, row, strict=True))) for row in zip(*columns, strict=True)]


def open_model(model: ArrayRecord, want_key: str, run_id: int, state: mk.KeyState) -> tuple[ArrayRecord, mk.KeyState]:
    """The plaintext model of a confidential round's request, checked.

    A masked model is unmasked under the site's key (MAC checked); it must be no older
    than the newest this site unmasked in this run (else a replay). A plaintext model is
    accepted only before this site has seen a masked one in this run: the run's initial
    model, never a model the server chose later."""
    if state.key_id != want_key:
        raise ModelKeyError(
            f"the round is under model key {want_key}, this site holds {state.key_id or 'none'}: the server "
            "must run the model-key phase for it first")
    newest = state.newest.get(str(run_id))
    if mm.WORDS_KEY not in model:
        if newest is not None:
            raise ModelIntegrityError(
                f"this run's model is masked since round {newest}; a plaintext model (one the server chose) is refused")
        return model, state
    masked = mm.MaskedModel.from_arrays(dict(read_arrays(model)))
    if masked.run_id == run_id and newest is not None and masked.round_id < newest:
        raise ModelIntegrityError(
            f"the masked model is of round {masked.round_id}, older than round {newest} this site already "
            "unmasked: a replay, refused")
    arrays = mm.unmask(masked, state.key, state.key_id)
    if masked.run_id == run_id:
        state.newest[str(run_id)] = max(masked.round_id, newest or 0)
    plain = ArrayRecord({k: Array(np.ascontiguousarray(a)) for (k, _, _), a in zip(masked.layout, arrays, strict=True)})
    return plain, state


def is_masked(model: ArrayRecord) -> bool:
    return mm.WORDS_KEY in model


def open_for_evaluation(model: ArrayRecord, run_id: int, state: mk.KeyState) -> tuple[ArrayRecord, mk.KeyState]:
    """The plaintext model of a secure evaluation request: as :func:`open_model`, under
    the key the masked model names (an evaluation spec carries no model key)."""
    if mm.WORDS_KEY not in model:
        if str(run_id) in state.newest:
            raise ModelIntegrityError(
                f"this run's model is masked since round {state.newest[str(run_id)]}; a plaintext model to evaluate "
                "(one the server chose) is refused")
        return model, state
    masked = mm.MaskedModel.from_arrays(dict(read_arrays(model)))
    return open_model(model, masked.key_id, run_id, state)
