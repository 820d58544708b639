"""The site's half of the model-confidential mode, as seen from Flower.

The work (answering the model-key requests, unmasking the model a round sends, sealing
the site's vector) is the Flower-free site's (:mod:`sgs_flower.site.model_key`); this
module maps its key state onto a Flower ``Context`` and its key answers onto Flower
replies. The key lives in a file beside the site's state file (``<state>.model-key.json``,
mode 0600; the ``sgs-flower unmask`` command reads it), or in ``Context.state`` for a
site whose state is run-scoped (``sgs-state-file=memory``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.records import ContextStore
from sgs_flower.confidential import model_key as mk
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.site import model_key as site_key
from sgs_flower.site.model_key import KEY_FILE_SUFFIX, KEY_RECORD, key_file
from sgs_flower.site.request import KeyAnswer
from sgs_flower.site.store import KEY_STATE

__all__ = ["KEY_FILE_SUFFIX", "KEY_RECORD", "KEY_STATE", "key_file", "key_reply", "load_key_state"]


def load_key_state(context: Context, state_path: Path | None, policy: ClientPolicy) -> mk.KeyState:
    """The site's key state under its current roster (a changed roster drops the key)."""
    return site_key.load_key_state(ContextStore(context), state_path, policy)


def key_reply(msg: Message, answer: KeyAnswer) -> Message:
    """The Flower reply to a model-key request."""
    return Message(RecordDict({KEY_RECORD: ConfigRecord(answer.fields)}), reply_to=msg)
