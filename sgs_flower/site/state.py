"""What a site is and remembers: its policy, identity, state file and protocol instances.

Every message a site answers starts here: its policy (its own node config, never the
server's), its Ed25519 identity (configured, else made for the run and kept in the
run's store), its state file (the survivor sets it signed, sketches of the models it
signed them for, its DP spend: it outlasts the run) and the protocol instance of the
round in progress (kept in the run's store between messages). A refusal here is a
:class:`Refused`: the site says which of its own checks failed and takes no part.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgs_flower.dp.site import SiteState, default_state_file
from sgs_flower.secagg import bls
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import PolicyError, SecAggError
from sgs_flower.secagg.identity import IDENTITY_KEY_BYTES, generate_identity, identity_public
from sgs_flower.secagg.memo import memo_by_identity
from sgs_flower.secagg.policy import ClientPolicy, site_policy
from sgs_flower.site.store import (
    BLS_VERIFIED_KEY,
    FEDERATION_KEY,
    IDENTITY_KEY,
    SITE_KEY,
    STATE_KEY,
    Store,
)

logger = logging.getLogger("sgs_flower.client")

MEMORY_STATE = "memory"  # sgs-state-file value: remember only for this run


class Refused(Exception):
    """The site refuses the message; ``cause`` is the typed error naming the check.

    Only a refusal becomes an error reply (the adapter turns ``cause`` into one): any
    other exception is a fault of the site itself and is left to the framework."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


def load_policy(node_config: Mapping[str, Any]) -> ClientPolicy:
    """The site's policy; a broken configuration is refused (the site neither trains
    nor evaluates) and named by its error's type only."""
    try:
        return site_policy(dict(node_config))
    except SecAggError as exc:
        logger.error("secure aggregation: bad site policy: %s", exc)
        raise Refused(PolicyError(f"this site's secure-aggregation policy is invalid ({type(exc).__name__})")) from exc


def identity(store: Store, policy: ClientPolicy) -> bytes:
    """The site's identity key: its configured one, else one made for the run."""
    if policy.identity_key is not None:
        return policy.identity_key
    rec = store.get(IDENTITY_KEY)
    if rec is not None and isinstance(rec.get("key"), bytes):
        return bytes(rec["key"])
    key = generate_identity()
    store.put(IDENTITY_KEY, {"key": key})
    return key


def state_file(node_id: int, policy: ClientPolicy, ident: bytes) -> Path | None:
    """The site's state file: its own, else the default one (named by its identity key's
    fingerprint when it configured one, else by its node id); None for ``memory``."""
    if policy.state_file == MEMORY_STATE:
        return None
    if policy.state_file:
        return Path(policy.state_file)
    if policy.identity_key is not None:
        name = "identity-" + hashlib.sha256(identity_public(ident)).hexdigest()[:24]
    else:
        name = f"node-{int(node_id)}"
    return default_state_file(name)


@dataclass
class Site:
    """One site, as one message sees it: who it is, where it keeps its memory, and what
    its state file holds (loaded once per message, saved by whoever changes it)."""

    node_id: int
    policy: ClientPolicy
    store: Store
    identity: bytes
    state_path: Path | None
    state: SiteState

    @classmethod
    def open(cls, node_id: int, policy: ClientPolicy, store: Store) -> Site:
        """The site with its state, or :class:`Refused` when the state cannot be read.
        Never start afresh there: that would forget the site's privacy spend and the
        survivor sets it signed; the site's operator must repair or move the file."""
        ident = identity(store, policy)
        path = state_file(node_id, policy, ident)
        try:
            state = _load_state(store, path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.error("secure aggregation: unreadable site state: %r", exc)
            raise Refused(PolicyError("this site's state (sgs-state-file) is unreadable; it does not take part")) from exc
        return cls(int(node_id), policy, store, ident, path, state)

    def save(self) -> None:
        """Write the site's state (its file, or the run's store for ``memory``)."""
        if self.state_path is not None:
            self.state.save(self.state_path)
        else:
            self.store.put(SITE_KEY, {"json": self.state.to_json()})

    def fresh_client(self) -> SecAggClient:
        return SecAggClient(self.node_id, identity=self.identity, policy=self.policy)

    def load_client(self, key: str = STATE_KEY) -> SecAggClient:
        """The protocol instance saved under ``key`` (a new one when none is), with the
        site's memory handed to it (:meth:`lend`)."""
        rec = self.store.get(key)
        client = (self.fresh_client() if rec is None
                  else SecAggClient.from_state_dict(rec, self.identity, self.policy))
        self.lend(client)
        return client

    def save_client(self, client: SecAggClient, key: str = STATE_KEY, with_history: bool = True) -> None:
        """Keep the protocol instance for the next message. ``with_history=False``: without
        the survivor-set memory (the evaluation instance's: that memory lives in the state
        file, reloaded at every message, and the store travels with every message, so it
        is not carried twice)."""
        state = client.state_dict()
        if not with_history:
            state["history_models"], state["history_sets"] = [], []
        self.store.put(key, state)
        self._save_run_memory(client)

    def lend(self, client: SecAggClient) -> None:
        """Hand a protocol instance (train or evaluation) what the site remembers: the sets
        it signed and the roster epochs it signed under (its state file), and the run's
        memory: the federation learnt at the run's first round (whole-group participation
        without a roster, :mod:`sgs_flower.secagg.groups`; one record for the train and the
        evaluation instances, so both check survivor sets against the same groups) and
        the peers' BLS keys this site already checked (a deployed site runs each message in
        a new process: :func:`sgs_flower.secagg.bls.trust_verified`)."""
        client.history = dict(self.state.history) | client.history
        client.roster_epochs = list(self.state.roster_epochs)
        rec = self.store.get(FEDERATION_KEY)
        if rec is not None:
            client.federation = federation_of(rec)
        verified = self.store.get(BLS_VERIFIED_KEY)
        if verified is not None:
            bls.trust_verified(bytes(verified["digests"]))

    def take_back(self, client: SecAggClient) -> None:
        """Take back what a consistency stage added to the site's memory (saved by the caller)."""
        self.state.history = dict(client.history)
        self.state.roster_epochs = list(client.roster_epochs)

    def _save_run_memory(self, client: SecAggClient) -> None:
        if client.federation and self.store.get(FEDERATION_KEY) is None:
            self.store.put(FEDERATION_KEY, {"blob": _federation_blob(client.federation)})
        count = bls.verified_count()  # joined only when the site checked new keys (every message passes here)
        kept = self.store.get(BLS_VERIFIED_KEY)
        if count and (kept is None or len(bytes(kept["digests"])) != count * bls.DIGEST_BYTES):
            self.store.put(BLS_VERIFIED_KEY, {"digests": bls.verified_digests()})


@memo_by_identity(4)
def _federation_blob(federation: frozenset[bytes]) -> bytes:
    """The learnt federation as one value: its 32-byte identity keys, sorted and joined
    (saved once a run; a list of n keys was rebuilt into a set at every message)."""
    return b"".join(sorted(federation))


@memo_by_identity(4)
def _federation_from(blob: bytes) -> frozenset[bytes]:
    n = IDENTITY_KEY_BYTES
    if not blob or len(blob) % n:
        raise ValueError(f"the saved federation must be {n}-byte identity keys")
    return frozenset(blob[i : i + n] for i in range(0, len(blob), n))


def federation_of(rec: Mapping[str, Any]) -> frozenset[bytes]:
    """The saved federation: one blob (equal blobs give the same set, which the sites of
    one process share), or the list of keys an earlier version saved."""
    if "blob" in rec:
        return _federation_from(bytes(rec["blob"]))
    return frozenset(bytes(k) for k in rec["keys"])


def _load_state(store: Store, path: Path | None) -> SiteState:
    """The site's state from ``path``, or from the run's store when it is None."""
    if path is not None:
        if path.exists():
            return SiteState.load(path)
        site = SiteState()
        site.save(path)  # its sketch key must be the same at every later message
        return site
    rec = store.get(SITE_KEY)
    if rec is not None:
        return SiteState.from_json(str(rec["json"]))
    site = SiteState()
    store.put(SITE_KEY, {"json": site.to_json()})  # keep the run's sketch key
    return site
