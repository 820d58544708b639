"""The site's update kept for a retry of its masked input, and the retry itself.

A retry (``Stage.RETRY``, docs/protocol.md "Retry") re-encodes the round's update at a
wider range or another weight scale without retraining, so the site keeps it from its
masked input until the next round's (or its last retry): its weight, metrics and spec
in the run's store, its delta in a file beside its state file.

Why a file and not the store: under Flower the store is ``Context.state``, which
travels with every message (to a Ray actor in simulation, to the ``flwr-clientapp``
process in a deployment), so a model-sized delta there was copied at every consistency
and unmask message (at m = 5e6 and 50 sites those two exchanges went from 0.25 and
0.45 s to 1.3 and 1.6 s).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from sgs_flower.confidential.masked_model import Layout, RoundContext, seal
from sgs_flower.dp.site import default_state_file
from sgs_flower.pipeline import (
    EncodedUpdate,
    UpdateSpec,
    check_retry_spec,
    encode_failure,
    spec_digest,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import MalformedMessageError, StaleMessageError
from sgs_flower.site.model_key import load_key_state
from sgs_flower.site.request import Encoder, Request
from sgs_flower.site.state import Site
from sgs_flower.site.store import KEPT_KEY

logger = logging.getLogger("sgs_flower.client")

KEPT_DELTA_SUFFIX = ".kept-delta.npy"  # the kept delta (outside DP only), in a file beside the site's state
STALE_DELTA_SECONDS = 3600.0  # a kept delta this old is left over from an earlier run


def kept_delta_file(node_id: int, state_path: Path | None) -> Path:
    """Where the site keeps its round's delta for a retry: beside its state file (or
    where the default one would be, for a ``memory`` site), one file per site, replaced
    each round."""
    state = state_path or default_state_file(f"node-{int(node_id)}")
    return state.with_name(f"{state.stem}{KEPT_DELTA_SUFFIX}")


#: How often one process looks for stale kept deltas in a folder. A deployed site's
#: process answers one message and looks once; a process that answers for many sites
#: of one folder (a simulation: Ray actors, in-process and sharded rounds) looked at
#: every site's masked input, a scan of n files each time (O(n^2) a round).
STALE_SCAN_SECONDS = STALE_DELTA_SECONDS / 6
_last_scan: dict[Path, float] = {}


def collect_stale_deltas(folder: Path, keep: Path) -> None:
    """Delete kept deltas in ``folder`` older than an hour, other than ``keep``: a run's
    last round leaves its sites' files (no message says no retry will come), and in a
    simulation every run's nodes have new ids, so new names. At most once per
    :data:`STALE_SCAN_SECONDS` per folder and process."""
    now = time.monotonic()
    if now - _last_scan.get(folder, -STALE_SCAN_SECONDS) < STALE_SCAN_SECONDS:
        return
    _last_scan[folder] = now
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


def keep(
    site: Site, server_msg: wire.Message, spec: UpdateSpec, model_size: int, failed: str,
    delta: np.ndarray | None, metrics: dict[str, Any], weight: int, layout: Layout = (),
) -> None:
    """Keep this round's update until the next round's masked input, for a retry of its
    masked input (re-encoded, never retrained). Under DP only the spec is kept (a retry
    is refused there); a site whose update was unusable keeps only the reason. The delta
    goes to :func:`kept_delta_file`, written atomically."""
    delta_file = kept_delta_file(site.node_id, site.state_path)
    old = site.store.get(KEPT_KEY)
    if old is not None:
        _drop_kept_delta(str(old.get("delta-file", "")))
    keep_delta = delta is not None and spec.dp_mode == "none"
    if keep_delta:
        assert delta is not None
        delta_file.parent.mkdir(parents=True, exist_ok=True)
        collect_stale_deltas(delta_file.parent, delta_file)
        tmp = delta_file.with_name(delta_file.name + ".tmp")
        with tmp.open("wb") as f:
            np.save(f, np.ascontiguousarray(delta), allow_pickle=False)
        tmp.replace(delta_file)
    site.store.put(KEPT_KEY, {
        "run": int(server_msg.run_id), "round": int(server_msg.round_id), "spec": json.dumps(spec.to_config()),
        "retries": "[]", "failed": failed, "model-size": model_size, "weight": int(weight),
        "metric-names": list(metrics), "metric-values": [float(v) for v in metrics.values()],
        "delta-file": str(delta_file) if keep_delta else "",
        "layout": json.dumps([list(e) for e in layout]),  # the model-confidential mode seals a retry with it
    })


def on_retry(site: Site, request: Request, client: SecAggClient, server_msg: wire.Message,
             encoder: Encoder) -> wire.Message:
    """A retry of this round's masked input: every check runs on what the server sent and
    the site's own state (never its data) before anything is encoded; then the kept
    update is re-encoded under the retry spec (or the unusable vector again, for a site
    whose update was unusable) and masked under the retry's context. Nothing after the
    checks can fail, so the reply's kind never depends on the site's data."""
    client.expect_retry(server_msg)
    kept = site.store.get(KEPT_KEY)
    if kept is None or (int(kept["run"]), int(kept["round"])) != (server_msg.run_id, server_msg.round_id):
        raise StaleMessageError(f"this site keeps no update of round {server_msg.round_id} to retry")
    if wire.SPEC_KEY not in request.configs:
        raise MalformedMessageError("retry request lacks the retry spec")
    new = UpdateSpec.from_config(dict(request.configs[wire.SPEC_KEY]))
    base = UpdateSpec.from_config(json.loads(str(kept["spec"])))
    earlier = [UpdateSpec.from_config(d) for d in json.loads(str(kept["retries"]))]
    check_retry_spec(base, earlier, new)
    model_size = int(kept["model-size"])
    failed = str(kept["failed"])
    delta_file = str(kept.get("delta-file", ""))
    if not failed and not (delta_file and Path(delta_file).exists()):
        raise StaleMessageError("this site no longer keeps its update of this round")
    encoded: EncodedUpdate | None = None
    if not failed:
        delta = np.load(delta_file, allow_pickle=False)
        metrics = {str(k): float(v) for k, v in zip(kept["metric-names"], kept["metric-values"], strict=True)}
        try:
            encoded = encoder(delta, metrics, int(kept["weight"]), new)
        except Exception as exc:  # the first encoding succeeded; whatever happens, never an error reply
            logger.warning("re-encoding this site's update for the retry failed: %r", exc)
            failed = "the site's encoder raised"
    if encoded is None:
        encoded = encode_failure(new, model_size, failed)
    if new.model_key:  # sealed under the key again, with this attempt's masks and MAC
        key_state = load_key_state(site.store, site.state_path, site.policy)
        if key_state.key_id != new.model_key:
            raise StaleMessageError("this site no longer holds the round's model key")
        layout: Layout = tuple((str(k), tuple(int(d) for d in shape), str(dt))
                               for k, shape, dt in json.loads(str(kept["layout"])))
        seal(encoded.vector, key_state.key, RoundContext(server_msg.run_id, server_msg.round_id, new, layout),
             len(earlier) + 1, site.node_id, model_size)
    reply = client.handle(server_msg, vector=encoded.vector, bound_digest=spec_digest(new))
    retries = [*json.loads(str(kept["retries"])), new.to_config()]
    kept["retries"] = json.dumps(retries)
    if len(retries) >= wire.MAX_RETRIES:
        _drop_kept_delta(delta_file)
        kept["delta-file"] = ""
    site.store.put(KEPT_KEY, kept)
    logger.info("answered retry %d of round %s at range +-%g (integer entries +-%g), weight scale %d",
                len(retries), server_msg.round_id, new.clip_range, new.int_clip_range, new.weight_unit)
    return reply
