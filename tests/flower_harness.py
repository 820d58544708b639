"""Helpers for the Flower simulation tests: a ServerApp factory, a recording client,
and Grid proxies that record or tamper with what the server sees.

Apps built here are pickled by value (``cloudpickle.register_pickle_by_value``) so the
Ray workers of the simulation do not need to import this test module.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from clients import secagg_mod
from clients.secagg_mod import default_encoder, run_secagg
from sgs_flower.app import client_app as app_client
from sgs_flower.digits import Net
from sgs_flower.secagg import wire
from sgs_flower.secagg.wire import Stage

cloudpickle.register_pickle_by_value(sys.modules[__name__])

BACKEND = {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2, "logging_level": "error"}}


def initial_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(Net().state_dict())


def train_config() -> ConfigRecord:
    return ConfigRecord({"lr": 0.05, "local-epochs": 1, "batch-size": 32})


def run(server_main: Callable[[Grid, Context], None], client: ClientApp, n: int) -> None:
    server = ServerApp()
    server.main()(server_main)
    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=BACKEND)


def recording_client(
    dump: Path,
    fail: Callable[[int, int], bool] | None = None,
    crash: Callable[[int, int], bool] | None = None,
    cheater: int | None = None,
    factor: int = 10**6,
) -> ClientApp:
    """The app's own train function, plus: it writes each plaintext update to ``dump``
    (so a test can compute the plaintext aggregate the server never sees), with the
    learning rate its train config carried. Where ``fail(partition, round)`` says so,
    the user's train function raises (the site then sends the protocol's unusable
    vector: no error reply, see ``secagg_mod``); where ``crash`` says so, the node
    itself crashes at the masked-input stage, after it has shared its keys (a mod
    outside ``secagg_mod`` raises: Flower answers with an error, and the server counts
    the node as dropped). Partition ``cheater`` is a malicious site (issue 31): its mod
    encodes with :func:`cheating_encoder` (``factor`` times its update, unclipped)."""
    app = ClientApp()
    evil = cheating_encoder(factor)

    def site_mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        if cheater is not None and int(context.node_config["partition-id"]) == cheater:
            return run_secagg(msg, context, call_next, evil)
        return secagg_mod(msg, context, call_next)

    def crash_mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        rec = msg.content.config_records.get(wire.RECORD_KEY)
        if crash is not None and rec is not None and rec.get(wire.FIELD_STAGE) == int(Stage.MASKED_INPUT):
            pid = int(context.node_config["partition-id"])
            if crash(pid, int(msg.content["config"]["server-round"])):
                raise RuntimeError("simulated crash of this node")
        return call_next(msg, context)

    @app.train(mods=[crash_mod, site_mod])
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        lr = float(msg.content["config"]["lr"])  # type: ignore[arg-type]
        if fail is not None and fail(pid, rnd):
            raise RuntimeError(f"partition {pid} fails in round {rnd}")
        reply = app_client.train(msg, context)
        arrays = [a.numpy() for a in reply.content["arrays"].values()]
        weight = int(reply.content["metrics"]["num-examples"])
        loss = float(reply.content["metrics"]["train_loss"])
        with (dump / f"r{rnd}_p{pid}.pkl").open("wb") as f:
            pickle.dump({"arrays": arrays, "weight": weight, "loss": loss, "node": int(context.node_id), "lr": lr}, f)
        return reply

    return app


def load_dump(dump: Path, rnd: int) -> list[dict[str, Any]]:
    out = []
    for p in sorted(dump.glob(f"r{rnd}_p*.pkl")):
        with p.open("rb") as f:
            out.append(pickle.load(f))
    return out


def weighted_mean(updates: list[dict[str, Any]]) -> list[np.ndarray]:
    total = sum(u["weight"] for u in updates)
    return [sum(u["weight"] * u["arrays"][i].astype(np.float64) for u in updates) / total for i in range(len(updates[0]["arrays"]))]


class ProxyGrid(Grid):
    """Delegates to a real Grid; subclasses look at or change the traffic."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    @property
    def run(self):  # type: ignore[override]
        return self.grid.run

    def set_run(self, run_id: int) -> None:  # pragma: no cover - not used by strategies
        self.grid.set_run(run_id)

    def create_message(self, *a: Any, **k: Any) -> Message:  # pragma: no cover
        return self.grid.create_message(*a, **k)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(self.outgoing(list(messages)))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        self.incoming(replies)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = list(self.grid.send_and_receive(self.outgoing(list(messages)), timeout=timeout))
        self.incoming(replies)
        return replies

    def outgoing(self, messages: list[Message]) -> list[Message]:
        return messages

    def incoming(self, replies: list[Message]) -> None:
        pass


class RecordingGrid(ProxyGrid):
    """Keeps every reply the server receives."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.received: list[Message] = []

    def incoming(self, replies: list[Message]) -> None:
        self.received.extend(replies)


class InconsistentModelGrid(ProxyGrid):
    """A malicious server: in ``round_`` it sends one client a different global model."""

    def __init__(self, grid: Grid, round_: int) -> None:
        super().__init__(grid)
        self.round_ = round_
        self.victim: int | None = None

    def outgoing(self, messages: list[Message]) -> list[Message]:
        for m in messages:
            c = m.content
            if m.metadata.group_id == str(self.round_) and "arrays" in c.array_records and "sgs.secagg" in c.config_records:
                if self.victim is None:
                    self.victim = m.metadata.dst_node_id
                if m.metadata.dst_node_id == self.victim:
                    c["arrays"] = ArrayRecord({k: Array(np.full_like(v.numpy(), 0.5)) for k, v in c["arrays"].items()})
        return messages


def metrics_of(result_metrics: dict[int, MetricRecord]) -> dict[int, dict[str, float]]:
    return {r: {k: float(v) for k, v in m.items()} for r, m in result_metrics.items()}  # type: ignore[arg-type]


def dry_run_epsilons(config: Any, n: int, rounds: int) -> list[float]:
    """The consumers' epsilon after each of ``rounds`` rounds of ``n`` clients on the
    harness model, from a DP aggregator's accountant alone (no protocol, no ledger):
    what a test sets a budget between."""
    from sgs_flower.dp.aggregator import DPAggregator

    dry = DPAggregator(config)
    model_size = sum(a.numpy().size for a in initial_arrays().values())
    eps = []
    for r in range(1, rounds + 1):
        plan = dry.plan(r, n, n, model_size)
        dry.release(plan, np.zeros(model_size), n, 0)
        eps.append(dry.spent().consumer)
    return eps


def evaluating_client(dump: Path) -> ClientApp:
    """A ClientApp with ``secagg_mod`` on both train and evaluate (cheap numpy
    "training": x -> 0.9 x). Its evaluate derives site-specific metrics from the model
    it received and writes each plaintext reply's metrics to ``dump`` (out of band, what
    plain Flower's server would have received), so a test can compare the secure
    aggregate with plain FedAvg's."""
    from flwr.app import MetricRecord, RecordDict

    app = ClientApp()

    @app.train(mods=[secagg_mod])
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        arrays = ArrayRecord({k: Array((0.9 * a.numpy()).astype(a.numpy().dtype)) for k, a in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10 + pid})}), reply_to=msg)

    @app.evaluate(mods=[secagg_mod])
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])
        w = np.concatenate([a.numpy().ravel() for a in msg.content["arrays"].values()]).astype(np.float64)
        metrics = {"num-examples": 5 * pid + 2, "eval_loss": float(np.mean(w**2)) + 0.3 * pid, "eval_acc": 0.1 + 0.2 * pid}
        with (dump / f"e{rnd}_p{pid}.pkl").open("wb") as f:
            pickle.dump(metrics, f)
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def load_eval_dump(dump: Path, rnd: int) -> list[dict[str, Any]]:
    out = []
    for p in sorted(dump.glob(f"e{rnd}_p*.pkl")):
        with p.open("rb") as f:
            out.append(pickle.load(f))
    return out


def cheating_encoder(factor: int) -> Callable[..., Any]:
    """A malicious site's encoder (issue 31): the honest encoding, then the words that
    carry the model delta multiplied by ``factor`` modulo the word width, unclipped (a
    cheater need not use our encoder; this is what it can put in its masked vector)."""
    from dataclasses import replace

    from sgs_flower.pipeline import validation_body
    from sgs_flower.secagg.quantize import from_field, to_field

    def encode(delta: np.ndarray, metrics: dict[str, float], weight: int, spec: Any, context: Context) -> Any:
        enc = default_encoder(delta, metrics, weight, spec, context)
        body = validation_body(spec, int(delta.size))
        words = np.array(enc.vector, copy=True)
        words[:body] = to_field(from_field(words[:body], spec.field_bits) * factor, spec.field_bits)
        return replace(enc, vector=words)

    return encode



def tampering_client(cheater: int, attack: str) -> ClientApp:
    """The app's train behind ``secagg_mod`` everywhere; partition ``cheater`` runs a mod
    that lies in its validated round's proof (issue 31), signing what it sends with its
    own identity key for the round's challenge (so the server holds evidence against it):

    - ``"forged"``: its proof with bytes flipped inside the range proof;
    - ``"replayed"``: in round 2, its round-1 proof (a proof for another round);
    - ``"small-proof"``: it masks 10^6 x its update but proves a zero vector (it rewrites
      the body its protocol client kept for the proof, in its own state)."""
    from flwr.app import ConfigRecord

    from sgs_flower.secagg import identity
    from sgs_flower.secagg.input_validation import proof_statement
    from sgs_flower.site.store import IDENTITY_KEY, STATE_KEY

    app = ClientApp()
    big = cheating_encoder(10**6)

    def state_field(context: Context, suffix: str) -> tuple[str, Any]:
        rec = context.state.config_records[STATE_KEY]
        key = next(k for k in rec if k.endswith(suffix))
        return key, rec[key]

    def resign(reply: Message, context: Context, proof: bytes) -> Message:
        rec = reply.content.config_records[wire.RECORD_KEY]
        msg = wire.decode(bytes(rec[wire.FIELD_PAYLOAD]))
        seed = bytes(state_field(context, "validation.seed")[1])
        ident = bytes(context.state.config_records[IDENTITY_KEY]["key"])
        sig = identity.sign(ident, proof_statement(msg.run_id, msg.round_id, msg.sender, seed, proof))
        rec[wire.FIELD_PAYLOAD] = wire.encode(replace_fields(msg, proof=proof, proof_signature=sig))
        return reply

    def mod(msg: Message, context: Context, call_next):  # type: ignore[no-untyped-def]
        if int(context.node_config["partition-id"]) != cheater:
            return secagg_mod(msg, context, call_next)
        rec = msg.content.config_records.get(wire.RECORD_KEY)
        stage = int(rec[wire.FIELD_STAGE]) if rec is not None else 0
        if attack == "small-proof" and stage == int(Stage.MASKED_INPUT):
            return run_secagg(msg, context, call_next, big)
        if attack == "small-proof" and stage == int(Stage.CONSISTENCY):
            key, x = state_field(context, "validation.x")  # prove zeros instead: within any bound
            context.state.config_records[STATE_KEY][key] = bytes(len(bytes(x)))
        reply = secagg_mod(msg, context, call_next)
        if stage != int(Stage.CONSISTENCY) or not reply.has_content():
            return reply
        sent = wire.decode(bytes(reply.content.config_records[wire.RECORD_KEY][wire.FIELD_PAYLOAD]))
        if attack == "forged":
            proof = bytearray(sent.proof)
            proof[-40] ^= 0xFF
            return resign(reply, context, bytes(proof))
        if attack == "replayed":
            kept = context.state.config_records.get("test.cheater")
            if kept is None:
                context.state.config_records["test.cheater"] = ConfigRecord({"proof": sent.proof})
                return reply
            return resign(reply, context, bytes(kept["proof"]))
        return reply

    @app.train(mods=[mod])
    def train(msg: Message, context: Context) -> Message:
        return app_client.train(msg, context)

    return app


def replace_fields(msg: Any, **kw: Any) -> Any:
    from dataclasses import replace

    return replace(msg, **kw)
