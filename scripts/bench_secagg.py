"""Benchmark of the secure-aggregation core, every ratio measured in this one run.

1. Client masking (stage 3) for m coordinates with k neighbours, against its floor:
   the AES-256-CTR keystream for the same bytes (k pairwise + 1 self mask) plus the
   vector additions, done with the same preallocated buffers.
2. Server unmasking (stage 4) for n clients with 10 % dropped after sharing keys,
   against its floor: the keystreams it must regenerate plus the additions.
3. Whole in-process rounds (all clients + server) for growing n at m = 10,000 with
   5 % dropout, and how time grows with n.
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

Usage: python scripts/bench_secagg.py [--quick]. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sgs_flower.pipeline import DEFAULT_MAX_WEIGHT, UpdateSpec, encode_update, narrowest_field_bits
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.graph import consistency_quorum
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


CONSISTENCY: dict[int, dict[str, float]] = {}  # n -> seconds of the consistency check (filled by drive)


def drive(n: int, m: int, degree: int | None, drop_stage3: set[int], seed: int = 0):
    """Run one round stage by stage; return per-client stage-3 seconds, server stage-4
    seconds, the keystream count of the unmasking, and per-client upload bytes."""
    ids = list(range(1, n + 1))
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=m, degree=degree)
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in ids}
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
    CONSISTENCY[n] = {"sign_and_check_seconds": t_sign, "client_unmask_seconds": statistics.median(verify_secs)}
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


def cnn_parameters() -> int:
    """The app's default model's parameter count (the constant, checked when torch is there)."""
    try:
        from sgs_flower.digits import Net
    except ImportError:  # pragma: no cover - the CPU requirements include torch
        return CNN_PARAMETERS
    count = sum(p.numel() for p in Net().parameters())
    assert count == CNN_PARAMETERS, f"digits.Net has {count} parameters; update CNN_PARAMETERS"
    return int(count)


def upload_at_defaults(n: int, m: int, measured: bool = True, seed: int = 0) -> dict[str, float]:
    """Upload per client of one round at the default settings for a model of m float32
    parameters: the width the strategy chooses for n clients, the default metric slots
    and max weight; a real protocol round (n clients, random words below 2^b) encodes
    every message a client sends (keys, shares, packed masked vector, signature, unmask
    shares). ``measured=False`` runs the round on a small model and adds the difference
    of the packed vectors' sizes (exact: the vector is the only part that grows with m),
    so m = 5e6 at n = 100 needs no 100 vectors of 5e6 words in memory."""
    bits = narrowest_field_bits(n, DEFAULT_MAX_WEIGHT)
    spec = UpdateSpec(clip_range=1.0, max_cohort=n, max_weight=DEFAULT_MAX_WEIGHT, field_bits=bits,
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
    args = ap.parse_args(argv)
    quick = args.quick
    out: dict = {"quick": quick}

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
    # signature), and one client's unmask answer including its quorum verification
    c = CONSISTENCY[n2]
    out.update(consistency_sign_and_check_seconds_n100=c["sign_and_check_seconds"],
               consistency_client_unmask_seconds_n100=c["client_unmask_seconds"])
    print(f"[6] consistency check n={n2}: {c['sign_and_check_seconds'] * 1e3:.1f} ms for all {n2 - len(drop)} "
          f"signatures (signing + server check), {c['client_unmask_seconds'] * 1e3:.1f} ms per client to verify "
          f"the quorum of {consistency_quorum(n2)} and answer the unmask request", file=sys.stderr)

    # 3. whole rounds at m = 10,000 with 5 % dropout
    sizes = [100, 250] if quick else [100, 250, 500, 1000]
    rounds = {}
    rng = np.random.default_rng(1)
    for n in sizes:
        xs = [rng.uniform(-1, 1, 10_000) for _ in range(n)]
        dropped = rng.choice(n, n // 20, replace=False).tolist()
        t = time.perf_counter()
        res = simulate_round(xs, dropouts={Stage.MASKED_INPUT: dropped}, seed=0)
        rounds[n] = time.perf_counter() - t
        ref = np.mean([xs[i] for i in res.survivors], axis=0)
        assert np.max(np.abs(res.aggregate - ref)) <= res.config.error_bound
        print(f"[3] round n={n} m=10,000 5% dropout: {rounds[n]:.2f} s", file=sys.stderr)
    out["round_seconds"] = {str(k): v for k, v in rounds.items()}
    out["round_seconds_n1000"] = rounds.get(1000)
    if len(sizes) > 1:
        a, b = sizes[0], sizes[-1]
        out["round_growth_exponent"] = float(np.log(rounds[b] / rounds[a]) / np.log(b / a))
        print(f"[3] time grows as n^{out['round_growth_exponent']:.2f}", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
