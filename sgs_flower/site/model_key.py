"""The site's half of the model-confidential mode.

Two jobs: answer the model-key requests (``sgs.model-key``: status, wrap, install; see
:mod:`sgs_flower.confidential.model_key`), and, at a round's masked input, turn the
masked model the server sent into the plaintext model the user's code trains or
evaluates on (checking its MAC and freshness).

Where the key lives: in a file beside the site's state file (``<state>.model-key.json``,
mode 0600), or in the run's store for a site whose state is run-scoped
(``sgs-state-file=memory``). The ``sgs-flower unmask`` command reads that file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sgs_flower.confidential import masked_model as mm
from sgs_flower.confidential import model_key as mk
from sgs_flower.secagg.errors import MalformedMessageError, ModelIntegrityError, ModelKeyError
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.site.request import Fields, ModelRecord, model_of
from sgs_flower.site.store import KEY_STATE, Store

logger = logging.getLogger("sgs_flower.client")

KEY_RECORD = "sgs.model-key"  # the model-key phase's request and reply record
KEY_FILE_SUFFIX = ".model-key.json"


def key_file(state_path: Path | None) -> Path | None:
    """The site's model-key file, beside its state file (None: kept in the run's store)."""
    return None if state_path is None else state_path.with_name(state_path.name + KEY_FILE_SUFFIX)


def load_key_state(store: Store, state_path: Path | None, policy: ClientPolicy) -> mk.KeyState:
    """The site's key state under its current roster (a changed roster drops the key)."""
    roster = mk.roster_digest(policy.roster)
    path = key_file(state_path)
    if path is None:
        rec = store.get(KEY_STATE)
        state = mk.KeyState.from_json(str(rec["json"])) if rec is not None else mk.KeyState.fresh(roster)
    elif path.exists():
        state = mk.load_key_file(path)
    else:
        state = mk.KeyState.fresh(roster)
    return state.for_roster(roster)


def has_key_state(store: Store, state_path: Path | None) -> bool:
    """Whether this site keeps model-key state at all (it took part in the mode)."""
    path = key_file(state_path)
    return store.get(KEY_STATE) is not None if path is None else path.exists()


def save_key_state(store: Store, state_path: Path | None, state: mk.KeyState) -> None:
    path = key_file(state_path)
    if path is None:
        store.put(KEY_STATE, {"json": state.to_json()})
    else:
        mk.save_key_file(path, state)


def answer_key_request(rec: Fields, run_id: int, node: int, ident: bytes, policy: ClientPolicy, store: Store,
                       state_path: Path | None) -> Fields:
    """Answer one model-key request (the fields of its record); a refusal raises."""
    op = rec.get("op")
    state = load_key_state(store, state_path, policy)
    if op == "status":
        path = key_file(state_path)
        if path is None or not path.exists():  # the kx key announced must be the one that unwraps
            save_key_state(store, state_path, state)
        return mk.announce(state, ident, node, run_id).to_record()
    if op == "wrap":
        recipients = _announcements(rec)
        state, envelopes = mk.wrap_for(state, ident, run_id, recipients, policy.roster)
        save_key_state(store, state_path, state)
        logger.info("model key %s wrapped for nodes %s", state.key_id, [a.node for a in recipients])
        return {"key-id": state.key_id, "leader": mk.announce(state, ident, node, run_id).identity,
                "envelopes": [e for e, _, _ in envelopes], "signatures": [s for _, s, _ in envelopes],
                "refused": [r for _, _, r in envelopes]}
    if op == "install":
        try:
            kid, leader = str(rec["key-id"]), bytes(rec["leader"])
            envelope, sig = bytes(rec["envelope"]), bytes(rec["signature"])
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"malformed model-key install request: {exc!r}") from exc
        state = mk.install(state, ident, run_id, kid, leader, envelope, sig, policy.roster)
        save_key_state(store, state_path, state)
        logger.info("model key %s installed", state.key_id)
        return {"key-id": state.key_id}
    raise MalformedMessageError(f"unknown model-key operation {op!r}")


def _announcements(rec: Fields) -> list[mk.Announcement]:
    fields = ("node", "identity", "kx-pk", "roster", "key-id", "sig")
    try:
        columns = [list(rec[f"recipients.{f}"]) for f in fields]
    except (KeyError, TypeError) as exc:
        raise MalformedMessageError(f"malformed model-key wrap request: {exc!r}") from exc
    if len({len(c) for c in columns}) != 1 or not columns[0] or len(columns[0]) > 100_000:
        raise MalformedMessageError("model-key wrap request: recipient columns differ in length or are empty")
    return [mk.Announcement.from_record(dict(zip(fields, row, strict=True))) for row in zip(*columns, strict=True)]


def is_masked(model: ModelRecord) -> bool:
    return mm.WORDS_KEY in model.keys


def open_model(model: ModelRecord, want_key: str, run_id: int, state: mk.KeyState) -> tuple[ModelRecord, mk.KeyState]:
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
    if not is_masked(model):
        if newest is not None:
            raise ModelIntegrityError(
                f"this run's model is masked since round {newest}; a plaintext model (one the server chose) is refused")
        return model, state
    masked = mm.MaskedModel.from_arrays(dict(model.read()))
    if masked.run_id == run_id and newest is not None and masked.round_id < newest:
        raise ModelIntegrityError(
            f"the masked model is of round {masked.round_id}, older than round {newest} this site already "
            "unmasked: a replay, refused")
    arrays = mm.unmask(masked, state.key, state.key_id)
    if masked.run_id == run_id:
        state.newest[str(run_id)] = max(masked.round_id, newest or 0)
    return model_of([(k, a) for (k, _, _), a in zip(masked.layout, arrays, strict=True)]), state


def open_for_evaluation(model: ModelRecord, run_id: int, state: mk.KeyState) -> tuple[ModelRecord, mk.KeyState]:
    """The plaintext model of a secure evaluation request: as :func:`open_model`, under
    the key the masked model names (an evaluation spec carries no model key)."""
    if not is_masked(model):
        if str(run_id) in state.newest:
            raise ModelIntegrityError(
                f"this run's model is masked since round {state.newest[str(run_id)]}; a plaintext model to evaluate "
                "(one the server chose) is refused")
        return model, state
    masked = mm.MaskedModel.from_arrays(dict(model.read()))
    return open_model(model, masked.key_id, run_id, state)


def open_models(models: dict[str, ModelRecord], run_id: int, policy: ClientPolicy, store: Store,
                state_path: Path | None) -> dict[str, ModelRecord]:
    """The models of an evaluate request as the user's code may see them. The one place
    the evaluated model reaches the site's code: in the model-confidential mode the
    key-masked model is unmasked here (MAC and freshness checked), before the user's
    evaluate runs, and a plaintext model is refused once this site unmasked the run's
    masked one; a refusal (an unreadable key file included) raises before the user's
    code runs, never depending on the site's data."""
    masked = any(is_masked(m) for m in models.values())
    if not masked and not has_key_state(store, state_path):
        return models  # this site never took part in the model-confidential mode
    state = load_key_state(store, state_path, policy)
    plain = {}
    for name, model in models.items():
        plain[name], state = open_for_evaluation(model, run_id, state)
    if masked:  # the newest model it unmasked moved on
        save_key_state(store, state_path, state)
    return plain
