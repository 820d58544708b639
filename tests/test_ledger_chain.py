"""Ledger: hash chain, tamper detection, resume, second process, CLI and plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sgs_flower.cli import main
from sgs_flower.dp.accounting import PrivacyAccountant, round_events
from sgs_flower.dp.budget import BudgetExhaustedError, PrivacyBudget
from sgs_flower.dp.events import GaussianEvent, SkellamEvent
from sgs_flower.dp.ledger_accounting import record_abort, record_round, resume_accountant, verify
from sgs_flower.dp.noise import noise_present, skellam_event, skellam_share_mu
from sgs_flower.ledger import Ledger, LedgerConflictError, LedgerCorruptError, RoundEntry
from sgs_flower.ledger.chain import record_hash

DELTA = 1e-5
BUDGET = PrivacyBudget(max_epsilon=4.0, delta=DELTA)


def _events():
    return round_events(
        GaussianEvent(1.2), server_adds_noise=True, sampling="poisson", population=50, cohort_size=10
    )


def _entry(r: int, events=None, **kw) -> RoundEntry:
    base = dict(
        round=r, config_hash="c" * 64, protocol_version="sgs/1", crypto_suite="x25519-aesgcm",
        mode="central-dp", cohort=10, survivors=9, dropouts=1, clip_norm=1.0,
        noise={"type": "gaussian", "noise_multiplier": 1.2, "std": 1.2}, delta=DELTA,
        events=events.to_dict() if events is not None else None,
    )
    base.update(kw)
    return RoundEntry(**base)


def run_server(path: Path, max_rounds: int) -> tuple[int, PrivacyAccountant]:
    """A minimal server loop: resume, check budget, account, record, (release)."""
    ledger = Ledger.open(path)
    acct = resume_accountant(ledger, "rdp", "poisson")
    ran = 0
    for r in range(ledger.last_round + 1, ledger.last_round + 1 + max_rounds):
        ev = _events()
        try:
            BUDGET.check_round(acct, ev)
        except BudgetExhaustedError:
            break
        acct.compose_round(ev)
        record_round(ledger, _entry(r, ev), acct)
        ledger.append_evaluation(r, {"accuracy": 0.1 + 0.01 * r})
        ran += 1
    return ran, acct


@pytest.fixture
def ledger_file(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger.open(path)
    acct = PrivacyAccountant("rdp", "poisson")
    for r in range(1, 4):
        acct.compose_round(_events())
        record_round(ledger, _entry(r, _events()), acct)
    record_abort(ledger, _entry(4, aborted=True, abort_reason="only 2 survivors, threshold 3"), acct)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def test_clean_ledger_verifies(ledger_file: Path) -> None:
    res = verify(ledger_file)
    assert res.ok and res.records == 4 and res.bad_record is None
    recs = Ledger.open(ledger_file).records
    assert [r["seq"] for r in recs] == [1, 2, 3, 4]
    assert recs[3]["kind"] == "abort" and recs[3]["aborted"] is True
    assert recs[0]["epsilon_server"] == "inf"  # central DP: the server saw the noiseless sum
    for field in ("config_hash", "protocol_version", "crypto_suite", "cohort", "survivors",
                  "dropouts", "clip_norm", "noise", "epsilon_consumer", "delta", "events"):
        assert field in recs[0]


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_editing_any_record_is_named(ledger_file: Path, index: int) -> None:
    lines = _lines(ledger_file)
    rec = json.loads(lines[index])
    rec["survivors"] = 10
    lines[index] = json.dumps(rec, sort_keys=True, separators=(",", ":"))
    _write(ledger_file, lines)
    res = verify(ledger_file)
    assert not res.ok and res.bad_record == index + 1 and "edited" in (res.reason or "")
    with pytest.raises(LedgerCorruptError, match=f"record {index + 1}"):
        Ledger.open(ledger_file)


def test_deleting_a_line_is_named(ledger_file: Path) -> None:
    lines = _lines(ledger_file)
    del lines[1]
    _write(ledger_file, lines)
    res = verify(ledger_file)
    assert res.bad_record == 2 and "seq" in (res.reason or "")


def test_reordering_is_named(ledger_file: Path) -> None:
    lines = _lines(ledger_file)
    lines[1], lines[2] = lines[2], lines[1]
    _write(ledger_file, lines)
    assert verify(ledger_file).bad_record == 2


def test_truncated_last_line_is_named(ledger_file: Path) -> None:
    data = ledger_file.read_bytes()
    ledger_file.write_bytes(data[:-10])
    res = verify(ledger_file)
    assert res.bad_record == 4 and not res.ok


def test_rehashed_lower_epsilon_is_caught_by_replay(ledger_file: Path) -> None:
    """Rewrite record 2's epsilon and re-hash the whole chain: replay still catches it."""
    recs = [json.loads(line) for line in _lines(ledger_file)]
    recs[1]["epsilon_consumer"] = 0.01
    prev = "0" * 64
    for rec in recs:
        rec["prev_hash"] = prev
        rec["hash"] = record_hash(rec)
        prev = rec["hash"]
    _write(ledger_file, [json.dumps(r) for r in recs])
    res = verify(ledger_file)
    assert res.bad_record == 2 and "epsilon_consumer" in (res.reason or "")
    assert verify(ledger_file, replay=False).ok  # the chain alone cannot see it


def test_resume_gives_same_spent_epsilon_and_budget_holds(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    ran1, acct1 = run_server(path, 3)
    eps1 = acct1.epsilons(DELTA)
    resumed = resume_accountant(Ledger.open(path))
    assert resumed.rounds == 3
    assert resumed.epsilons(DELTA).consumer == pytest.approx(eps1.consumer, rel=1e-12)
    assert Ledger.open(path).spent().consumer == pytest.approx(eps1.consumer, rel=1e-12)
    ran2, acct2 = run_server(path, 10_000)  # "restart" and run until the budget stops it
    straight_path = tmp_path / "straight.jsonl"
    ran_straight, _ = run_server(straight_path, 10_000)
    assert ran1 + ran2 == ran_straight  # the restart did not get a fresh budget
    assert acct2.epsilons(DELTA).consumer <= BUDGET.max_epsilon
    assert verify(path).ok


def test_second_process_continues_from_spent_budget(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    _, acct = run_server(path, 4)
    code = (
        "import sys; from sgs_flower.ledger import Ledger; "
        "from sgs_flower.dp.ledger_accounting import resume_accountant; "
        "a = resume_accountant(Ledger.open(sys.argv[1])); "
        "print(a.rounds, repr(a.epsilons(1e-5).consumer))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    ).stdout.split()
    assert int(out[0]) == 4
    assert float(out[1]) == pytest.approx(acct.epsilons(DELTA).consumer, rel=1e-12)
    assert float(out[1]) > 0


def test_concurrent_writer_is_refused(ledger_file: Path) -> None:
    a, b = Ledger.open(ledger_file), Ledger.open(ledger_file)
    a.append_evaluation(3, {"accuracy": 0.5})
    with pytest.raises(LedgerConflictError):
        b.append_evaluation(3, {"accuracy": 0.5})
    assert verify(ledger_file).ok


def test_distributed_dp_records_noise_present(tmp_path: Path) -> None:
    mu = skellam_share_mu(target_variance=4e6, min_survivors=8)
    present = noise_present(mu, survivors=9, min_survivors=8)
    mech = skellam_event(present, scaled_clip_norm=1000.0, dim=1024)
    ev = round_events(mech, server_adds_noise=False, sampling="poisson", population=100, cohort_size=10)
    acct = PrivacyAccountant("rdp", "poisson")
    acct.compose_round(ev)
    ledger = Ledger.open(tmp_path / "d.jsonl")
    noise = {"type": "skellam", "mu_share": mu, "total_mu": present.total_mu,
             "variance": present.variance, "min_survivors": 8}
    rec = record_round(ledger, _entry(1, ev, mode="distributed-dp", noise=noise), acct)
    assert rec["noise"]["variance"] == pytest.approx(4.5e6)  # 9 survivors, not the 8-client target
    assert isinstance(rec["epsilon_server"], float) and math.isfinite(rec["epsilon_server"])
    assert rec["epsilon_consumer"] < rec["epsilon_server"]
    stored = resume_accountant(Ledger.open(tmp_path / "d.jsonl"))
    event = stored.server.events[0]
    assert isinstance(event, SkellamEvent) and event.mu == pytest.approx(present.total_mu)


def test_cli_verify_and_plot(ledger_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ledger", "verify", str(ledger_file)]) == 0
    assert "OK: 4 records" in capsys.readouterr().out
    out = tmp_path / "p.png"
    Ledger.open(ledger_file).append_evaluation(3, {"accuracy": 0.42})
    assert main(["ledger", "plot", str(ledger_file), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = _lines(ledger_file)
    lines[2] = lines[2].replace('"survivors":9', '"survivors":8')
    _write(ledger_file, lines)
    assert main(["ledger", "verify", str(ledger_file)]) == 1
    err = capsys.readouterr().err
    assert "BAD record 3" in err and "edited" in err
    assert main(["ledger", "plot", str(ledger_file), "-o", str(out)]) == 1
    assert main(["ledger", "verify", str(tmp_path / "missing.jsonl")]) == 2


def test_cli_module_entry_point(ledger_file: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sgs_flower.cli", "ledger", "verify", str(ledger_file)],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0 and "chain intact" in proc.stdout
