"""Cost of input validation (issue 31): the crypto core alone, per client and per round.

For each case (the app's CNN, ACORN's 250K coordinates at 16 bits, 1M coordinates):

- ``project_s``: the client's k exact Rademacher projections of its update;
- ``prove_s``: the client's whole ``prove_bound`` (projections, k commitments, one
  aggregated Bulletproofs range proof over k*bits bits);
- ``verify_s``: the server's ``verify_bound`` for one client (one MSM);
  ``verify_batched_s``: ``verify_bounds`` over the round's clients at once, per client;
- ``opening_s``: per round, the server's projection of the unmasked sum plus
  ``check_opening`` over n survivors (n copies of one site's proof: the cost does not
  depend on which points they are);
- upload: the proof bytes (k commitments + range proof) and the k blinds the protocol
  adds to the masked vector as limbs (``--limb-bits`` bits of each ``--word-bits``-bit
  word carry a blind: 255 / limb_bits limbs per blind; the protocol integration decides
  the exact layout), against the masked vector of ``--word-bits``-bit words.

The updates are random vectors with 16-bit coordinates scaled to the L2 bound B =
2^15 * sqrt(m) / 8 (a clip norm well inside the coordinate range). The hash-to-curve
generators are made once per process (``setup_s``, reported apart). ACORN's published
figures (Bell et al., USENIX Security 2023) are printed beside ours.

Usage: python scripts/bench_validation.py [--quick] [--survivors 10]. The last line is
one JSON object. The machine is shared: treat the timings as +-20 %.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.validation import rangeproof
from sgs_flower.validation.group import POINT_BYTES
from sgs_flower.validation.opening import check_opening
from sgs_flower.validation.projection import params_for, project
from sgs_flower.validation.proof import (
    BoundProof,
    prove_bound,
    random_blinds,
    verify_bound,
    verify_bounds,
    warm_up,
)

ACORN = {"250K@16": "<= 80 s/client, ~0.1x comm. (L2, published)"}


def cnn_size() -> int:
    """The app CNN's exact parameter count (38k), from sgs_flower.digits."""
    try:
        from sgs_flower.digits import make_model

        return sum(int(p.numel()) for p in make_model("cnn").parameters())
    except Exception:  # torch missing: the documented size
        return 38_090


CPU: dict[str, float] = {}  # the CPU seconds of each best() call, by label


def best(fn, repeat: int, label: str = "") -> float:  # type: ignore[no-untyped-def]
    """Best wall-clock time of ``repeat`` runs; its process CPU time goes to CPU[label]
    (the machine is shared: CPU time is the steadier figure, the code is single-threaded)."""
    times = []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = min(times)
    CPU[label] = cpu
    return wall


def run_case(name: str, m: int, survivors: int, word_bits: int, limb_bits: int, repeat: int) -> dict:
    rng = np.random.default_rng(0)
    bound = int(2**15 * math.sqrt(m) / 8)
    params = params_for(bound)
    d = rng.normal(size=m)
    x = np.clip(np.trunc(d / np.linalg.norm(d) * bound), -(2**15), 2**15 - 1).astype(np.int64)
    seed, ctx = secrets.token_bytes(32), b"bench/round=1/node=1"
    blinds = random_blinds(params.k)

    t0 = time.perf_counter()
    warm_up(params)
    setup = time.perf_counter() - t0

    project_s = best(lambda: project(x, seed, params.k), repeat, "project")
    holder: dict[str, BoundProof] = {}

    def prove() -> None:
        holder["p"] = prove_bound(x, blinds, params, seed, ctx)

    prove_s = best(prove, repeat, "prove")
    proof = holder["p"]
    verify_s = best(lambda: verify_bound(proof, params, ctx), repeat, "verify")
    batch = [(proof, ctx)] * survivors

    def verify_batch() -> None:
        if verify_bounds(batch, params):
            raise AssertionError("an honest proof failed")

    batch_s = best(verify_batch, repeat, "verify_batched") / survivors
    CPU["verify_batched"] /= survivors

    total = x * survivors
    summed = [b * survivors for b in blinds]

    def opening() -> None:
        check_opening([proof] * survivors, project(total, seed, params.k), survivors, summed, params)

    opening_s = best(opening, repeat, "opening")
    proof_bytes = len(proof.to_bytes())
    assert proof_bytes == params.k * POINT_BYTES + rangeproof.proof_size(params.bits, params.k)
    limbs = math.ceil(255 / limb_bits)
    blind_bytes = params.k * limbs * word_bits // 8
    masked_bytes = m * word_bits // 8
    return {
        "case": name,
        "m": m,
        "bound": bound,
        "k": params.k,
        "range_bits": params.bits,
        "gamma": round(params.gamma, 2),
        "setup_s": round(setup, 3),
        "project_s": round(project_s, 3),
        "prove_s": round(prove_s, 3),
        "verify_s": round(verify_s, 3),
        "verify_batched_s": round(batch_s, 3),
        "opening_s": round(opening_s, 3),
        "survivors": survivors,
        "proof_bytes": proof_bytes,
        "blind_limb_bytes": blind_bytes,
        "masked_bytes": masked_bytes,
        "upload_ratio": round((masked_bytes + proof_bytes + blind_bytes) / masked_bytes, 4),
        "acorn": ACORN.get(name, ""),
        "cpu_s": {k: round(v, 3) for k, v in CPU.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one tiny case (2,000 coordinates)")
    ap.add_argument("--survivors", type=int, default=10)
    ap.add_argument("--word-bits", type=int, default=32, help="masked-vector word width")
    ap.add_argument("--limb-bits", type=int, default=16, help="bits of a blind per word")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    cases = [("quick", 2_000)] if args.quick else [
        ("cnn", cnn_size()), ("250K@16", 250_000), ("1M", 1_000_000)
    ]
    rows = [
        run_case(n, m, args.survivors, args.word_bits, args.limb_bits, 1 if args.quick else args.repeat)
        for n, m in cases
    ]
    head = (f"{'case':8} {'m':>9} {'k':>4} {'bits':>4} {'gamma':>6} {'project':>8} {'prove':>7} "
            f"{'verify':>7} {'batched':>8} {'open/rnd':>8} {'proof B':>8} {'blinds B':>9} {'masked B':>10} {'upload':>7}  ACORN")
    print(head)
    for r in rows:
        print(f"{r['case']:8} {r['m']:>9} {r['k']:>4} {r['range_bits']:>4} {r['gamma']:>6} "
              f"{r['project_s']:>7.3f}s {r['prove_s']:>6.2f}s {r['verify_s']:>6.3f}s "
              f"{r['verify_batched_s']:>7.3f}s {r['opening_s']:>7.3f}s {r['proof_bytes']:>8} {r['blind_limb_bytes']:>9} "
              f"{r['masked_bytes']:>10} {r['upload_ratio']:>6.3f}x  {r['acorn']}")
    print(f"(generators, once per process: {rows[0]['setup_s']:.2f} s; batched = verify_bounds over "
          f"{args.survivors} clients, per client; opening over {args.survivors} survivors; "
          f"{args.word_bits}-bit words, blinds in {args.limb_bits}-bit limbs)")
    for r in rows:
        print(f"CPU seconds {r['case']}: {r['cpu_s']}")
    print(json.dumps({"rows": rows, "word_bits": args.word_bits, "limb_bits": args.limb_bits}))


if __name__ == "__main__":
    main()
