"""Acceptance tests of issue 5 for the secure app on a real local deployment.

A real ``flower-superlink`` (TLS, SuperNode authentication) and real ``flower-supernode``
processes on 127.0.0.1 (``sgs_flower.deploy``), the sgs-flower app
(``sgs_flower.app.server_app:app`` / ``client_app:app``) submitted with ``flwr run``.
One deployment (3 SuperNodes, partition ``i`` of 3) is shared by the module; the tests
run in file order and the SuperNode-kill test must stay last (the killed node is listed
as online by the SuperLink for ~60 s afterwards). See ``docs/deployment.md`` for the
measured timings and the derivation of the comparison bound.

Run-config keys used (``sgs_flower/app/settings.py``): ``preset``, ``num-server-rounds``,
``min-nodes``, ``min-clients``, ``stage-timeout``, ``dp-mode`` (via the presets),
``clip-norm``, ``noise-multiplier``, ``max-epsilon``, ``min-survivors``; ``results-file``
and ``ledger`` are filled in (absolute paths) by ``LocalDeployment.run``.
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sgs_flower.deploy import (
    LocalDeployment,
    RunResult,
    pid_alive,
    pids_with_marker,
    verify_ledger,
)
from sgs_flower.deploy.identities import roster_setup

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the run() calls have their own

N_NODES = 3
ROUNDS = 2
# Distributed DP with (almost) no noise and a clip norm no update reaches, so that the
# secure aggregate can be compared with plaintext FedAvg (measured update L2 norms on
# this task: 0.32-0.45 per client and round, i.e. 4x below CLIP_NORM).
CLIP_NORM = 2.0
NOISE_MULTIPLIER = 1e-5  # must be > 0; std of the released mean = z * C / n = 6.7e-6
# Local training pinned (cheap, and the clip-norm margin below was measured for it);
# both runs of a comparison use the same values whatever pyproject.toml's defaults are.
# Whole-group participation is off on both sides in this module ("min-group": 0 here,
# sgs-min-group=0 in the sites' node config): three or four sites are one group of the
# default 3, the roster's fourth key (absent until the kill test adds its node) would keep
# that group from ever being whole, and the kill test's dropout would take it out whole.
# These tests are about distributed DP and dropout recovery in a deployment; the groups
# have their own (tests/test_groups.py, tests/test_dropin_attack.py).
TRAIN_CONFIG: dict[str, Any] = {"local-epochs": 1, "lr": 0.05, "batch-size": 32, "seed": 0, "min-group": 0}
DDP_RUN_CONFIG: dict[str, Any] = {
    **TRAIN_CONFIG,
    # distributed DP on the secagg preset's model and optimizer (the distributed-dp preset
    # is tuned for 100 SuperNodes: logistic regression, server momentum, tail averaging),
    # so that this run and the plain one train the same model the same way
    "preset": "secagg",
    "dp-mode": "distributed",
    "ledger": "outputs/privacy-ledger.jsonl",
    "num-server-rounds": ROUNDS,
    "clip-norm": CLIP_NORM,
    "noise-multiplier": NOISE_MULTIPLIER,
    "max-epsilon": 1e15,  # z = 1e-5 costs ~4e10 epsilon per round
    "min-survivors": N_NODES,  # required by dp-mode distributed (no default)
    "stage-timeout": 300.0,
}
PLAIN_RUN_CONFIG: dict[str, Any] = {**TRAIN_CONFIG, "preset": "plain", "num-server-rounds": ROUNDS}
# The bound's safety factor on the propagation of round-1 differences through round 2
# (local training is ~1-Lipschitz here: measured ratio 1.42 = sqrt(2) for two rounds of
# independent noise, i.e. ~1.0 per round).
AMPLIFICATION = 2.0
# SuperNode kill: 4 nodes, at least 3 per secure sum, short stage timeout.
KILL_STAGE_TIMEOUT = 45.0  # > the slowest healthy stage on a loaded 2-core box (~25 s)
KILL_RUN_CONFIG: dict[str, Any] = {
    **TRAIN_CONFIG,
    "preset": "secagg",
    "num-server-rounds": 2,
    "min-nodes": 3,
    "min-clients": 3,
    "stage-timeout": KILL_STAGE_TIMEOUT,
}


# ------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dep(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("deploy-secure")
    # Every site has its own Ed25519 identity and pins the roster (the victim of the kill
    # test included). These sites also accept the plain comparison run and the near-zero
    # noise of the comparison (sgs-dp-min-noise=0): both are a site's own opt-in; with
    # the default floor (0.5) they refuse z = 1e-5 and every round aborts.
    setup, _roster = roster_setup(workdir, N_NODES + 1)
    d = LocalDeployment(N_NODES, workdir, startup_timeout=180, node_setup=setup,
                        node_config_extra={"sgs-require-secagg": False, "sgs-dp-min-noise": 0.0,
                                           "sgs-min-group": 0})
    try:
        d.start()
        yield d
    finally:
        d.stop()
        # whatever happened in the tests: no process of this deployment survives
        assert pids_with_marker(d.marker) == set()
        assert d.all_pids() == set()


@pytest.fixture(scope="module")
def ddp_run(dep: LocalDeployment) -> RunResult:
    """The 2-round secure + distributed-DP run, shared by the aggregate and resume tests."""
    res = dep.run(ROOT, DDP_RUN_CONFIG, timeout=900)
    assert res.ok, res.stdout[-4000:]
    return res


@pytest.fixture(scope="module")
def plain_run(dep: LocalDeployment) -> RunResult:
    """Plain FedAvg with the same seeds and training: the reference of the secure runs."""
    plain = dep.run(ROOT, PLAIN_RUN_CONFIG, timeout=600)
    assert plain.ok, plain.stdout[-3000:]
    assert plain.result is not None and plain.result["rounds"] == []  # plain FedAvg
    return plain


# ------------------------------------------------------------------------- helpers
def load_model(res: RunResult) -> dict[str, np.ndarray]:
    assert res.model_file is not None, f"no model beside {res.results_file}"
    with np.load(res.model_file) as z:
        return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}


def flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([model[k].ravel() for k in model])  # npz keeps state_dict order


def run_round_records(ledger: Path, first_round: int, last_round: int) -> list[dict[str, Any]]:
    from sgs_flower.ledger import Ledger

    return [
        r for r in Ledger.open(ledger).round_records() if first_round <= int(r["round"]) <= last_round
    ]


def partition_sizes(n: int) -> list[int]:
    from sgs_flower.digits import load_partition

    return [len(load_partition(i, n, "iid", 0.5, 0)) for i in range(n)]


def comparison_bound(records: list[dict[str, Any]], sizes: list[int], dim: int) -> dict[str, float]:
    """L2 bound on ``final(secure + distributed DP) - final(plaintext FedAvg)``.

    Per round r the DP release is ``mean_i(delta_i) + xi_r + q_r`` and FedAvg's is
    ``sum_i w_i delta_i`` with ``w_i = n_i / N``:

    * noise ``xi_r``: per coordinate std ``s_r = noise.std_real / survivors`` (ledger);
      over ``dim`` coordinates ``||xi|| ~ sqrt(dim * sum_r s_r^2)`` (chi concentration,
      +-2% at dim ~ 38k);
    * weighting: ``||sum_i (w_i - 1/n) delta_i|| <= C * sum_i |w_i - 1/n|`` per round
      (no update reaches the clip norm C);
    * quantization: stochastic rounding to ``1/scale`` per coordinate of the rotated,
      padded vector, per client: ``||q_r|| <= sqrt(dim_pad) / scale``;

    and a round-1 difference reaches the final model through round-2 local training,
    which is ~1-Lipschitz here; every term gets the factor ``AMPLIFICATION``.
    """
    from sgs_flower.dp.rotation import padded_length

    n = len(sizes)
    total = sum(sizes)
    rounds = len(records)
    var = sum((float(r["noise"]["std_real"]) / int(r["survivors"])) ** 2 for r in records)
    noise = math.sqrt(dim * var)
    weighting = rounds * CLIP_NORM * sum(abs(s / total - 1 / n) for s in sizes)
    quant = sum(math.sqrt(padded_length(dim)) / float(r["noise"]["scale"]) for r in records)
    return {
        "noise": AMPLIFICATION * noise,
        "weighting": AMPLIFICATION * weighting,
        "quantization": AMPLIFICATION * quant,
        "total": AMPLIFICATION * (noise + weighting + quant),
    }


# ------------------------------------------------------------------------- tests
def test_three_supernodes_secagg_distributed_dp_matches_plaintext(
    dep: LocalDeployment, ddp_run: RunResult, plain_run: RunResult
) -> None:
    res = ddp_run
    assert res.result is not None, res.stdout[-3000:]
    rounds = res.result["rounds"]
    assert [r["status"] for r in rounds] == ["ok"] * ROUNDS, rounds
    node_ids = set(dep.node_ids.values())
    for r in rounds:
        assert set(r["survivors"]) == node_ids and not r["dropped"], r
    assert res.result["settings"]["dp-mode"] == "distributed"
    assert res.ledger_path is not None and res.ledger_path.is_absolute()
    ok, msg = verify_ledger(res.ledger_path)
    assert ok, msg
    records = run_round_records(res.ledger_path, 1, ROUNDS)
    assert len(records) == ROUNDS
    assert res.result["epsilon"]["consumer"] == pytest.approx(records[-1]["epsilon_consumer"])

    secure_model, plain_model = load_model(res), load_model(plain_run)
    assert list(secure_model) == list(plain_model)
    diff = flat(secure_model) - flat(plain_model)
    bound = comparison_bound(records, partition_sizes(N_NODES), diff.size)
    # the std in the ledger is what was asked for: z * C per sum of n survivors
    for r in records:
        assert float(r["noise"]["std_real"]) == pytest.approx(NOISE_MULTIPLIER * CLIP_NORM, rel=0.05)
    err = float(np.linalg.norm(diff))
    print(f"||secure - plain||_2 = {err:.3g}, max |.| = {np.abs(diff).max():.3g}; bound {bound}")
    assert err <= bound["total"], (err, bound)
    # ... and the bound is tight enough to catch a wrong aggregate: the model moved by
    # ~0.5 in two rounds, dropping or double-counting one client's update is >= ~0.1
    import torch

    from sgs_flower.digits import Net, get_weights

    torch.manual_seed(0)
    initial = np.concatenate([a.astype(np.float64).ravel() for a in get_weights(Net())])
    moved = float(np.linalg.norm(flat(plain_model) - initial))
    assert bound["total"] < 0.05 * moved, (bound, moved)


@pytest.mark.study  # ~1.5 min; resuming the ledger with a new ServerApp is in CI through Flower simulation
def test_new_serverapp_resumes_spent_epsilon(dep: LocalDeployment, ddp_run: RunResult) -> None:
    from sgs_flower.ledger import Ledger

    ledger = ddp_run.ledger_path
    assert ledger is not None
    before = Ledger.open(ledger)
    spent1, last1 = before.spent(), before.last_round
    assert spent1.consumer > 0 and last1 >= ROUNDS

    # a new `flwr run` = a new ServerApp process, same ledger (LocalDeployment keeps one
    # ledger per deployment)
    second = dep.run(ROOT, {**DDP_RUN_CONFIG, "num-server-rounds": 1}, timeout=600)
    assert second.ok, second.stdout[-3000:]
    assert second.ledger_path == ledger
    assert re.search(r"resuming after \d+ rounds", second.stdout), second.stdout[-3000:]
    after = Ledger.open(ledger)
    new = [r for r in after.round_records() if int(r["round"]) > last1]
    assert new, "the second run recorded no round"
    first_new = new[0]
    assert int(first_new["round"]) == last1 + 1  # round numbers continue
    assert float(first_new["epsilon_consumer"]) > spent1.consumer  # continues, never from 0
    assert float(first_new["epsilon_server"]) > spent1.server
    assert second.result is not None
    assert second.result["epsilon"]["consumer"] == pytest.approx(after.spent().consumer)
    ok, msg = verify_ledger(ledger)
    assert ok, msg


@pytest.mark.study  # ~2.5 min; the mode's guarantees are in test_confidential.py and the simulation test
def test_confidential_preset_trains_and_a_site_key_unmasks_the_model(
    dep: LocalDeployment, plain_run: RunResult, tmp_path: Path
) -> None:
    """Issue 20 on the deployment (TLS, auth, every site pinning the roster): the
    model-confidential preset trains; the server keeps only the masked model; the
    ``sgs-flower unmask`` command with one site's model-key file (beside its state
    file, mode 0600) recovers the plain run's model (same seeds: FedAvg) and its
    held-out accuracy."""
    import subprocess
    import sys

    conf = dep.run(ROOT, {**TRAIN_CONFIG, "preset": "confidential", "num-server-rounds": ROUNDS,
                          "stage-timeout": 300.0}, timeout=900)
    assert conf.ok, conf.stdout[-4000:]
    assert conf.result is not None and conf.result["confidential"]
    assert [r["status"] for r in conf.result["rounds"]] == ["ok"] * ROUNDS
    masked = Path(conf.result["masked_model"])
    with np.load(masked) as f:
        assert set(f.files) == {"sgs.masked-model", "sgs.masked-model.meta"}  # all the server kept
    keys = sorted(dep.workdir.rglob("*.model-key.json"))
    assert len(keys) == N_NODES and all((k.stat().st_mode & 0o777) == 0o600 for k in keys)
    out = tmp_path / "unmasked.npz"
    proc = subprocess.run([sys.executable, "-m", "sgs_flower.cli", "unmask", str(masked), str(out), "--key",
                           str(keys[0])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with np.load(out) as f:
        unmasked = {k: np.asarray(f[k], dtype=np.float64) for k in f.files}
    reference = load_model(plain_run)
    assert list(unmasked) == list(reference)
    diff = float(np.max(np.abs(flat(unmasked) - flat(reference))))
    # each round's released model is within its stated bound (the width is chosen per
    # round, docs/protocol.md "The word width"); local SGD carries round 1's through round 2
    bound = AMPLIFICATION * sum(r["error_bound"] for r in conf.result["rounds"]) + 1e-3
    assert diff < bound, (diff, bound)

    from sgs_flower.digits import evaluate, make_model, set_weights, train_test_split

    def accuracy(model: dict[str, np.ndarray]) -> float:
        net = make_model("cnn")
        set_weights(net, list(model.values()))
        return float(evaluate(net, train_test_split()[1])[1])

    acc, ref = accuracy(unmasked), accuracy(reference)
    print(f"confidential deployment: unmasked accuracy {acc:.4f}, plain {ref:.4f}, max |diff| {diff:.3g}")
    # the same model to the bound above: after 2 short rounds (accuracy ~43 %, where it is
    # steep in the weights) one quantization step moved it 0.8 points at narrow words; a
    # model unmasked wrongly would be at chance (~10 %)
    assert abs(acc - ref) < 0.02, (acc, ref)
    from sgs_flower.confidential.model_key import load_key_file

    assert {load_key_file(k).key_id for k in keys} == {conf.result["model_key"]}  # one key, every site


def _kill_after_key_sharing(dep: LocalDeployment, i: int, done: threading.Event) -> None:
    """Kill SuperNode ``i`` once it sent its 2nd reply of round 1 (stage SHARE_KEYS).

    The SuperNode logs ``[RUN <id>, ROUND <group>]`` and ``Sent successfully`` per reply;
    the strategy uses the round number as the message group id.
    """
    log = dep.supernodes[i].log
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not done.is_set():
        text = re.sub(r"\x1b\[[0-9;]*m", "", log.read_text(errors="replace"))
        m = re.search(r"\[RUN \d+, ROUND 1\]", text)
        if m and text[m.start() :].count("Sent successfully") >= 2:
            dep.kill_supernode(i)
            done.set()
            return
        time.sleep(0.2)


@pytest.mark.study  # ~3 min of stage timeouts; dropout recovery is in CI through Flower simulation
def test_killed_supernode_after_key_sharing(dep: LocalDeployment) -> None:
    """MUST STAY LAST in this module: it kills a SuperNode of the shared deployment."""
    # a 4th SuperNode (partition 3 of 4), so that 3 are left for "at least 3 per sum"
    victim = dep.add_supernode({"partition-id": N_NODES, "num-partitions": N_NODES + 1})
    dep.wait_for_nodes(N_NODES + 1)
    victim_id = dep.node_ids[victim]
    killed = threading.Event()
    t = threading.Thread(target=_kill_after_key_sharing, args=(dep, victim, killed), daemon=True)
    t.start()
    try:
        res = dep.run(ROOT, KILL_RUN_CONFIG, timeout=900)
    finally:
        killed.set()
        t.join(timeout=5)
    assert not dep.supernodes[victim].alive()
    assert not any(pid_alive(p) for p in dep.supernodes[victim].tree())
    assert res.ok, res.stdout[-4000:]
    assert res.result is not None
    r1, r2 = res.result["rounds"]
    for r in (r1, r2):
        print(f"round {r['server_round']}: {r['status']}, {len(r['survivors'])}/{len(r['cohort'])} "
              f"survivors, dropped {r['dropped']}, {r['seconds']:.0f} s")
    live = {dep.node_ids[i] for i in range(N_NODES)}
    assert victim_id in r1["cohort"]
    if r1["status"] == "ok":  # completed with the survivors, the victim's masks removed
        assert set(r1["survivors"]) == live, r1
        assert str(victim_id) in {str(k) for k in r1["dropped"]}, r1
        assert r1["dropped"][str(victim_id)] in ("MASKED_INPUT", "UNMASK"), r1
    else:  # or aborted cleanly (below threshold): model unchanged, next round runs
        assert r1["status"] == "aborted" and r1["reason"], r1
    # the next round proceeds with the survivors
    assert r2["status"] == "ok", r2
    assert set(r2["survivors"]) == live, r2
    assert res.result["accuracy"]["2"] > 0
