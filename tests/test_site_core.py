"""The site without Flower (issue 30, point 2): a whole secure round between the real
server state machine and sites driven through ``sgs_flower.site`` alone, with plain
requests, a :class:`MemoryStore` and a train step that is a plain function. The same
site answers Flower through ``clients.secagg_mod`` (tests/test_active_server.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sgs_flower.pipeline import UpdateSpec, binding_digest, decode_update, encode_update
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import PolicyError, StaleMessageError
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import Stage
from sgs_flower.site import (
    PASS,
    Answer,
    MemoryStore,
    ModelRecord,
    Refused,
    Request,
    TrainReply,
    on_train,
)
from sgs_flower.site.request import model_of
from sgs_flower.site.store import KEPT_KEY, SITE_KEY

N = 5
MODEL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, dtype=np.float32)}
SPEC = UpdateSpec(clip_range=1.0, max_cohort=N, max_weight=1024, field_bits=32, metric_slots=1)


class CoreSite:
    """One site: its own config and store, and a train step that adds 0.01 * node."""

    def __init__(self, node: int, **config: str) -> None:
        self.node, self.store, self.trained = node, MemoryStore(), 0
        self.config = {"sgs-min-group": "0", "sgs-state-file": "memory", **config}

    def train(self, a_key: str, c_key: str, model: ModelRecord) -> TrainReply:
        self.trained += 1
        new = [(k, a + np.float32(0.01 * self.node)) for k, a in model.read()]
        return TrainReply([k for k, _ in new], lambda: [a for _, a in new],
                          {"num-examples": 10 + self.node, "train_loss": 0.5 + self.node})

    def request(self, stage: Stage, payload: wire.Message | None) -> Request:
        configs: dict[str, dict] = {}
        models: dict[str, ModelRecord] = {}
        if payload is not None:
            configs[wire.RECORD_KEY] = {wire.FIELD_STAGE: int(stage), wire.FIELD_PAYLOAD: wire.encode(payload)}
        if stage == Stage.MASKED_INPUT:
            configs[wire.RECORD_KEY] |= {"arrays-key": "arrays", "config-key": "config", "weight-key": "num-examples"}
            configs |= {"config": {"lr": 0.1}, wire.SPEC_KEY: SPEC.to_config()}
            models["arrays"] = model_of(list(MODEL.items()))
        return Request(1, configs, models)

    def send(self, stage: Stage, payload: wire.Message | None) -> object:
        return on_train(self.node, self.config, self.store, self.request(stage, payload), self.train,
                        lambda d, m, w, s: encode_update(d, m, w, s), time.monotonic())


def _reply(out: object) -> wire.Message:
    assert isinstance(out, Answer)
    return out.reply


def test_a_round_through_the_site_alone_releases_the_weighted_mean() -> None:
    sites = {u: CoreSite(u) for u in range(1, N + 1)}
    ids = tuple(sorted(sites))
    params = RoundParams(run_id=1, round_id=3, cohort=ids, vector_length=SPEC.vector_length(15))
    server = SecAggServer(params, bound_digest=binding_digest(list(MODEL.items()), {"lr": 0.1}, SPEC.to_config()))
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m))
                                   for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    masked = {u: sites[u].send(Stage.MASKED_INPUT, m) for u, m in bundles.items()}
    assert all(isinstance(a, Answer) and a.names == (["train_loss"], []) for a in masked.values())
    reqs = server.collect_masked({u: _reply(a) for u, a in masked.items()})
    unmask = server.collect_consistency({u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()})
    total = server.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in unmask.items()}).total
    dec = decode_update(total, SPEC, N, 15, ["train_loss"])
    w = np.array([10 + u for u in ids], dtype=float)
    assert dec.total_weight == int(w.sum())
    np.testing.assert_allclose(dec.mean_delta, np.full(15, float(np.sum(w * 0.01 * np.array(ids)) / w.sum())),
                               atol=dec.error_bound + 1e-6)
    assert dec.metrics["train_loss"] == pytest.approx(float(np.sum(w * (0.5 + np.array(ids))) / w.sum()), abs=1e-3)
    # what the site keeps between messages went to its own store, never to a framework
    assert all(s.store.get(SITE_KEY) is not None and s.store.get(KEPT_KEY) is not None for s in sites.values())
    assert all(s.trained == 1 for s in sites.values())


def test_a_plain_request_is_refused_unless_the_site_admits_plain_rounds() -> None:
    with pytest.raises(Refused) as refused:
        CoreSite(1).send(Stage.ADVERTISE_KEYS, None)
    assert isinstance(refused.value.cause, PolicyError) and "refuses a plain train message" in str(refused.value.cause)
    assert CoreSite(1, **{"sgs-require-secagg": "false"}).send(Stage.ADVERTISE_KEYS, None) is PASS


def test_a_masked_input_out_of_turn_is_refused_before_training() -> None:
    """A site that set up no round refuses a masked-input request (a typed refusal the
    adapter turns into an error reply) and never trains."""
    site = CoreSite(1)
    with pytest.raises(Refused) as refused:
        site.send(Stage.MASKED_INPUT, _masked_request_of_another_round())
    assert isinstance(refused.value.cause, StaleMessageError)
    assert "node 1 has no round in progress" in str(refused.value.cause)
    assert site.trained == 0


def _masked_request_of_another_round() -> wire.Message:
    sites = {u: CoreSite(u) for u in range(1, 4)}
    server = SecAggServer(RoundParams(run_id=1, round_id=3, cohort=(1, 2, 3), vector_length=SPEC.vector_length(15)))
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m))
                                   for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    return bundles[1]
