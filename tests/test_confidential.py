"""The model-confidential mode (issue 20): the server never holds the global model.

The whole strategy loop runs in process (:mod:`tests.inprocess_grid`): every site is the
real ``secagg_mod`` in front of a deterministic train step, every attack is a Grid that
changes what the sites receive. What is checked:

- the model the sites unmask each round is FedAvg's weighted mean of the survivors'
  models, within the quantization bound of the same run under plain secure aggregation;
- no array the server holds (replies, masked models) correlates with the true model;
- a chosen offset, a lying survivor list, a replayed older model, a site's own masked
  input sent back as "the model", a plaintext model after the first round: refused;
- the model key: a key from an identity off the roster, a second key for a site that
  holds one, an envelope for another site: refused; dropping sites does not make the
  key change; without a roster the documented limit holds;
- strategies and server steps that need the plaintext are refused with a typed error;
- ``sgs-flower unmask`` recovers the model from the saved file, and refuses a tampered one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx
from inprocess_grid import DirectGrid, Site

from clients import confidential_site
from sgs_flower.cli import main as cli_main
from sgs_flower.confidential import masked_model as mm
from sgs_flower.confidential import model_key as mk
from sgs_flower.dp.config import DPConfig
from sgs_flower.pipeline import UpdateSpec
from sgs_flower.secagg import identity, wire
from sgs_flower.secagg.errors import ConfigurationError, ModelKeyError
from strategies import SecAggConfig, SecAggStrategy, SecureAggregationFailed
from strategies.model_key_phase import KEY_RECORD, ensure_model_key
from strategies.secagg_strategy import parse_reply

N = 5
SHAPES = {"w": (3, 4), "b": (4,)}


def initial(shapes: dict[str, tuple[int, ...]] = SHAPES, seed: int = 0) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({k: Array(rng.normal(0, 0.3, s).astype(np.float32)) for k, s in shapes.items()})


def strategy(confidential: bool = True, n: int = N, fraction_evaluate: float = 0.0, **kw: object) -> SecAggStrategy:
    inner = FedAvg(fraction_train=1.0, fraction_evaluate=fraction_evaluate, min_available_nodes=n,
                   min_train_nodes=n, min_evaluate_nodes=n)
    cfg = dict(confidential=confidential, clip_range=4.0, node_wait_timeout=1, max_consecutive_aborts=10)
    cfg.update(kw)
    return SecAggStrategy(inner, SecAggConfig(**cfg))  # type: ignore[arg-type]


def sites(n: int = N, node_config: dict | None = None) -> dict[int, Site]:
    return {u: Site(u, node_config) for u in range(1, n + 1)}


def run(grid: DirectGrid, rounds: int = 3, st: SecAggStrategy | None = None, init: ArrayRecord | None = None):
    st = st or strategy(n=len(grid.sites))
    res = st.start(grid=grid, initial_arrays=init or initial(), num_rounds=rounds,
                   train_config=ConfigRecord({"lr": 0.1}))
    return st, res


def fedavg_of(site_list: list[Site], model: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the sites' train step makes of ``model``, averaged with their weights."""
    total = sum(s.weight for s in site_list)
    out = {k: np.zeros_like(v, dtype=np.float64) for k, v in model.items()}
    for s in site_list:
        rng = np.random.default_rng(s.context.node_id)  # as Site.train draws: one stream over the entries
        for k, v in model.items():
            out[k] += s.weight * (0.5 * v + 0.5 * rng.normal(0.2, 0.3, v.shape)).astype(v.dtype).astype(np.float64)
    return {k: v / total for k, v in out.items()}


# ---------------------------------------------------------------- the honest run
def test_sites_unmask_fedavg_of_the_survivors_models():
    ss = sites()
    st, res = run(DirectGrid(ss), rounds=3)
    assert [r.status for r in st.reports] == ["ok"] * 3
    assert [r.exchanges for r in st.reports] == [5, 3, 3]  # the pipelined rounds still hold
    assert set(res.arrays.keys()) == {mm.WORDS_KEY, mm.META_KEY}  # the Result holds only the masked model
    for r in (1, 2):  # what every site was given in round r + 1 is FedAvg of round r
        expect = fedavg_of(list(ss.values()), ss[1].seen[r - 1])
        bound = st.reports[r - 1].error_bound + 1e-6  # the bound the round released (absolute)
        for s in ss.values():
            for k in SHAPES:
                np.testing.assert_allclose(s.seen[r][k], expect[k], atol=bound)
    # at equal 32-bit words, the same run under plain secure aggregation reaches the same
    # model (at the default narrow widths the two quantize different things, the model
    # and its change, so each is held to its own bound above)
    wide, plain_sites = sites(node_config={"sgs-state-file": "memory"}), sites(node_config={"sgs-state-file": "memory"})
    run(DirectGrid(wide), rounds=3, st=strategy(field_bits=32))
    run(DirectGrid(plain_sites), rounds=3, st=strategy(confidential=False, field_bits=32))
    for k in SHAPES:
        np.testing.assert_allclose(wide[1].seen[2][k], plain_sites[1].seen[2][k], atol=1e-4)


def test_secure_evaluation_of_the_masked_model_is_all_the_server_learns():
    """Federated evaluation in this mode: each site unmasks the model it is asked to
    evaluate (the round's masked model) and its metrics are aggregated securely; the
    server gets the weighted mean of a metric of the true model, and no plaintext model
    ever travels."""
    ss = sites()
    grid = DirectGrid(ss)
    st, res = run(grid, rounds=2, st=strategy(fraction_evaluate=1.0))
    assert [r.status for r in st.reports] == ["ok", "ok"]
    assert all(len(s.evaluated) == 2 for s in ss.values())
    for rnd in (1, 2):
        truth = ss[1].evaluated[rnd - 1]
        assert all(np.array_equal(s.evaluated[rnd - 1]["w"], truth["w"]) for s in ss.values())
        mean = float(np.mean(np.concatenate([v.ravel() for v in truth.values()])))
        got = float(res.evaluate_metrics_clientapp[rnd]["mean_w"])
        assert abs(got - mean) < 1e-6, (got, mean)
    expect = fedavg_of(list(ss.values()), ss[1].seen[1])  # round 2's evaluated model is round 2's output
    bound = st.reports[1].error_bound + 1e-6  # the bound the round released (absolute, per coordinate)
    np.testing.assert_allclose(ss[3].evaluated[1]["w"], expect["w"], atol=bound)
    plaintext = [m for m in grid.sent if "arrays" in m.content.array_records
                 and mm.WORDS_KEY not in m.content.array_records["arrays"]]
    assert len(plaintext) == N  # round 1's initial model only; every evaluation got the masked one


def test_a_plaintext_model_to_evaluate_is_refused_once_the_run_is_masked():
    ss = sites()

    class PlainEvalGrid(DirectGrid):
        def outgoing(self, messages):  # type: ignore[no-untyped-def]
            for m in messages:
                if m.metadata.message_type == "evaluate" and "arrays" in m.content.array_records:
                    m.content["arrays"] = ArrayRecord({k: Array(np.full(s, 0.5, np.float32)) for k, s in SHAPES.items()})
            return messages

    grid = PlainEvalGrid(ss)
    _, res = run(grid, rounds=2, st=strategy(fraction_evaluate=1.0))
    assert 2 not in res.evaluate_metrics_clientapp
    refusals = [r.error.reason for r in grid.received if r.has_error()]
    assert any("a plaintext model to evaluate (one the server chose) is refused" in r for r in refusals), refusals
    assert all(len(s.evaluated) <= 1 for s in ss.values())


def test_retry_when_the_model_exceeds_the_range():
    """Whole models beyond the public range wrap inside the sum and are retried at a
    covering range: the same model comes out (range 0.25, values up to ~1)."""
    ss = sites()
    st, _ = run(DirectGrid(ss), rounds=2, st=strategy(clip_range=0.25))
    assert st.reports[0].status == "ok" and st.reports[0].retries >= 1
    expect = fedavg_of(list(ss.values()), ss[1].seen[0])
    for k in SHAPES:
        np.testing.assert_allclose(ss[2].seen[1][k], expect[k], atol=1e-4)


def _flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(v, dtype=np.float64).ravel() for v in model.values()])


def _corr(words: np.ndarray, truth: np.ndarray, field_bits: int = 32) -> float:
    x = words[: truth.size].astype(np.int64)
    x = np.where(x >= 1 << (field_bits - 1), x - (1 << field_bits), x).astype(np.float64)  # centred lift
    return float(np.corrcoef(x, truth)[0, 1])


def test_no_array_the_server_holds_correlates_with_the_model():
    """200,000 coordinates (one random vector's correlation has std 0.0022): every masked
    input the server received and every masked model it held, against the true model of
    every round, below 0.01."""
    shapes = {"w": (400, 500)}
    ss = sites()
    grid = DirectGrid(ss)
    st, res = run(grid, rounds=3, init=initial(shapes))
    assert [r.status for r in st.reports] == ["ok"] * 3
    truths = [_flat(s) for s in ss[1].seen] + [_flat(ss[1].seen[-1])]
    held: list[np.ndarray] = [res.arrays[mm.WORDS_KEY].numpy()]
    for reply in grid.received:
        vec = reply.content.array_records.get(wire.VECTOR_KEY)
        if vec is not None:
            held.append(np.asarray(parse_reply(reply).vector))  # the masked vector, unpacked
        for rec in reply.content.array_records.values():  # nothing else carries arrays
            assert set(rec.keys()) <= {wire.FIELD_VECTOR}
    for msg in grid.sent:  # what the server sent: the masked models of rounds 2 and 3
        a = msg.content.array_records.get("arrays")
        if a is not None and mm.WORDS_KEY in a:
            held.append(a[mm.WORDS_KEY].numpy())
    assert len(held) >= 3 * N + 3
    worst = max(abs(_corr(h, t)) for h in held for t in truths)
    assert worst < 0.01, worst
    # the control: the plaintext model itself, encoded, is what the test would catch
    assert abs(np.corrcoef(truths[1] + 0.01 * np.random.default_rng(0).normal(size=truths[1].size),
                           truths[1])[0, 1]) > 0.9


# ---------------------------------------------------------------- a lying server
class TamperGrid(DirectGrid):
    """Changes the masked model a round's masked-input request carries."""

    def __init__(self, ss: dict[int, Site], round_: int, change) -> None:  # type: ignore[no-untyped-def]
        super().__init__(ss)
        self.round_, self.change = round_, change
        self.masked: dict[int, ArrayRecord] = {}  # round -> masked model the server sent
        self.inputs: dict[int, np.ndarray] = {}  # one site's masked input of round 1

    def outgoing(self, messages: list[Message]) -> list[Message]:
        for m in messages:
            a = m.content.array_records.get("arrays")
            if a is None:
                continue
            rnd = int(m.metadata.group_id)
            if mm.WORDS_KEY in a:
                self.masked.setdefault(rnd, a)
            if rnd == self.round_:
                new = self.change(self, a, m.metadata.dst_node_id)
                if new is not None:
                    m.content["arrays"] = new
        return messages

    def pull_messages(self, message_ids):  # type: ignore[no-untyped-def]
        out = list(super().pull_messages(message_ids))
        for r in out:
            if r.has_error():
                continue
            v = r.content.array_records.get(wire.VECTOR_KEY)
            if v is not None and not self.inputs:
                self.inputs[r.metadata.src_node_id] = np.asarray(parse_reply(r).vector).copy()
        return out


def _masked(a: ArrayRecord) -> mm.MaskedModel:
    return mm.MaskedModel.from_arrays({k: v.numpy() for k, v in a.items()})


def _record(m: mm.MaskedModel) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in m.to_arrays().items()})


def _refusals(grid: DirectGrid, round_: int) -> list[str]:
    return [r.error.reason for r in grid.received if r.has_error() and r.metadata.group_id == str(round_)]


def _offset(grid: TamperGrid, a: ArrayRecord, node: int) -> ArrayRecord:
    m = _masked(a)
    words = m.words.copy()
    words[0] += np.uint32(1 << 20)  # shift one model coordinate by a known amount
    return _record(mm.MaskedModel(words, m.run_id, m.round_id, m.attempt, m.survivors, m.key_id, m.spec, m.layout))


def _fewer_survivors(grid: TamperGrid, a: ArrayRecord, node: int) -> ArrayRecord:
    m = _masked(a)
    return _record(mm.MaskedModel(m.words, m.run_id, m.round_id, m.attempt, m.survivors[1:], m.key_id, m.spec,
                                  m.layout))


def _replay_round_2(grid: TamperGrid, a: ArrayRecord, node: int) -> ArrayRecord:
    return grid.masked[2]


def _own_input(grid: TamperGrid, a: ArrayRecord, node: int) -> ArrayRecord:
    """The victim's own masked input of round 1, sent back as 'the model' (with the
    public facts of a real masked model, so only the MAC can tell)."""
    m = _masked(a)
    (_victim, words), = grid.inputs.items()
    return _record(mm.MaskedModel(words.astype(m.words.dtype), m.run_id, m.round_id, m.attempt, m.survivors,
                                  m.key_id, m.spec, m.layout))


def _chosen_plaintext(grid: TamperGrid, a: ArrayRecord, node: int) -> ArrayRecord:
    return ArrayRecord({k: Array(np.full(s, 0.5, dtype=np.float32)) for k, s in SHAPES.items()})


@pytest.mark.parametrize(("change", "round_", "why"), [
    (_offset, 2, "ModelIntegrityError: the masked model fails its MAC"),
    (_fewer_survivors, 2, "ModelIntegrityError: the masked model fails its MAC"),
    (_own_input, 2, "ModelIntegrityError: the masked model fails its MAC"),
    # the model sent in round 2 (round 1's sum) again in round 4, after round 2's was unmasked
    (_replay_round_2, 4, "ModelIntegrityError: the masked model is of round 1, older than round 2"),
    (_chosen_plaintext, 3, "ModelIntegrityError: this run's model is masked since round 1"),
])
def test_lying_server_model_is_refused(change, round_, why):
    ss = sites()
    grid = TamperGrid(ss, round_, change)
    st, _ = run(grid, rounds=round_)
    assert st.reports[round_ - 1].status == "aborted"
    refusals = _refusals(grid, round_)
    assert len(refusals) == N and all(r.startswith(why) for r in refusals), refusals
    assert all(s.seen[-1] is not None and len(s.seen) == round_ - 1 for s in ss.values())  # nobody trained on it


def test_what_a_replay_gives_the_server_is_masked_too():
    """Shown to learn nothing: even a site that accepts a genuine older model (one that
    never unmasked a newer one, e.g. a new site) sends a sum under fresh masks."""
    ss = sites()
    grid = DirectGrid(ss)
    _st, res = run(grid, rounds=2)
    m = _masked(res.arrays)
    again = mm.MaskedModel.from_arrays({k: v.numpy() for k, v in res.arrays.items()})
    assert np.array_equal(m.words, again.words)
    key = confidential_site.load_key_state(ss[1].context, None, _policy()).key
    ctx = m.context
    a, b = mm.site_mask(key, ctx, 0, 1, 100), mm.site_mask(key, mm.RoundContext(ctx.run_id, ctx.round_id + 1,
                                                                               ctx.spec, ctx.layout), 0, 1, 100)
    assert not np.array_equal(a, b)  # another round, other masks


def _policy():  # type: ignore[no-untyped-def]
    from sgs_flower.secagg.policy import ClientPolicy
    return ClientPolicy()


# ---------------------------------------------------------------- the model key
def _rostered(tmp_path: Path, n: int, extra: int = 0) -> tuple[dict[int, Site], list[bytes]]:
    """n sites with identity files and one roster of the first n (``extra`` more
    identities are made but left off the roster)."""
    keys = []
    for u in range(1, n + extra + 1):
        identity.write_identity(tmp_path / f"id{u}")
        keys.append(identity.read_identity(tmp_path / f"id{u}"))
    (tmp_path / "roster").write_text("".join(identity.identity_public(k).hex() + "\n" for k in keys[:n]))
    ss = {u: Site(u, {"sgs-identity-key": str(tmp_path / f"id{u}"), "sgs-roster": str(tmp_path / "roster")})
          for u in range(1, n + extra + 1)}
    return ss, keys


def test_rostered_run_agrees_one_key_and_trains(tmp_path):
    ss, _ = _rostered(tmp_path, N)
    st, _ = run(DirectGrid(ss), rounds=2)
    assert [r.status for r in st.reports] == ["ok", "ok"]
    ids = {confidential_site.load_key_state(s.context, _state_path(s), _site_policy(s)).key_id for s in ss.values()}
    assert ids == {st.model_key}


def _site_policy(s: Site):  # type: ignore[no-untyped-def]
    from sgs_flower.secagg.policy import site_policy
    return site_policy(s.context.node_config)


def _state_path(s: Site) -> Path | None:
    from clients.secagg_mod import _identity, _state_file
    pol = _site_policy(s)
    return _state_file(s.context, pol, _identity(s.context, pol))


def _key_msg(node: int, fields: dict) -> Message:
    return Message(RecordDict({KEY_RECORD: ConfigRecord(fields)}), dst_node_id=node, message_type="train",
                   group_id="model-key")


def test_key_from_an_identity_off_the_roster_is_refused(tmp_path):
    """The server plays leader with an identity of its own: the site refuses its key."""
    ss, keys = _rostered(tmp_path, N, extra=1)
    grid = DirectGrid(ss)
    victim, rogue = ss[1], ss[N + 1]  # the rogue's identity is not on the roster
    status = grid.send_and_receive([_key_msg(1, {"op": "status"})])
    ann = next(iter(status)).content.config_records[KEY_RECORD]
    rogue_state = mk.KeyState.fresh(mk.roster_digest(_site_policy(victim).roster))
    a = mk.Announcement.from_record(dict(ann))
    _, env = mk.wrap_for(rogue_state, keys[N], 1, [a], None)  # the server wraps a key it knows
    reply = next(iter(grid.send_and_receive([_key_msg(1, {"op": "install", "key-id": mk.key_id(
        b"", ""), "leader": identity.identity_public(keys[N]), "envelope": env[0][0], "signature": env[0][1]})])))
    assert reply.has_error() and reply.error.reason.startswith(
        "ModelKeyError: the model key comes from an identity that is not on this site's roster")
    del rogue


def test_a_site_never_replaces_its_key_and_dropping_sites_changes_nothing(tmp_path):
    ss, keys = _rostered(tmp_path, N)
    grid = DirectGrid(ss)
    first = ensure_model_key(grid, [1, 2, 3], 1, 5, 0.01)
    # the server leaves sites 1..3 out and asks sites 4, 5 alone: they get the SAME key,
    # wrapped by a site that holds it (no fresh key the server could choose)
    del grid.sites[1], grid.sites[2]
    second = ensure_model_key(grid, [3, 4, 5], 1, 5, 0.01)
    assert second.key_id == first.key_id and second.holders == {3, 4, 5}
    # a second, different key (another roster site made one) is refused by a holder
    other = mk.KeyState.fresh(mk.roster_digest(_site_policy(ss[4]).roster))
    ann = mk.Announcement.from_record(dict(next(iter(grid.send_and_receive([_key_msg(4, {"op": "status"})])))
                                           .content.config_records[KEY_RECORD]))
    made, env = mk.wrap_for(other, keys[0], 1, [ann], _site_policy(ss[4]).roster)  # site 1's identity, new key
    reply = next(iter(grid.send_and_receive([_key_msg(4, {"op": "install", "key-id": made.key_id,
                                                     "leader": identity.identity_public(keys[0]),
                                                     "envelope": env[0][0], "signature": env[0][1]})])))
    assert reply.has_error() and "already holds a different model key" in reply.error.reason
    # an envelope made for site 4, delivered to site 5: refused
    reply = next(iter(grid.send_and_receive([_key_msg(5, {"op": "install", "key-id": made.key_id,
                                                     "leader": identity.identity_public(keys[0]),
                                                     "envelope": env[0][0], "signature": env[0][1]})])))
    assert reply.has_error() and reply.error.reason.startswith("ModelKeyError: the model-key envelope is not signed")


def test_leader_refuses_to_wrap_for_an_identity_off_its_roster(tmp_path):
    ss, _ = _rostered(tmp_path, N, extra=1)
    grid = DirectGrid(ss)
    ensure_model_key(grid, [1, 2, 3], 1, 5, 0.01)
    res = ensure_model_key(grid, [1, N + 1], 1, 5, 0.01)  # the server adds a node of its own
    assert N + 1 not in res.holders
    assert "not on this site's roster" in res.errors[N + 1]


def test_a_new_roster_means_a_new_key(tmp_path):
    ss, keys = _rostered(tmp_path, N)
    grid = DirectGrid(ss)
    first = ensure_model_key(grid, list(ss), 1, 5, 0.01)
    (tmp_path / "roster").write_text("".join(identity.identity_public(k).hex() + "\n" for k in keys[:4]))
    del grid.sites[5]
    for s in ss.values():
        s.context.state = RecordDict()  # the policy is re-read from the node config
    second = ensure_model_key(grid, [1, 2, 3, 4], 1, 5, 0.01)
    assert second.key_id != first.key_id and second.holders == {1, 2, 3, 4}


def test_without_a_roster_a_server_made_leader_is_accepted_documented_limit():
    """docs/threat_model.md: without sgs-roster the server can enrol a site of its own and
    hand out a key it knows; confidentiality then holds against an honest server only."""
    ss = sites()
    grid = DirectGrid(ss)
    ann = mk.Announcement.from_record(dict(next(iter(grid.send_and_receive([_key_msg(1, {"op": "status"})])))
                                           .content.config_records[KEY_RECORD]))
    rogue = identity.generate_identity()
    made, env = mk.wrap_for(mk.KeyState.fresh(""), rogue, 1, [ann], None)
    reply = next(iter(grid.send_and_receive([_key_msg(1, {"op": "install", "key-id": made.key_id,
                                                     "leader": identity.identity_public(rogue),
                                                     "envelope": env[0][0], "signature": env[0][1]})])))
    assert not reply.has_error()


# ---------------------------------------------------------------- what cannot be confidential
@pytest.mark.parametrize(("inner", "why"), [
    (FedAdam(), "FedAdam applies its own server update"),
    (FedAvgM(server_momentum=0.9), "FedAvgM applies its own server update"),
])
def test_strategies_that_need_the_plaintext_are_refused(inner, why):
    with pytest.raises(ConfigurationError, match=why):
        SecAggStrategy(inner, SecAggConfig(confidential=True))


def test_fedprox_is_accepted():
    SecAggStrategy(FedProx(proximal_mu=0.1), SecAggConfig(confidential=True))


def test_central_dp_and_server_side_evaluation_are_refused():
    with pytest.raises(ConfigurationError, match="does not combine with the model-confidential mode"):
        SecAggStrategy(FedAvg(), SecAggConfig(confidential=True), dp=DPConfig(mode="central-dp", clip_norm=1.0,
                                                                           noise_multiplier=1.0))
    st = strategy()
    with pytest.raises(ConfigurationError, match=r"evaluate_fn .* needs the plaintext global model"):
        st.start(grid=DirectGrid(sites()), initial_arrays=initial(), num_rounds=1,
                 evaluate_fn=lambda r, a: MetricRecord({}))
    with pytest.raises(ConfigurationError, match="does not combine with DP"):
        UpdateSpec(clip_range=1.0, max_cohort=5, max_weight=1, dp_mode="central", l2_clip=1.0, model_key="0" * 32)


def test_site_policy_requires_the_confidential_mode():
    ss = sites(node_config={"sgs-require-confidential": "true"})
    grid = DirectGrid(ss)
    st = strategy(confidential=False)
    with pytest.raises(SecureAggregationFailed):
        run(grid, rounds=1, st=st)
    assert st.reports[0].status == "aborted"
    assert all(r.startswith("PolicyError: this site requires the model-confidential mode") for r in _refusals(grid, 1))


# ---------------------------------------------------------------- the released model
def test_unmask_command_recovers_the_model_and_refuses_a_tampered_file(tmp_path, capsys):
    ss, _ = _rostered(tmp_path, N)
    st, res = run(DirectGrid(ss), rounds=2)
    masked = tmp_path / "masked.npz"
    np.savez(masked, **{k: v.numpy() for k, v in res.arrays.items()})
    out = tmp_path / "model.npz"
    key_file = confidential_site.key_file(_state_path(ss[2]))
    assert key_file is not None and key_file.exists() and (key_file.stat().st_mode & 0o777) == 0o600
    assert cli_main(["unmask", str(masked), str(out), "--key", str(key_file)]) == 0
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    expect = fedavg_of(list(ss.values()), ss[1].seen[1])
    bound = st.reports[1].error_bound + 1e-6  # the bound the round released (absolute, per coordinate)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], expect[k], atol=bound)
    # a key folder is searched for the right key file
    assert cli_main(["unmask", str(masked), str(out), "--key", str(key_file.parent)]) == 0
    m = _masked(res.arrays)
    words = m.words.copy()
    words[3] ^= np.uint32(1)
    np.savez(masked, **mm.MaskedModel(words, m.run_id, m.round_id, m.attempt, m.survivors, m.key_id, m.spec,
                                      m.layout).to_arrays())
    assert cli_main(["unmask", str(masked), str(out), "--key", str(key_file)]) == 1
    assert "fails its MAC" in capsys.readouterr().err
    meta = json.loads(m.to_arrays()[mm.META_KEY].tobytes())  # what the server holds beside the words
    key = mk.load_key_file(key_file).key
    assert meta["key-id"] == st.model_key and key.hex() not in json.dumps(meta)


def test_key_errors_are_typed():
    state = mk.KeyState.fresh("")
    with pytest.raises(ModelKeyError, match="not signed by the leader"):
        mk.install(state, identity.generate_identity(), 1, "0" * 32, identity.identity_public(
            identity.generate_identity()), b"x" * 100, b"y" * 64, None)


def test_an_unreadable_key_file_refuses_evaluation_instead_of_accepting_a_plaintext_model():
    """Fail closed: a site whose model-key file cannot be read does not evaluate a model
    it is sent (it cannot tell whether the run is masked), it replies an error first."""
    ss = sites()
    grid = DirectGrid(ss)
    run(grid, rounds=2)
    key_file = confidential_site.key_file(_state_path(ss[1]))
    assert key_file is not None and key_file.exists()
    key_file.write_text("{not json")
    plain = ArrayRecord({k: Array(np.full(s, 0.5, np.float32)) for k, s in SHAPES.items()})
    from clients.secagg_mod import _local_model_message

    msg = Message(RecordDict({"arrays": plain, "config": ConfigRecord({})}), dst_node_id=1, message_type="evaluate",
                  group_id="1")
    with pytest.raises(ValueError):
        _local_model_message(msg, ss[1].context, _site_policy(ss[1]), _state_path(ss[1]))
    assert len(ss[1].evaluated) == 0


class _DropAtMasked(DirectGrid):
    """Node ``node`` never gets round ``rnd``'s masked-input request (it drops there)."""

    def __init__(self, sites: dict[int, Site], node: int, rnd: int) -> None:
        super().__init__(sites)
        self.node, self.rnd = node, rnd

    def outgoing(self, messages: list[Message]) -> list[Message]:
        def dropped(m: Message) -> bool:
            rec = m.content.config_records.get(wire.RECORD_KEY)
            return (m.metadata.dst_node_id == self.node and rec is not None and str(m.metadata.group_id) == str(self.rnd)
                    and rec.get(wire.FIELD_STAGE) == int(wire.Stage.MASKED_INPUT))
        return [m for m in messages if not dropped(m)]


def test_a_dropout_takes_its_whole_group_out_of_the_masked_model_too():
    """The model-confidential mode at the default whole-group participation, nine sites
    (three learnt groups of 3): site 1 drops at round 2's masked input, its group-mates are
    left out with it, and the model every site unmasks in round 3 is FedAvg of the six
    sites of the two whole groups left, within the round's bound."""
    ss = sites(9)
    st, _ = run(_DropAtMasked(ss, 1, 2), rounds=3, st=strategy(n=9))
    r2 = st.reports[1]
    assert [r.status for r in st.reports] == ["ok"] * 3
    assert r2.group_excluded == 2 and len(r2.survivors) == 6 and 1 not in r2.survivors
    survivors = [ss[u] for u in r2.survivors]
    expect = fedavg_of(survivors, survivors[0].seen[1])
    for s in ss.values():
        for k in SHAPES:
            np.testing.assert_allclose(s.seen[-1][k], expect[k], atol=r2.error_bound + 1e-6)
