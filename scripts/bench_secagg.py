"""Benchmark of the secure-aggregation core, every ratio measured in this one run.

1. Client masking (stage 3) for m coordinates with k neighbours, against its floor:
   the AES-256-CTR keystream for the same bytes (k pairwise + 1 self mask) plus the
   vector additions, done with the same preallocated buffers.
2. Server unmasking (stage 4) for n clients with 10 % dropped after sharing keys,
   against its floor: the keystreams it must regenerate plus the additions.
3. Whole in-process rounds (all clients + server, ``simulate_round``: the full protocol
   with signatures and the consistency check) for n = 100, 250, 1,000 and 10,000 at
   m = 10,000 with 5 % dropout, each in a fresh process (so its peak resident memory is
   its own), the growth exponent fitted over those sizes (least squares on log-log),
   and the peak memory of the largest round. These rounds use the **neighbourhood**
   consistency quorum (``consistency="neighbourhood"``, the simulated sites opted in
   with ``sgs-consistency=neighbourhood``): the opt-in mode for large cohorts, O(k)
   signature checks per site, at most floor(k/3) colluders per neighbourhood. The
   default global quorum (~2n/3 verifications per site, O(n^2) per round) is timed
   beside it at the sizes up to 1,000 that are run (``round_seconds_global``).
   The simulated sites run in ``--workers`` worker processes (default: the CPU count;
   ``round_workers``), as deployed sites run on their own machines: each site still
   verifies every signature and makes every key agreement itself, so the wall time
   with W workers is about the total site CPU over W plus the server's.
   ``round_cpu_seconds`` is the CPU of all the round's processes (the bench process and
   its workers); ``round_peak_rss_bytes`` is the bench process's peak resident memory
   plus, per worker, its peak beyond the pages it inherited at the fork (those are the
   parent's, shared copy-on-write, and counted once there): an upper bound of the
   round's simultaneous memory, since the processes' peaks need not coincide.
4. Upload bytes per client (keys, encrypted shares, masked vector and unmask shares, as
   encoded on the wire) over the float32 bytes of the same update.
5. The masked-input stage, what a client does after training, at m = 5,000,000 and
   k = 18 neighbours: ``pipeline.encode_update`` of a float32 delta (clip count,
   stochastic rounding, weight, wrap) plus the protocol client's masking
   (``SecAggClient.handle``: share decryption, key agreement, masks), against the
   floor of its 1 + k keystreams plus their additions. Also reported, apart: the
   same stage with the masks added by ``MaskExpander.mask`` (all keystreams in one
   cache-blocked sweep), which is what the client's ``mask_input`` runs once it calls
   that helper, and the encoder alone.

7. Upload at the default settings (issue 21: the word width chosen per round,
   ``pipeline.narrowest_field_bits``, the strategy's default metric slots and max
   weight): bytes per client of a real round, as encoded on the wire, over the float32
   bytes of the update, for the app's CNN (``sgs_flower.digits.Net``) and for
   m = 5,000,000, at n = 10 and n = 100 (``upload_ratio_to_float32`` holds them, with
   the widths in ``field_bits``); and the masked-input stage of [5] at the width chosen
   for its cohort of k + 1, against the floor of its narrower keystreams.

Usage: python scripts/bench_secagg.py [--quick] [--sizes 100,250,1000,10000]
[--global-sizes 100,250] [--workers W]; one round alone: --one-round N [--consistency
neighbourhood|global] [--workers W]. The last line
printed is one JSON object. Timings on a shared machine are noisy: every figure is one
run (the round sizes) or the best of a few (the stages).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sgs_flower.pipeline import (
    DEFAULT_MAX_WEIGHT,
    DEFAULT_MODEL_ERROR,
    DEFAULT_WIDTH_ERROR,
    UpdateSpec,
    encode_update,
    narrowest_field_bits,
    width_error_for,
)
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.graph import (
    CONSISTENCY_MODES,
    consistency_quorum,
    default_degree,
    neighbourhood_quorum,
)
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.prg import MaskExpander, dtype_for_bits, keystream_bytes
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import simulate_round
from sgs_flower.secagg.wire import Stage, encode, packed_size

CNN_PARAMETERS = 38_282  # sgs_flower.digits.Net (checked against the model when torch is there)
DEFAULT_METRIC_SLOTS = 8  # strategies.config.SecAggConfig.metric_slots (not imported: no flwr here)


def keystream_floor(n_streams: int, m: int, repeats: int = 3, field_bits: int = 32) -> float:
    """Seconds for n_streams AES-256-CTR keystreams of m words added into a vector: the
    bytes a ``field_bits`` mask takes per coordinate (prg.keystream_bytes), added as
    words of its width (uint16 up to 16 bits)."""
    per = keystream_bytes(field_bits)
    dtype = np.dtype(np.uint16) if per == 2 else np.dtype(np.uint32) if per == 4 else np.dtype(np.uint64)
    zeros = bytes(per * m)
    scratch = bytearray(per * m + 16)
    view = np.frombuffer(scratch, dtype=dtype, count=m)
    acc = np.zeros(m, dtype=dtype)
    keys = [bytes([i % 256]) * 32 for i in range(n_streams)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for k in keys:
            Cipher(algorithms.AES(k), modes.CTR(bytes(16))).encryptor().update_into(zeros, scratch)
            np.add(acc, view, out=acc)
        times.append(time.perf_counter() - t)
    return min(times)


# (n, consistency mode) -> seconds of the consistency check (filled by drive)
CONSISTENCY: dict[tuple[int, str], dict[str, float]] = {}


def drive(n: int, m: int, degree: int | None, drop_stage3: set[int], seed: int = 0, consistency: str = "global"):
    """Run one round stage by stage; return per-client stage-3 seconds, server stage-4
    seconds, the keystream count of the unmasking, and per-client upload bytes."""
    ids = list(range(1, n + 1))
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=m, degree=degree,
                         consistency=consistency)
    server = SecAggServer(params)
    policy = ClientPolicy(consistency=consistency)  # sites opt in when the round asks for it
    clients = {u: SecAggClient(u, policy=policy) for u in ids}
    rng = np.random.default_rng(seed)
    inputs = {u: rng.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32) for u in ids}
    upload = dict.fromkeys(ids, 0)

    def send(u, reply):
        upload[u] += len(encode(reply))
        return reply

    adv = {u: send(u, clients[u].handle(msg)) for u, msg in server.setup_messages().items()}
    rosters = server.collect_keys(adv)
    shares = {u: send(u, clients[u].handle(r)) for u, r in rosters.items()}
    bundles = server.collect_shares(shares)
    masked, client_secs = {}, []
    for u, b in bundles.items():
        if u in drop_stage3:
            continue
        t = time.perf_counter()
        masked[u] = clients[u].handle(b, vector=inputs[u])
        client_secs.append(time.perf_counter() - t)
        send(u, masked[u])
    requests = server.collect_masked(masked)
    # consistency check (active-server protocol): each survivor signs U3; the server
    # checks and forwards the signatures; each client verifies a quorum before unmasking
    t = time.perf_counter()
    signed = {u: send(u, clients[u].handle(r)) for u, r in requests.items()}
    unmask = server.collect_consistency(signed)
    t_sign = time.perf_counter() - t
    responses, verify_secs = {}, []
    for u, r in unmask.items():
        t = time.perf_counter()
        responses[u] = send(u, clients[u].handle(r))
        verify_secs.append(time.perf_counter() - t)
    CONSISTENCY[n, consistency] = {
        "sign_and_check_seconds": t_sign, "client_unmask_seconds": statistics.median(verify_secs),
    }
    t = time.perf_counter()
    outcome = server.collect_unmask(responses)
    server_secs = time.perf_counter() - t
    expect = np.zeros(m, dtype=np.uint32)
    for u in outcome.survivors:
        expect += inputs[u]
    assert np.array_equal(outcome.total, expect), "secure sum differs from the plaintext sum"
    g = server.graph
    streams = len(server.u3) + sum(len(g[v] & server.u3) for v in server.u2 - server.u3)
    return client_secs, server_secs, streams, upload, outcome


def masked_input_stage(m: int, k: int, timed_clients: int = 5, seed: int = 0, field_bits: int = 32) -> dict[str, float]:
    """Seconds of the masked-input stage per client (min over ``timed_clients``) in a
    round of k + 1 clients on the complete graph (degree k), with the floor for its
    1 + k keystreams measured in the same run, interleaved with the stage itself so
    that both see the same machine load; and the stage with ``MaskExpander.mask``."""
    n = k + 1
    spec = UpdateSpec(clip_range=0.05, max_cohort=n, max_weight=1024, field_bits=field_bits)
    length = spec.vector_length(m)
    ids = list(range(1, n + 1))
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=length, degree=k,
                         field_bits=field_bits)
    digest = bytes(32)
    server = SecAggServer(params, bound_digest=digest)
    clients = {u: SecAggClient(u) for u in ids}
    adv = {u: clients[u].handle(msg) for u, msg in server.setup_messages().items()}
    shares = {u: clients[u].handle(r) for u, r in server.collect_keys(adv).items()}
    bundles = server.collect_shares(shares)
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(m) * 0.01).astype(np.float32)  # a float32 model's delta
    dtype = dtype_for_bits(spec.field_bits)
    expander = MaskExpander(length, dtype)
    streams = [(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), 1 if i % 2 else -1) for i in range(1 + k)]
    stage, helper, encoder, floors = [], [], [], []
    for u in ids[:timed_clients]:
        floors.append(keystream_floor(1 + k, length, repeats=1, field_bits=field_bits))
        t = time.perf_counter()
        enc = encode_update(delta, {}, 3, spec)
        t_enc = time.perf_counter() - t
        clients[u].handle(bundles[u], vector=enc.vector, bound_digest=digest)
        stage.append(time.perf_counter() - t)
        t = time.perf_counter()
        expander.mask(encode_update(delta, {}, 3, spec).vector, streams, spec.field_bits)
        helper.append(time.perf_counter() - t)
        encoder.append(t_enc)
    # min over repeats for every figure: on a shared machine the fastest run is the one
    # least disturbed by others, for the stage and its floor alike
    floor = min(floors)
    return {
        "seconds": min(stage), "floor_seconds": floor, "helper_seconds": min(helper),
        "encode_seconds": min(encoder), "ratio": min(stage) / floor, "helper_ratio": min(helper) / floor,
        "encode_ratio": min(encoder) / floor, "median_seconds": statistics.median(stage),
        "median_floor_seconds": statistics.median(floors),
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM (Linux) is the current image's own;
    ``ru_maxrss`` would keep the peak of the parent that spawned it across the exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def default_workers() -> int:
    """Worker processes for the simulated sites: one per CPU (the sites are independent
    machines in a deployment; here they share this one's cores)."""
    return max(1, os.cpu_count() or 1)


def one_round(
    n: int, m: int = 10_000, seed: int = 1, consistency: str = "neighbourhood", workers: int = 1
) -> dict[str, float]:
    """One whole in-process round of n clients, 5 % dropping before the masked input, in
    the given consistency mode (the sites opted in to it), the sites in ``workers``
    processes; its seconds, the CPU seconds of all its processes (this one and the
    workers) and its peak resident memory (bytes: this process's peak plus each worker's
    peak beyond what it inherited at the fork, see the module doc)."""
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, m) for _ in range(n)]
    dropped = rng.choice(n, n // 20, replace=False).tolist()
    t, cpu = time.perf_counter(), time.process_time()
    res = simulate_round(xs, dropouts={Stage.MASKED_INPUT: dropped}, seed=0, consistency=consistency,
                         workers=workers)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    worker_cpu = sum(w.cpu_seconds for w in res.worker_stats)
    ref = np.mean([xs[i] for i in res.survivors], axis=0)
    assert np.max(np.abs(res.aggregate - ref)) <= res.config.error_bound
    assert len(res.survivors) == n - len(dropped)
    own = peak_rss_bytes()
    worker_own = sum(w.own_peak_bytes for w in res.worker_stats)
    return {
        "seconds": seconds, "cpu_seconds": cpu + worker_cpu, "parent_cpu_seconds": cpu,
        "worker_cpu_seconds": worker_cpu, "workers": res.workers, "peak_rss_bytes": float(own + worker_own),
        "parent_peak_rss_bytes": float(own), "worker_own_peak_rss_bytes": float(worker_own),
        "worker_peak_rss_bytes": [float(w.peak_rss_bytes) for w in res.worker_stats],
        **{f"stage_{k}": v for k, v in res.seconds.items()},
    }


def round_in_subprocess(n: int, consistency: str = "neighbourhood", workers: int = 1) -> dict[str, float]:
    """:func:`one_round` in a fresh interpreter, so that the peak memory is the round's."""
    proc = subprocess.run([sys.executable, __file__, "--one-round", str(n), "--consistency", consistency,
                           "--workers", str(workers)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def growth_exponent(sizes: list[int], seconds: list[float]) -> float:
    """Slope of log(seconds) against log(n), least squares over every size run."""
    slope, _ = np.polyfit(np.log(sizes), np.log(seconds), 1)
    return float(slope)


def cnn_parameters() -> int:
    """The app's default model's parameter count (the constant, checked when torch is there)."""
    try:
        from sgs_flower.digits import Net
    except ImportError:  # pragma: no cover - the CPU requirements include torch
        return CNN_PARAMETERS
    count = sum(p.numel() for p in Net().parameters())
    assert count == CNN_PARAMETERS, f"digits.Net has {count} parameters; update CNN_PARAMETERS"
    return int(count)


def upload_at_defaults(n: int, m: int, measured: bool = True, seed: int = 0, clip_range: float = 1.0) -> dict[str, float]:
    """Upload per client of one round at the default settings for a model of m float32
    parameters: the width the strategy chooses for n clients at ``clip_range`` (the
    default round-1 range; since issue 28 the width holds ``model_error`` in the model's
    units, so it grows by a bit per doubling of the range), the default metric slots
    and max weight; a real protocol round (n clients, random words below 2^b) encodes
    every message a client sends (keys, shares, packed masked vector, signature, unmask
    shares). ``measured=False`` runs the round on a small model and adds the difference
    of the packed vectors' sizes (exact: the vector is the only part that grows with m),
    so m = 5e6 at n = 100 needs no 100 vectors of 5e6 words in memory."""
    bits = narrowest_field_bits(n, DEFAULT_MAX_WEIGHT, width_error_for(clip_range, DEFAULT_WIDTH_ERROR, DEFAULT_MODEL_ERROR))
    spec = UpdateSpec(clip_range=clip_range, max_cohort=n, max_weight=DEFAULT_MAX_WEIGHT, field_bits=bits,
                      metric_slots=DEFAULT_METRIC_SLOTS)
    length = spec.vector_length(m)
    run_len = length if measured else spec.vector_length(1000)
    ids = list(range(1, n + 1))
    server = SecAggServer(RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=run_len, field_bits=bits))
    clients = {u: SecAggClient(u) for u in ids}
    rng = np.random.default_rng(seed)
    dtype = dtype_for_bits(bits)
    upload = dict.fromkeys(ids, 0)

    def send(u, reply):
        upload[u] += len(encode(reply))
        return reply

    adv = {u: send(u, clients[u].handle(msg)) for u, msg in server.setup_messages().items()}
    shares = {u: send(u, clients[u].handle(r)) for u, r in server.collect_keys(adv).items()}
    bundles = server.collect_shares(shares)
    masked = {u: send(u, clients[u].handle(b, vector=rng.integers(0, 1 << bits, run_len, dtype=np.uint64).astype(dtype)))
              for u, b in bundles.items()}
    signed = {u: send(u, clients[u].handle(r)) for u, r in server.collect_masked(masked).items()}
    for u, r in server.collect_consistency(signed).items():
        send(u, clients[u].handle(r))
    up = statistics.mean(upload.values()) + packed_size(length, bits) - packed_size(run_len, bits)
    return {"bytes": up, "ratio": up / (4 * m), "field_bits": bits, "vector_words": length}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes; finishes within 60 s")
    ap.add_argument("--sizes", help="comma-separated round sizes for [3] (default 100,250,1000,10000; "
                    "--quick: 100,250)")
    ap.add_argument("--global-sizes", help="comma-separated sizes of [3] also run with the default global "
                    "consistency quorum (default: those of --sizes up to 1000)")
    ap.add_argument("--rounds-only", action="store_true", help="run only [3], the whole rounds")
    ap.add_argument("--one-round", type=int, help=argparse.SUPPRESS)  # internal: one round, one JSON line
    ap.add_argument("--consistency", default="neighbourhood", choices=CONSISTENCY_MODES,
                    help="consistency quorum of --one-round (default neighbourhood)")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="worker processes the whole rounds' sites run in (default: the CPU count, "
                    f"{default_workers()} here; 1: all in the bench process)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.one_round:
        res = one_round(args.one_round, consistency=args.consistency, workers=args.workers)
        print(json.dumps(res))
        return res
    quick = args.quick
    out: dict = {"quick": quick}
    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else ([100, 250] if quick else [100, 250, 1000, 10_000])
    global_sizes = ([int(v) for v in args.global_sizes.split(",") if v] if args.global_sizes is not None
                    else [n for n in sizes if n <= 1000])
    if args.rounds_only:
        return whole_rounds(out, sizes, global_sizes, args.workers)

    # 1. client masking, m coordinates, k = 10 neighbours (complete graph of 11)
    m = 1_000_000
    client_secs, _, _, upload, outcome = drive(11, m, None, set())
    client = statistics.median(client_secs)
    floor = keystream_floor(11, m)
    out["client_mask_seconds"] = client
    out["client_mask_floor_seconds"] = floor
    out["client_mask_ratio_to_floor"] = client / floor
    print(f"[1] client masking m={m:,} k=10: {client * 1e3:.1f} ms, floor {floor * 1e3:.1f} ms, "
          f"ratio {client / floor:.2f}x", file=sys.stderr)

    # 5. the masked-input stage (encode + mask) at m = 5e6, k = 18
    m5, k5 = 5_000_000, 18
    st = masked_input_stage(m5, k5, timed_clients=5 if quick else 10)
    out.update(masked_input_seconds=st["seconds"], masked_input_floor_seconds=st["floor_seconds"],
               masked_input_ratio_to_floor=st["ratio"], masked_input_helper_seconds=st["helper_seconds"],
               masked_input_helper_ratio_to_floor=st["helper_ratio"], encode_seconds=st["encode_seconds"],
               encode_ratio_to_floor=st["encode_ratio"], masked_input_m=m5, masked_input_k=k5)
    print(f"[5] masked-input stage (encode + mask) m={m5:,} k={k5}: {st['seconds'] * 1e3:.1f} ms, floor "
          f"({k5 + 1} keystreams + additions) {st['floor_seconds'] * 1e3:.1f} ms, ratio {st['ratio']:.2f}x; "
          f"with MaskExpander.mask {st['helper_seconds'] * 1e3:.1f} ms ({st['helper_ratio']:.2f}x); "
          f"encode alone {st['encode_seconds'] * 1e3:.1f} ms ({st['encode_ratio']:.2f}x)", file=sys.stderr)

    # 4. upload per client over float32 bytes of the same update (m = 1e6, k = 10, 32-bit)
    up = statistics.mean(upload[u] for u in outcome.survivors)
    out["upload_bytes_per_client"] = up
    out["upload_ratio_to_float32"] = up / (4 * m)
    print(f"[4] upload per client {up:,.0f} B vs float32 {4 * m:,} B: {up / (4 * m):.4f}x", file=sys.stderr)

    # 7. upload at the default settings (the width chosen per round), and [5] at its width
    cnn = cnn_parameters()
    ratios: dict[str, float] = {}
    widths: dict[str, int] = {}
    for n7 in (10, 100):
        for name, m7 in (("cnn", cnn), ("m5e6", 5_000_000)):
            r = upload_at_defaults(n7, m7, measured=(m7 == cnn or n7 == 10) and not (quick and m7 > cnn))
            key = f"{name}_n{n7}"
            ratios[key], widths[key] = r["ratio"], int(r["field_bits"])
            print(f"[7] upload at defaults, {name} (m={m7:,}) n={n7}: {r['bytes']:,.0f} B vs float32 {4 * m7:,} B: "
                  f"{r['ratio']:.4f}x at {r['field_bits']} bits", file=sys.stderr)
    out["upload_ratio_to_float32_32bit"] = out["upload_ratio_to_float32"]
    out["upload_ratio_to_float32"] = ratios
    out["field_bits"] = widths
    b5 = narrowest_field_bits(k5 + 1, 1024)
    st = masked_input_stage(m5, k5, timed_clients=3 if quick else 6, field_bits=b5)
    out.update(masked_input_narrow_bits=b5, masked_input_narrow_seconds=st["seconds"],
               masked_input_narrow_floor_seconds=st["floor_seconds"], masked_input_narrow_ratio_to_floor=st["ratio"],
               masked_input_narrow_over_32bit=st["seconds"] / out["masked_input_seconds"])
    print(f"[7] masked-input stage m={m5:,} k={k5} at {b5} bits: {st['seconds'] * 1e3:.1f} ms, floor "
          f"{st['floor_seconds'] * 1e3:.1f} ms, ratio {st['ratio']:.2f}x; "
          f"{st['seconds'] / out['masked_input_seconds']:.2f}x the 32-bit stage", file=sys.stderr)

    # 2. server unmasking, n = 100, 10 % dropped after sharing keys
    n2, m2 = 100, (200_000 if quick else 1_000_000)
    drop = set(range(1, n2 + 1, 10))
    _, server_secs, streams, _, _ = drive(n2, m2, None, drop)
    sfloor = keystream_floor(streams, m2, repeats=1)
    out.update(server_unmask_seconds=server_secs, server_unmask_floor_seconds=sfloor,
               server_unmask_ratio_to_floor=server_secs / sfloor, server_unmask_m=m2, server_unmask_keystreams=streams)
    print(f"[2] server unmask n={n2} m={m2:,} 10% dropped: {server_secs:.2f} s, floor ({streams} keystreams) "
          f"{sfloor:.2f} s, ratio {server_secs / sfloor:.2f}x", file=sys.stderr)

    # 6. the consistency check at n = 100: all survivors sign (server checks every
    # signature), and one client's unmask answer including its quorum: the default global
    # one (the round of [2]) and the opt-in neighbourhood one (a small extra round)
    drive(n2, 1_000, None, drop, consistency="neighbourhood")
    c = CONSISTENCY[n2, "global"]
    cn = CONSISTENCY[n2, "neighbourhood"]
    out.update(consistency_sign_and_check_seconds_n100=c["sign_and_check_seconds"],
               consistency_client_unmask_seconds_n100=c["client_unmask_seconds"],
               consistency_client_unmask_seconds_n100_neighbourhood=cn["client_unmask_seconds"])
    print(f"[6] consistency check n={n2}: {c['sign_and_check_seconds'] * 1e3:.1f} ms for all {n2 - len(drop)} "
          f"signatures (signing + server check); per client to verify its quorum and answer the unmask request: "
          f"{c['client_unmask_seconds'] * 1e3:.1f} ms with the global quorum (default, {consistency_quorum(n2)} "
          f"signatures), {cn['client_unmask_seconds'] * 1e3:.1f} ms with the neighbourhood quorum (opt-in, "
          f"{neighbourhood_quorum(default_degree(n2)) - 1} neighbours' signatures)", file=sys.stderr)
    return whole_rounds(out, sizes, global_sizes, args.workers)


def whole_rounds(out: dict, sizes: list[int], global_sizes: list[int] | None = None, workers: int = 1) -> dict:
    """[3]: whole rounds at m = 10,000 with 5 % dropout, each in its own process (its
    sites in ``workers`` processes of their own), with the neighbourhood consistency
    quorum (sites opted in) and, at ``global_sizes``, with the default global one too;
    prints the final JSON line."""
    out["round_consistency"] = "neighbourhood"  # the mode of round_seconds* (sites opted in)
    out["round_workers"] = workers
    rounds: dict[int, dict[str, float]] = {}
    for n in sizes:
        rounds[n] = round_in_subprocess(n, workers=workers)
        r = rounds[n]
        print(f"[3] round n={n:,} m=10,000 5% dropout, neighbourhood quorum (opt-in): {r['seconds']:.2f} s "
              f"({r['cpu_seconds']:.2f} s CPU, {r['workers']:.0f} workers), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    glob: dict[int, dict[str, float]] = {}
    for n in global_sizes or []:
        glob[n] = round_in_subprocess(n, "global", workers)
        r = glob[n]
        print(f"[3] round n={n:,} m=10,000 5% dropout, global quorum (default): {r['seconds']:.2f} s "
              f"({r['cpu_seconds']:.2f} s CPU, {r['workers']:.0f} workers), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr)
    out["round_seconds_global"] = {str(k): v["seconds"] for k, v in glob.items()}
    out["round_cpu_seconds_global"] = {str(k): v["cpu_seconds"] for k, v in glob.items()}
    out["round_seconds"] = {str(k): v["seconds"] for k, v in rounds.items()}
    # CPU seconds of the round's processes (bench process + workers): on a shared machine,
    # less disturbed by the others' load
    out["round_cpu_seconds"] = {str(k): v["cpu_seconds"] for k, v in rounds.items()}
    out["round_peak_rss_bytes"] = {str(k): v["peak_rss_bytes"] for k, v in rounds.items()}
    out["round_seconds_n1000"] = rounds[1000]["seconds"] if 1000 in rounds else None
    out["round_seconds_n10000"] = rounds[10_000]["seconds"] if 10_000 in rounds else None
    out["round_peak_rss_gib_n10000"] = rounds[10_000]["peak_rss_bytes"] / 2**30 if 10_000 in rounds else None
    out["round_growth_sizes"] = sizes
    if len(sizes) > 1:
        out["round_growth_exponent"] = growth_exponent(sizes, [rounds[n]["seconds"] for n in sizes])
        out["round_cpu_growth_exponent"] = growth_exponent(sizes, [rounds[n]["cpu_seconds"] for n in sizes])
        print(f"[3] time grows as n^{out['round_growth_exponent']:.2f} (CPU time as "
              f"n^{out['round_cpu_growth_exponent']:.2f}; fit over n = {sizes})", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
