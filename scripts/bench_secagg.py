"""Benchmark of the secure-aggregation core, every ratio measured in this one run.

1. Client masking (stage 3) for m coordinates with k neighbours, against its floor:
   the AES-256-CTR keystream for the same bytes (k pairwise + 1 self mask) plus the
   vector additions, done with the same preallocated buffers.
2. Server unmasking (stage 4) for n clients with 10 % dropped after sharing keys,
   against its floor: the keystreams it must regenerate plus the additions.
3. Whole rounds of the **product path** (issue 30): the round driver
   (``sgs_flower.driver.RoundDriver``, through ``sgs_flower.driver.inprocess.run_rounds``)
   over sites that answer through ``sgs_flower.site`` exactly as under Flower, with the
   sites spread over ``--workers`` worker processes
   (``sgs_flower.driver.shards.ShardedTransport``: each worker holds a shard of the sites
   for the whole run, their stores and keys never leave it, and the driver, protocol
   server and encoding stay in the bench process). Sizes n = 100, 250, 1,000 and 10,000
   (``--sizes``) at m = 10,000 (``--m``); each size and mode runs R rounds (``--rounds``,
   default 2: round 1 a run's first, set up in full, which also carries round 2's key
   setup on its consistency and unmask exchanges; round 2 pipelined, three exchanges), in
   a fresh process (so the run's peak resident memory is its own). 5 % of the sites,
   drawn afresh each round, are silent at the round's masked input (``Drop``). Every
   default of ``SecAggConfig`` is on: retries, pipelining, adaptive range and width,
   each site's policy and state in its own store, and

   - both consistency quorums at every size (``--modes``): the **default global**
     quorum (floor(2n/3) + 1 of the cohort, proven to each site by one BLS aggregate
     signature, ``sgs_flower.secagg.bls``) is the primary mode (``round_seconds``,
     ``round_consistency``), the opt-in **neighbourhood** quorum (O(k) Ed25519 checks
     per site; the sites opted in with ``sgs-consistency``) is timed beside it
     (``round_seconds_neighbourhood``);
   - participation in whole groups (``--min-group``, default 3, the Flower glue's
     default; 0 turns it off): ``SecAggConfig(min_group=3)`` and each site's
     ``sgs-min-group``, the federation learnt from the first round's cohort (no pinned
     roster in a simulation). A group with a member that dropped before the masked
     input stays out of the sum whole (at 5 % dropout and groups of 3, about 10 % of the
     cohort besides the 5 % that dropped), and in the global mode its members still sign
     the survivor set. A run in which a round still aborts is reported
     (``round_aborted_with_groups``) and run again without groups, and the table says
     which ran with groups.

   Each round's released model is checked against the plaintext weighted mean of its
   survivors' updates within the round's error bound (the table's "max error").
   The sites of a worker share its caches of checked BLS keys (a deployed site checks
   each peer's key once per run; the simulation once per worker process), as the floor
   below counts them. ``round_seconds`` is a run's first round's wall time,
   ``round_seconds_pipelined`` the second's; ``round_cpu_seconds`` the CPU of all the
   processes (the bench process and its workers, with the pipes' pickling) from the end
   of the previous round to the end of this one; ``round_peak_rss_bytes`` the run's peak
   resident memory: the bench process's peak plus, per worker, its peak beyond the pages
   it inherited at the fork (those are the parent's, shared copy-on-write, and counted
   once there), an upper bound of the simultaneous memory, since the peaks need not
   coincide. ``--bare`` runs the old bare-protocol rounds instead (``simulate_round``:
   bare protocol clients in worker processes, no retries, model-key phase, pipelining or
   site state; one round per size), for comparison with earlier runs only.

   Per round and mode it also reports (``round_floor``: a run's first round;
   ``round_floor_by_round``: each round):

   - **per-site CPU**: the CPU the sites spent answering (measured with
     ``time.process_time`` around each site's call, ``sgs_flower.site.on_train``, inside
     the worker processes, so without the pipes' pickling), summed over the sites and
     divided by n;
   - **server CPU**: the bench process's CPU during the round (the driver, the protocol
     server, encoding and decoding, and sending the workers their messages and reading
     their replies); with ``--bare``, the server's own calls (``setup_messages``,
     ``collect_*``);
   - the round's **public-key floor**: the public-key operations the protocol must make,
     counted from the round's own graph and sets (U1..U4), times each operation's unit
     CPU cost measured in the same run with the same libraries (``cryptography``'s
     X25519 and Ed25519, ``blspy``), at the message lengths the protocol signs (the
     consistency statement holds 8 bytes per survivor, so its signatures hash O(n)
     bytes). The operations are counted from the round's protocol server
     (``RoundDriver.last_server``) and charged to the round whose exchanges made them:
     round 1 pays its own key setup and round 2's (which rides on its consistency and
     unmask exchanges), round 2 none (``attribute_ops``). Counted per site: 2 X25519
     key generations; an X25519 agreement per neighbour for the share keys
     (``on_roster``) and one per neighbour that shared for the pairwise masks
     (``mask_input``); an Ed25519 signature of its advertisement and
     a verification of each neighbour's; in the global mode a BLS key and proof of
     possession (PoP), an Ed25519 signature binding it to the identity, one BLS
     signature of the survivor set, one parse of the aggregate and one
     ``FastAggregateVerify`` over the signers' keys; in the neighbourhood mode one
     Ed25519 signature of the survivor set and a verification of each forwarded
     neighbour's. On the server: an Ed25519 verification of each advertisement; an
     X25519 key generation (the rebuilt key's check) and an agreement per surviving
     neighbour for each site that dropped after sharing (or was left out with its
     group); in the global mode a parse of each BLS signature, their aggregation and one
     ``FastAggregateVerify``; in the neighbourhood mode an Ed25519 verification per
     signature. **Per run, not per round** (charged to a run's first round only; the
     pipelined round does not pay them): checking each member's BLS key (PoP
     and Ed25519 binding, ``bls.bound_key``), which a deployed site does once per run for
     each of the n - 1 other members and the simulation once per process (its verified
     keys are cached per process: the server's and each worker's, whose sites share
     them), so the floor counts them as the simulation pays them (n per process) and
     ``per_run_deployed_site_seconds`` says what one deployed site pays at its first
     round. Not in the floor (checks a
     protocol could do without a scalar multiplication): the server's X25519 low-order
     probe of each advertised key (a key generation and 2 agreements per site). The
     symmetric work (AES-CTR keystreams of the masks: 1 + k per site, the self masks
     and dropped sites' pairwise masks on the server) is reported beside it
     (``sym_floor``), not in the public-key floor.
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

8. ``--driver``: the product path's rounds of [3] with the sites in the bench process
   (``InProcessTransport``), one after another, each answer as in a process of its own
   (its own checked BLS keys: ``sgs_flower.secagg.bls.separate_caches``): R rounds
   (``--rounds``, default 3), every default of ``SecAggConfig`` on, 5 % of the sites
   silent at each round's masked input; per round it prints the wall time, the sites'
   CPU over n (per-site CPU) and the server's CPU, and checks the released model
   against the plaintext weighted mean of the survivors. ``--m`` sets the model size
   (default 10,000). No floor: [3] has it, with the sites in worker processes.

Usage: python scripts/bench_secagg.py [--quick] [--rounds-only] [--sizes 100,250,1000,10000]
[--modes global,neighbourhood] [--min-group 3] [--workers W] [--rounds 2] [--m 10000] [--bare];
one size alone (R rounds, or with --bare one bare round): --one-round N
[--consistency global|neighbourhood] [--min-group G] [--workers W]; the sites in one process:
--driver [--sizes 20,100] [--m 1000] [--rounds 3] [--modes global]. The last line
printed is one JSON object. Timings on a shared machine are noisy: every figure is one
run (the round sizes) or the best of a few (the stages).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from blspy import G1Element, G2Element, PopSchemeMPL
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sgs_flower.driver.config import SecAggConfig as DriverConfig
from sgs_flower.driver.inprocess import Drop, InProcessSite, RunResult, run_rounds
from sgs_flower.driver.report import SecureAggregationFailed
from sgs_flower.driver.rounds import RoundDriver
from sgs_flower.driver.shards import ShardedTransport
from sgs_flower.pipeline import (
    DEFAULT_MAX_WEIGHT,
    DEFAULT_MODEL_ERROR,
    DEFAULT_WIDTH_ERROR,
    UpdateSpec,
    encode_update,
    narrowest_field_bits,
    width_error_for,
)
from sgs_flower.secagg import bls, identity, keys
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import ThresholdError
from sgs_flower.secagg.graph import (
    CONSISTENCY_GLOBAL,
    CONSISTENCY_MODES,
    CONSISTENCY_NEIGHBOURHOOD,
    consistency_quorum,
    default_degree,
    neighbourhood_quorum,
)
from sgs_flower.secagg.groups import DEFAULT_MIN_GROUP
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


def bare_round(
    n: int, m: int = 10_000, seed: int = 1, consistency: str = CONSISTENCY_GLOBAL, workers: int = 1,
    min_group: int = DEFAULT_MIN_GROUP,
) -> dict:
    """``--bare``: one whole round of the bare protocol (``simulate_round``, not the driver)
    of n clients, 5 % dropping before the masked input, in
    the given consistency mode (the sites opted in to it), with participation in whole
    groups of ``min_group`` (0: off), the sites in ``workers`` processes; its seconds,
    the CPU seconds of all its processes (this one and the workers), the sites' and the
    server's own CPU (``sites_cpu_seconds``, ``server_cpu_seconds``), the public-key
    operations it made (``ops``, :func:`round_ops`) and its peak resident memory (bytes:
    this process's peak plus each worker's peak beyond what it inherited at the fork, see
    the module doc)."""
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, m) for _ in range(n)]
    dropped = rng.choice(n, n // 20, replace=False).tolist()
    t, cpu = time.perf_counter(), time.process_time()
    try:
        res = simulate_round(xs, dropouts={Stage.MASKED_INPUT: dropped}, seed=0, consistency=consistency,
                             workers=workers, min_group=min_group)
    except ThresholdError as exc:  # the round aborted (nothing released): say why, time nothing
        return {"aborted": str(exc), "seconds": time.perf_counter() - t, "consistency": consistency,
                "min_group": min_group}
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    worker_cpu = sum(w.cpu_seconds for w in res.worker_stats)
    ref = np.mean([xs[i] for i in res.survivors], axis=0)
    assert np.max(np.abs(res.aggregate - ref)) <= res.config.error_bound
    assert res.server is not None
    left_out = len(res.server.group_excluded)  # whole groups with a dropped member (min_group)
    assert len(res.survivors) == n - len(dropped) - left_out
    own = peak_rss_bytes()
    worker_own = sum(w.own_peak_bytes for w in res.worker_stats)
    sites_cpu = sum(v for k, v in res.cpu_seconds.items() if k.startswith("sites_"))
    server_cpu = sum(v for k, v in res.cpu_seconds.items() if k.startswith("server_"))
    return {
        "seconds": seconds, "cpu_seconds": cpu + worker_cpu, "parent_cpu_seconds": cpu,
        "worker_cpu_seconds": worker_cpu, "workers": res.workers, "peak_rss_bytes": float(own + worker_own),
        "parent_peak_rss_bytes": float(own), "worker_own_peak_rss_bytes": float(worker_own),
        "worker_peak_rss_bytes": [float(w.peak_rss_bytes) for w in res.worker_stats],
        "sites_cpu_seconds": sites_cpu, "server_cpu_seconds": server_cpu, "cpu_by_stage": res.cpu_seconds,
        "consistency": consistency, "min_group": min_group, "survivors": len(res.survivors),
        "left_out": left_out, "signers": len(res.server.u4), "degree": res.server.params.degree,
        "ops": round_ops(res.server, len(res.worker_stats)),
        **{f"stage_{k}": v for k, v in res.seconds.items()},
    }


def round_in_subprocess(n: int, consistency: str = CONSISTENCY_GLOBAL, workers: int = 1,
                        min_group: int = DEFAULT_MIN_GROUP, *, bare: bool = False, rounds: int = 2,
                        m: int = 10_000) -> dict:
    """:func:`driver_round_run` (or, ``bare``, :func:`bare_round`) in a fresh interpreter,
    so that the peak memory is its own."""
    cmd = [sys.executable, __file__, "--one-round", str(n), "--consistency", consistency, "--workers", str(workers),
           "--min-group", str(min_group), "--rounds", str(rounds), "--m", str(m)]
    proc = subprocess.run(cmd + (["--bare"] if bare else []), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"round n={n} {consistency} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------ [3] the public-key floor
def round_ops(server: SecAggServer, worker_processes: int) -> dict[str, dict[str, int]]:
    """The public-key operations a finished round had to make (module doc, [3]), counted
    from its server's graph and sets: ``{"sites": ..., "server": ..., "sites_per_run": ...,
    "server_per_run": ..., "sites_sym": ..., "server_sym": ...}``, each a count by
    operation key (``op`` or ``op:argument:...``, priced by :class:`UnitCosts`).

    ``*_per_run`` are paid once per run (the BLS key, its PoP and binding, and the key
    checks: per process that holds sites, so ``worker_processes`` times for the sites;
    with the sites in this process, 0, the server's checks having filled the cache).
    ``*_sym`` are AES-CTR keystreams of the vector's length (not public-key work).
    ``*_setup`` are the part of ``sites`` and ``server`` made by the key setup (advertise
    and share keys), which a pipelined round made during the round before
    (:func:`attribute_ops`)."""
    p = server.params
    g = server.graph
    n = len(p.cohort)
    u1, u2, u3, u4 = set(server.advertised), server.u2, server.u3, server.u4
    maskers = u3 | server.group_excluded  # every site that sent a masked input
    gone = u2 - u3  # shared keys, then dropped or left out with its group: its pairwise masks are rebuilt
    zero = bytes(32)
    adv = len(keys.advertise_statement(server.share_context, 1, zero, zero, zero))
    bind = len(bls.binding_statement(p.run_id, bytes(bls.PUBLIC_KEY_BYTES)))
    cons = len(keys.consistency_statement(server.share_context, sorted(u3)))
    sites: Counter[str] = Counter()
    srv: Counter[str] = Counter()
    sites_run: Counter[str] = Counter()
    srv_run: Counter[str] = Counter()
    # the key setup (advertise and share keys): in a pipelined run, made during the round before
    rosters = sum(len(g[u] & u1) for u in u1)  # each verifies and agrees with every advertised neighbour
    sites_setup = Counter({"x25519_keygen": 2 * n,  # c_sk and s_sk, fresh per round
                           f"ed25519_sign:{adv}": len(u1), f"ed25519_verify:{adv}": rosters,
                           "x25519_agree": rosters})  # the share keys
    srv_setup = Counter({f"ed25519_verify:{adv}": len(u1)})
    sites.update(sites_setup)
    srv.update(srv_setup)
    sites["x25519_agree"] += sum(len(g[u] & u2) for u in maskers)  # the pairwise masks
    srv["x25519_keygen"] += len(gone)  # the rebuilt masking key checked against its public key
    srv["x25519_agree"] += sum(len(g[v] & u3) for v in gone)
    if p.consistency == CONSISTENCY_NEIGHBOURHOOD:
        assert p.degree is not None
        need = neighbourhood_quorum(p.degree) - 1
        answering = sum(1 for v in u4 if len(g[v] & u4) >= need)
        sites[f"ed25519_sign:{cons}"] += len(u4)
        sites[f"ed25519_verify:{cons}"] += need * answering
        srv[f"ed25519_verify:{cons}"] += len(u4)
    else:
        s = len(u4)
        sites[f"bls_sign:{cons}"] += s
        sites["bls_g2_parse"] += s  # the aggregate, at each signer
        sites[f"bls_fav:{s}:{cons}"] += s
        srv["bls_g2_parse"] += s
        srv[f"bls_aggregate:{s}"] += 1
        srv[f"bls_fav:{s}:{cons}"] += 1
        sites_run["bls_keygen_pop"] += n
        sites_run[f"ed25519_sign:{bind}"] += n
        sites_run["bls_key_check"] += n * worker_processes
        sites_run[f"ed25519_verify:{bind}"] += n * worker_processes
        srv_run["bls_key_check"] += len(u1)
        srv_run[f"ed25519_verify:{bind}"] += len(u1)
    m = p.vector_length
    sym_sites = Counter({f"keystream:{m}": sum(1 + len(g[u] & u2) for u in maskers)})
    sym_srv = Counter({f"keystream:{m}": len(u3) + sum(len(g[v] & u3) for v in gone)})
    return {"sites": dict(sites), "server": dict(srv), "sites_per_run": dict(sites_run),
            "server_per_run": dict(srv_run), "sites_sym": dict(sym_sites), "server_sym": dict(sym_srv),
            "sites_setup": dict(sites_setup), "server_setup": dict(srv_setup),
            "deployed_site_per_run": {"bls_keygen_pop": 1, f"ed25519_sign:{bind}": 1,
                                      "bls_key_check": n - 1, f"ed25519_verify:{bind}": n - 1}
            if p.consistency != CONSISTENCY_NEIGHBOURHOOD else {}}


def attribute_ops(own: dict[str, dict[str, int]], nxt: dict[str, dict[str, int]] | None, *, pipelined: bool,
                  carried_next: bool, first: bool) -> dict[str, dict[str, int]]:
    """A driver round's public-key floor as its own CPU pays it, from :func:`round_ops` of
    its server (``own``) and of the next round's (``nxt``): in a pipelined run round r's
    key setup rides on round r - 1's consistency and unmask exchanges, so the round that
    made an exchange is charged for it. Round r: its own operations, less its key setup
    when it was set up ahead (``pipelined``), plus round r + 1's key setup when it carried
    it (``carried_next``); the per-run operations (BLS keys and their checks) only in the
    run's ``first`` round (the processes then hold the checked keys). Same shape as
    ``round_ops``'s result."""
    out = {k: dict(v) for k, v in own.items()}
    for side in ("sites", "server"):
        count: Counter[str] = Counter(own[side])
        if pipelined:
            count.subtract(own[f"{side}_setup"])
        if carried_next and nxt is not None:
            count.update(nxt[f"{side}_setup"])
        out[side] = {k: v for k, v in count.items() if v > 0}
        if not first:
            out[f"{side}_per_run"] = {}
    if not first:
        out["deployed_site_per_run"] = {}
    return out


def _cpu_per_call(fn: Callable[[], object], batch: int, repeats: int = 3) -> float:
    """CPU seconds per call of ``fn`` (``time.process_time``), the least of ``repeats``
    batches: on a shared machine the least disturbed batch."""
    best = math.inf
    for _ in range(repeats):
        t = time.process_time()
        for _ in range(batch):
            fn()
        best = min(best, (time.process_time() - t) / batch)
    return best


class UnitCosts:
    """The CPU cost of each public-key operation of :func:`round_ops`, measured here with
    the protocol's libraries (``cryptography`` X25519/Ed25519, ``blspy`` PopSchemeMPL), on
    messages of the lengths the protocol signs, once per operation key."""

    POOL = 32  # distinct BLS keys behind a FastAggregateVerify over many signers (its cost is the count's)

    def __init__(self, batch_scale: float = 1.0) -> None:
        self.scale = batch_scale
        self.seconds: dict[str, float] = {}
        self._x_sk = X25519PrivateKey.generate()
        self._x_pk = X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._e_sk = Ed25519PrivateKey.generate()
        self._e_pk = self._e_sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self._b_sks = [PopSchemeMPL.key_gen(bytes([i]) * 32) for i in range(self.POOL)]
        self._b_pks = [sk.get_g1() for sk in self._b_sks]

    def _batch(self, n: int) -> int:
        return max(1, int(n * self.scale))

    def __call__(self, key: str) -> float:
        if key not in self.seconds:
            self.seconds[key] = self._measure(key)
        return self.seconds[key]

    def _measure(self, key: str) -> float:
        op, *args = key.split(":")
        a = [int(v) for v in args]
        if op == "x25519_keygen":
            return _cpu_per_call(
                lambda: X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
                self._batch(200))
        if op == "x25519_agree":
            return _cpu_per_call(lambda: self._x_sk.exchange(X25519PublicKey.from_public_bytes(self._x_pk)),
                                 self._batch(200))
        if op == "ed25519_sign":
            msg = bytes(a[0])
            return _cpu_per_call(lambda: self._e_sk.sign(msg), self._batch(200 if a[0] < 4096 else 50))
        if op == "ed25519_verify":
            msg = bytes(a[0])
            sig = self._e_sk.sign(msg)
            e_pk = self._e_pk  # the protocol's own check: libsodium's (identity.verify), not OpenSSL's
            return _cpu_per_call(lambda: identity.verify(e_pk, sig, msg), self._batch(200 if a[0] < 4096 else 50))
        if op == "bls_keygen_pop":
            seed = bytes(range(32))

            def keygen_pop() -> None:
                sk = PopSchemeMPL.key_gen(seed)
                sk.get_g1()
                PopSchemeMPL.pop_prove(sk)

            return _cpu_per_call(keygen_pop, self._batch(20))
        if op == "bls_key_check":
            pk, pop = bytes(self._b_pks[0]), bytes(PopSchemeMPL.pop_prove(self._b_sks[0]))
            return _cpu_per_call(
                lambda: PopSchemeMPL.pop_verify(G1Element.from_bytes(pk), G2Element.from_bytes(pop)), self._batch(20))
        if op == "bls_sign":
            msg = bytes(a[0])
            return _cpu_per_call(lambda: PopSchemeMPL.sign(self._b_sks[0], msg), self._batch(20))
        if op == "bls_g2_parse":
            raw = bytes(PopSchemeMPL.sign(self._b_sks[0], b"x"))
            return _cpu_per_call(lambda: G2Element.from_bytes(raw), self._batch(100))
        if op == "bls_aggregate":
            sigs = [PopSchemeMPL.sign(sk, b"x") for sk in self._b_sks]
            many = [sigs[i % self.POOL] for i in range(a[0])]
            return _cpu_per_call(lambda: PopSchemeMPL.aggregate(many), 1)
        if op == "bls_fav":
            count, length = a
            msg = bytes(length)
            sigs = [PopSchemeMPL.sign(sk, msg) for sk in self._b_sks]
            pks = [self._b_pks[i % self.POOL] for i in range(count)]
            agg = PopSchemeMPL.aggregate([sigs[i % self.POOL] for i in range(count)])
            assert PopSchemeMPL.fast_aggregate_verify(pks, msg, agg)
            return _cpu_per_call(lambda: PopSchemeMPL.fast_aggregate_verify(pks, msg, agg), self._batch(3))
        if op == "keystream":  # AES-256-CTR of a.0 32-bit words, added into a vector (symmetric, not in the floor)
            return keystream_floor(8, a[0], repeats=3) / 8
        raise ValueError(f"unknown operation {key!r}")

    def price(self, ops: dict[str, int]) -> float:
        return sum(count * self(key) for key, count in ops.items())


def _size_figures(out: dict, sizes: list[int], timed: dict, peaks: dict, label: str) -> dict:
    """The summary keys of [3] (both paths): the rounds' seconds at 1,000 and 10,000, the
    peak memory at 10,000 and the growth exponents over the sizes; prints the JSON line."""
    out["round_seconds_n1000"] = timed[1000]["seconds"] if 1000 in timed else None
    out["round_seconds_n10000"] = timed[10_000]["seconds"] if 10_000 in timed else None
    out["round_peak_rss_gib_n10000"] = peaks[10_000]["peak_rss_bytes"] / 2**30 if 10_000 in peaks else None
    out["round_growth_sizes"] = sizes
    if len(sizes) > 1:
        out["round_growth_exponent"] = growth_exponent(sizes, [timed[n]["seconds"] for n in sizes])
        out["round_cpu_growth_exponent"] = growth_exponent(sizes, [timed[n]["cpu_seconds"] for n in sizes])
        print(f"{label} time grows as n^{out['round_growth_exponent']:.2f} (CPU time as "
              f"n^{out['round_cpu_growth_exponent']:.2f}; fit over n = {sizes})", file=sys.stderr)
    print(json.dumps(out))
    return out


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


def _state_dir() -> None:
    """The sites' files (the kept delta of each site, for a retry: 40 KB each at m =
    10,000) go to a folder of this run, removed at exit, not to ~/.flwr, unless the
    caller named one (SGS_STATE_DIR; the size subprocesses inherit it)."""
    if not os.environ.get("SGS_STATE_DIR"):
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="sgs-bench-sites-")
        os.environ["SGS_STATE_DIR"] = folder
        atexit.register(shutil.rmtree, folder, True)


def main(argv: list[str] | None = None) -> dict:
    _state_dir()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes; finishes within 60 s")
    ap.add_argument("--sizes", help="comma-separated round sizes for [3] (default 100,250,1000,10000; "
                    "--quick: 100,250)")
    ap.add_argument("--modes", default=f"{CONSISTENCY_GLOBAL},{CONSISTENCY_NEIGHBOURHOOD}",
                    help="comma-separated consistency quorums of [3], each run at every size, the first the "
                    "primary (default: global,neighbourhood)")
    ap.add_argument("--min-group", type=int, default=DEFAULT_MIN_GROUP,
                    help=f"participation in whole groups of this many sites in [3] (default {DEFAULT_MIN_GROUP}, "
                    "the Flower glue's; 0: off)")
    ap.add_argument("--rounds-only", action="store_true", help="run only [3], the whole rounds")
    ap.add_argument("--one-round", type=int, help=argparse.SUPPRESS)  # internal: one round, one JSON line
    ap.add_argument("--consistency", default=CONSISTENCY_GLOBAL, choices=CONSISTENCY_MODES,
                    help="consistency quorum of --one-round (default global)")
    ap.add_argument("--workers", type=int, default=default_workers(),
                    help="worker processes the whole rounds' sites run in (default: the CPU count, "
                    f"{default_workers()} here; 1: all in the bench process)")
    ap.add_argument("--driver", action="store_true",
                    help="run only [8]: whole rounds through the round driver and the site (the product path)")
    ap.add_argument("--m", type=int, default=10_000, help="model size of [3]'s and --driver's rounds (default 10,000)")
    ap.add_argument("--rounds", type=int, help="rounds per size and mode: of [3] (default 2: a run's first, then a "
                    "pipelined one), of --driver (default 3)")
    ap.add_argument("--bare", action="store_true",
                    help="[3] through the bare protocol (simulate_round) instead of the round driver: for comparison "
                    "with earlier runs only (one round per size, m = 10,000)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be at least 1")
    rounds = args.rounds or (3 if args.driver else 2)
    if args.min_group == 1 or args.min_group < 0:
        ap.error("--min-group must be 0 (off) or at least 2")
    if args.one_round:
        if args.bare:
            res = bare_round(args.one_round, consistency=args.consistency, workers=args.workers,
                             min_group=args.min_group)
        else:
            res = driver_round_run(args.one_round, args.m, rounds, consistency=args.consistency, workers=args.workers,
                                   min_group=args.min_group)
        print(json.dumps(res))
        return res
    quick = args.quick
    out: dict = {"quick": quick}
    sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else ([100, 250] if quick else [100, 250, 1000, 10_000])
    modes = [v for v in args.modes.split(",") if v]
    for mode in modes:
        if mode not in CONSISTENCY_MODES:
            ap.error(f"--modes: unknown consistency quorum {mode!r} (one of {', '.join(CONSISTENCY_MODES)})")
    if args.driver:
        return driver_rounds(out, sizes if args.sizes else [20, 100], modes if args.modes != ap.get_default("modes")
                             else [CONSISTENCY_GLOBAL], args.m, rounds, args.min_group)
    if args.rounds_only:
        return rounds_of_3(out, sizes, modes, args, rounds, quick)

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
    return rounds_of_3(out, sizes, modes, args, rounds, quick)


def rounds_of_3(out: dict, sizes: list[int], modes: list[str], args: argparse.Namespace, rounds: int,
                quick: bool) -> dict:
    """[3] through the round driver, or with ``--bare`` through the bare protocol."""
    if args.bare:
        return bare_whole_rounds(out, sizes, modes, args.workers, args.min_group, quick)
    return whole_rounds(out, sizes, modes, args.workers, args.min_group, quick, rounds, args.m)


def floor_figures(r: dict, units: UnitCosts) -> dict[str, float]:
    """A round's measured CPU beside its public-key floor (module doc, [3]): per site
    (sites' CPU over n), on the server, and for the round (sites + server)."""
    ops = r["ops"]
    n = r["n"]
    sites_floor = units.price(ops["sites"]) + units.price(ops["sites_per_run"])
    server_floor = units.price(ops["server"]) + units.price(ops["server_per_run"])
    per_run = units.price(ops["sites_per_run"]) + units.price(ops["server_per_run"])
    sym = units.price(ops["sites_sym"]) + units.price(ops["server_sym"])
    round_cpu = r["sites_cpu_seconds"] + r["server_cpu_seconds"]
    floor = sites_floor + server_floor
    return {
        "site_cpu_ms": 1e3 * r["sites_cpu_seconds"] / n, "site_floor_ms": 1e3 * sites_floor / n,
        "server_cpu_seconds": r["server_cpu_seconds"], "server_floor_seconds": server_floor,
        "round_cpu_seconds": round_cpu, "floor_seconds": floor, "ratio": round_cpu / floor,
        "per_run_floor_seconds": per_run, "steady_floor_seconds": floor - per_run,
        "sym_floor_seconds": sym, "ratio_with_sym": round_cpu / (floor + sym),
        "all_process_cpu_seconds": r["cpu_seconds"], "wall_seconds": r["seconds"],
        "per_run_deployed_site_seconds": units.price(ops["deployed_site_per_run"]),
        **{f"cpu_{k}": v for k, v in r.get("cpu_by_stage", {}).items()},
    }


# issue 30's acceptance figures for the default mode (in-process rounds, m = 10,000, 5 %
# dropout, 2 worker processes)
ACCEPT_WALL = {1000: 10.0, 10_000: 120.0}
ACCEPT_SITE_CPU_GROWTH = 2.0  # per-site CPU at n = 10,000 over that at n = 100
ACCEPT_FLOOR_RATIO = 1.5  # round CPU over the public-key floor


def acceptance(table: dict[str, dict[int, dict[str, float]]], workers: int) -> list[dict]:
    """Issue 30's four figures for the default (global) mode beside what was measured:
    each a dict with the target, the measured value and whether it holds (None: not run)."""
    glob = table.get(CONSISTENCY_GLOBAL, {})
    out: list[dict] = []
    for n, limit in ACCEPT_WALL.items():
        got = glob[n]["wall_seconds"] if n in glob else None
        out.append({"figure": f"n = {n:,} wall <= {limit:.0f} s ({workers} workers)", "target": limit,
                    "measured": got, "holds": None if got is None else got <= limit})
    growth = glob[10_000]["site_cpu_ms"] / glob[100]["site_cpu_ms"] if 10_000 in glob and 100 in glob else None
    out.append({"figure": f"per-site CPU at n = 10,000 <= {ACCEPT_SITE_CPU_GROWTH:.0f}x that at n = 100",
                "target": ACCEPT_SITE_CPU_GROWTH, "measured": growth,
                "holds": None if growth is None else growth <= ACCEPT_SITE_CPU_GROWTH})
    worst = max((f["ratio"] for f in glob.values()), default=None)
    out.append({"figure": f"round CPU <= {ACCEPT_FLOOR_RATIO}x the public-key floor (worst size)",
                "target": ACCEPT_FLOOR_RATIO, "measured": worst,
                "holds": None if worst is None else worst <= ACCEPT_FLOOR_RATIO})
    return out


def _round_label(row: dict) -> str:
    how = "set up ahead" if row["pipelined"] else "set up in full"
    carried = f", carrying round {row['round'] + 1}'s setup" if row["next_round_set_up"] else ""
    return f"round {row['round']} ({row['exchanges']} exchanges, {how}{carried})"


def whole_rounds(out: dict, sizes: list[int], modes: list[str] | None = None, workers: int = 1,
                 min_group: int = DEFAULT_MIN_GROUP, quick: bool = False, rounds: int = 2, m: int = 10_000) -> dict:
    """[3]: ``rounds`` whole rounds of the round driver (the product path) at m = ``m``
    with 5 % dropout per round, the sites in ``workers`` processes (:class:`ShardedTransport`),
    each size and mode in its own process, in each consistency mode of ``modes`` (default:
    the global quorum, then the neighbourhood one), with participation in whole groups of
    ``min_group``; each round beside its public-key floor (units measured here,
    :class:`UnitCosts`); prints the table, issue 30's acceptance figures (for the run's
    first round and for the pipelined one) and the final JSON line."""
    modes = modes or [CONSISTENCY_GLOBAL, CONSISTENCY_NEIGHBOURHOOD]
    out.update(round_path="driver", round_consistency=modes[0], round_modes=modes, round_workers=workers,
               round_min_group=min_group, round_rounds=rounds, round_m=m)
    units = UnitCosts(batch_scale=0.25 if quick else 1.0)
    runs: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    table: dict[str, dict[int, list[dict[str, float]]]] = {mode: {} for mode in modes}
    aborted: dict[str, dict[str, str]] = {}
    for n in sizes:
        for mode in modes:
            run = round_in_subprocess(n, mode, workers, min_group, rounds=rounds, m=m)
            if "aborted" in run and run["min_group"]:
                aborted.setdefault(mode, {})[str(n)] = run["aborted"]
                print(f"[3] n={n:,} {mode} quorum, groups of {min_group}: ABORTED ({run['aborted'][:160]}...); "
                      "run again without groups", file=sys.stderr, flush=True)
                run = round_in_subprocess(n, mode, workers, 0, rounds=rounds, m=m)
            if "aborted" in run:
                raise RuntimeError(f"n={n} {mode}: {run['aborted']}")
            runs[mode][n] = run
            table[mode][n] = [floor_figures({**row, "n": n}, units) for row in run["rounds"]]
            for row, f in zip(run["rounds"], table[mode][n], strict=True):
                print(f"[3] n={n:,} m={m:,} 5% dropout, {mode} quorum{' (default)' if mode == CONSISTENCY_GLOBAL else ''}, "
                      f"groups of {run['min_group'] or 'none'}, {_round_label(row)}: {row['seconds']:.2f} s "
                      f"({row['cpu_seconds']:.2f} s CPU in all processes, {run['workers']} workers); per site "
                      f"{f['site_cpu_ms']:.2f} ms CPU (floor {f['site_floor_ms']:.2f}), server {f['server_cpu_seconds']:.2f} s "
                      f"(floor {f['server_floor_seconds']:.2f}), round {f['round_cpu_seconds']:.2f} s CPU = "
                      f"{f['ratio']:.2f}x its public-key floor {f['floor_seconds']:.2f} s; released mean within "
                      f"{row['max_error']:.2g} (bound {row['error_bound']:.2g}); run's peak RSS "
                      f"{run['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    print("[3] public-key unit costs (CPU, this run): " + ", ".join(
        f"{k} {v * 1e6:.0f} us" for k, v in sorted(units.seconds.items())), file=sys.stderr)
    print("[3] | n | mode | round | exchanges | groups | wall s | per-site CPU ms | per-site floor ms | server CPU s | "
          "server floor s | round CPU s | PK floor s (per run) | ratio | all-process CPU s | AES floor s | survivors | "
          "left out | run's peak GiB |", file=sys.stderr)
    for n in sizes:
        for mode in modes:
            run = runs[mode][n]
            for row, f in zip(run["rounds"], table[mode][n], strict=True):
                print(f"[3] | {n:,} | {mode} | {row['round']}{' (pipelined)' if row['pipelined'] else ''} | "
                      f"{row['exchanges']} | {run['min_group'] or '-'} | {f['wall_seconds']:.2f} | {f['site_cpu_ms']:.2f} | "
                      f"{f['site_floor_ms']:.2f} | {f['server_cpu_seconds']:.2f} | {f['server_floor_seconds']:.2f} | "
                      f"{f['round_cpu_seconds']:.2f} | {f['floor_seconds']:.2f} ({f['per_run_floor_seconds']:.2f}) | "
                      f"{f['ratio']:.2f} | {f['all_process_cpu_seconds']:.2f} | {f['sym_floor_seconds']:.2f} | "
                      f"{row['survivors']} | {row['left_out']} | {run['peak_rss_bytes'] / 2**30:.2f} |", file=sys.stderr)
    by_round = [{mode: {n: figs[i] for n, figs in table[mode].items() if i < len(figs)} for mode in modes}
                for i in range(rounds)]
    accept = [acceptance(t, workers) for t in by_round]
    for i, rows in enumerate(accept):
        which = "a run's first round" if i == 0 else f"round {i + 1} (pipelined)"
        for a in rows:
            verdict = "not run" if a["holds"] is None else ("holds" if a["holds"] else "FAILS")
            got = "-" if a["measured"] is None else f"{a['measured']:.2f}"
            print(f"[3] issue 30 acceptance, {which}: {a['figure']}: measured {got}: {verdict}", file=sys.stderr)
    primary = runs[modes[0]]
    first = {n: run["rounds"][0] for n, run in primary.items()}
    out["round_seconds"] = {str(n): row["seconds"] for n, row in first.items()}  # a run's first round
    out["round_cpu_seconds"] = {str(n): row["cpu_seconds"] for n, row in first.items()}  # all processes
    out["round_peak_rss_bytes"] = {str(n): run["peak_rss_bytes"] for n, run in primary.items()}  # the whole run's
    if rounds > 1:
        out["round_seconds_pipelined"] = {str(n): run["rounds"][1]["seconds"] for n, run in primary.items()}
    for mode in modes[1:]:
        out[f"round_seconds_{mode}"] = {str(n): run["rounds"][0]["seconds"] for n, run in runs[mode].items()}
        out[f"round_cpu_seconds_{mode}"] = {str(n): run["rounds"][0]["cpu_seconds"] for n, run in runs[mode].items()}
    out["round_floor"] = {mode: {str(n): figs[0] for n, figs in table[mode].items()} for mode in modes}
    out["round_floor_by_round"] = {mode: {str(n): figs for n, figs in table[mode].items()} for mode in modes}
    out["round_driver_rows"] = {mode: {str(n): run["rounds"] for n, run in runs[mode].items()} for mode in modes}
    out["round_min_group_by_mode"] = {mode: {str(n): run["min_group"] for n, run in runs[mode].items()} for mode in modes}
    out["round_aborted_with_groups"] = aborted
    out["round_unit_cpu_seconds"] = units.seconds
    out["round_acceptance"] = accept[0]
    if rounds > 1:
        out["round_acceptance_pipelined"] = accept[1]
    return _size_figures(out, sizes, first, primary, f"[3] {modes[0]} quorum, a run's first round:")


def bare_whole_rounds(out: dict, sizes: list[int], modes: list[str] | None = None, workers: int = 1,
                      min_group: int = DEFAULT_MIN_GROUP, quick: bool = False) -> dict:
    """[3 bare] ``--bare`` (for comparison only): whole rounds of the bare protocol at m = 10,000 with 5 % dropout, each in its own process (its
    sites in ``workers`` processes of their own), in each consistency mode of ``modes``
    (default: the global quorum, then the neighbourhood one) at every size, with
    participation in whole groups of ``min_group``; each beside its public-key floor
    (units measured here, :class:`UnitCosts`); prints the table, issue 30's acceptance
    figures and the final JSON line."""
    modes = modes or [CONSISTENCY_GLOBAL, CONSISTENCY_NEIGHBOURHOOD]
    out["round_path"] = "bare"
    out["round_consistency"] = modes[0]  # the mode of round_seconds* (the default: global)
    out["round_modes"] = modes
    out["round_workers"] = workers
    out["round_min_group"] = min_group
    units = UnitCosts(batch_scale=0.25 if quick else 1.0)
    raw: dict[str, dict[int, dict]] = {mode: {} for mode in modes}
    table: dict[str, dict[int, dict[str, float]]] = {mode: {} for mode in modes}
    aborted: dict[str, dict[str, str]] = {}
    for n in sizes:
        for mode in modes:
            r = round_in_subprocess(n, mode, workers, min_group, bare=True)
            if "aborted" in r and r["min_group"]:
                # the neighbourhood quorum does not count the signatures of groups left out
                # whole: at 5 % dropout with groups of 3 (~14 % left out) neighbourhoods fall
                # short and the round aborts; its figures are then those without groups
                aborted.setdefault(mode, {})[str(n)] = r["aborted"]
                print(f"[3 bare] round n={n:,} {mode} quorum, groups of {min_group}: ABORTED after {r['seconds']:.1f} s "
                      f"({r['aborted'][:160]}...); run again without groups", file=sys.stderr, flush=True)
                r = round_in_subprocess(n, mode, workers, 0, bare=True)
            if "aborted" in r:
                raise RuntimeError(f"round n={n} {mode} aborted: {r['aborted']}")
            r = raw[mode][n] = {**r, "n": n}
            f = table[mode][n] = floor_figures(r, units)
            print(f"[3 bare] round n={n:,} m=10,000 5% dropout, {mode} quorum{' (default)' if mode == CONSISTENCY_GLOBAL else ''}"
                  f", groups of {r['min_group'] or 'none'}: {r['seconds']:.2f} s ({r['cpu_seconds']:.2f} s CPU, "
                  f"{r['workers']:.0f} workers), peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB; per site "
                  f"{f['site_cpu_ms']:.2f} ms CPU (floor {f['site_floor_ms']:.2f}), server {f['server_cpu_seconds']:.2f} s "
                  f"(floor {f['server_floor_seconds']:.2f}), round {f['round_cpu_seconds']:.2f} s CPU = "
                  f"{f['ratio']:.2f}x its public-key floor {f['floor_seconds']:.2f} s", file=sys.stderr, flush=True)
    print("[3 bare] public-key unit costs (CPU, this run): " + ", ".join(
        f"{k} {v * 1e6:.0f} us" for k, v in sorted(units.seconds.items())), file=sys.stderr)
    print("[3 bare] | n | mode | groups | wall s | per-site CPU ms | per-site floor ms | server CPU s | server floor s | "
          "round CPU s | PK floor s (per run) | ratio | all-process CPU s | AES floor s | left out | peak GiB |",
          file=sys.stderr)
    for n in sizes:
        for mode in modes:
            f, r = table[mode][n], raw[mode][n]
            print(f"[3 bare] | {n:,} | {mode} | {r['min_group'] or '-'} | {f['wall_seconds']:.1f} | {f['site_cpu_ms']:.2f} | {f['site_floor_ms']:.2f} | "
                  f"{f['server_cpu_seconds']:.2f} | {f['server_floor_seconds']:.2f} | {f['round_cpu_seconds']:.1f} | "
                  f"{f['floor_seconds']:.1f} ({f['per_run_floor_seconds']:.1f}) | {f['ratio']:.2f} | "
                  f"{f['all_process_cpu_seconds']:.1f} | {f['sym_floor_seconds']:.2f} | {r['left_out']} | "
                  f"{r['peak_rss_bytes'] / 2**30:.2f} |", file=sys.stderr)
    accept = acceptance(table, workers)
    for a in accept:
        verdict = "not run" if a["holds"] is None else ("holds" if a["holds"] else "FAILS")
        got = "-" if a["measured"] is None else f"{a['measured']:.2f}"
        print(f"[3 bare] issue 30 acceptance: {a['figure']}: measured {got}: {verdict}", file=sys.stderr)
    primary = raw[modes[0]]
    out["round_seconds"] = {str(k): v["seconds"] for k, v in primary.items()}
    # CPU seconds of the round's processes (bench process + workers): on a shared machine,
    # less disturbed by the others' load
    out["round_cpu_seconds"] = {str(k): v["cpu_seconds"] for k, v in primary.items()}
    out["round_peak_rss_bytes"] = {str(k): v["peak_rss_bytes"] for k, v in primary.items()}
    for mode in modes[1:]:
        out[f"round_seconds_{mode}"] = {str(k): v["seconds"] for k, v in raw[mode].items()}
        out[f"round_cpu_seconds_{mode}"] = {str(k): v["cpu_seconds"] for k, v in raw[mode].items()}
    out["round_floor"] = {mode: {str(n): f for n, f in table[mode].items()} for mode in modes}
    out["round_min_group_by_mode"] = {mode: {str(n): r["min_group"] for n, r in raw[mode].items()} for mode in modes}
    out["round_aborted_with_groups"] = aborted
    out["round_unit_cpu_seconds"] = units.seconds
    out["round_acceptance"] = accept
    return _size_figures(out, sizes, primary, primary, f"[3 bare] {modes[0]} quorum:")


# ------------------------------------------------------------ [8] the product path
def _driver_weight(node: int) -> int:
    """A site's example count: 100 to 1,099, at every n. Why bounded: a weight above the
    initial weight scale (8,192, ``pipeline.DEFAULT_WEIGHT_SCALE``) makes a run's first
    round retry once at a coarser scale (documented; the scale is learnt from then on),
    and 100 + node did so from n = 8,093 on, so the sizes timed different rounds (at
    n = 10,000 that retry took 48 s of a 277 s first round: docs/benchmarks.md)."""
    return 100 + node % 1000


def _driver_site(node: int, m: int, seed: int, mode: str, min_group: int, max_cohort: int = 1000) -> InProcessSite:
    """A site whose train step adds its own uniform update in [-0.5, 0.5) per round (drawn
    from its node id and the round), weighted :func:`_driver_weight`; it opts in to ``mode`` and joins
    cohorts of up to ``max_cohort`` (``sgs-max-cohort``: the site's default stops at 1,000)."""
    def train(arrays: list[np.ndarray], config: Mapping[str, Any]) -> tuple[list[np.ndarray], int, dict[str, float]]:
        delta = _driver_delta(node, int(config["server-round"]), m, seed)
        return [arrays[0] + delta], _driver_weight(node), {"loss": node / 10}
    node_config = {"sgs-state-file": "memory", "sgs-min-group": str(min_group)}
    if max_cohort > 1000:
        node_config["sgs-max-cohort"] = str(max_cohort)
    if mode != CONSISTENCY_GLOBAL:
        node_config["sgs-consistency"] = mode
    return InProcessSite(train, node_config=node_config)


def _driver_delta(node: int, server_round: int, m: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, node, server_round]).uniform(-0.5, 0.5, m).astype(np.float32)


def _drop_plan(n: int, rounds: int, seed: int) -> dict[int, list[Drop]]:
    """5 % of the sites, drawn afresh each round, silent at that round's masked input."""
    rng = np.random.default_rng(seed)
    drops: dict[int, list[Drop]] = {}
    for r in range(1, rounds + 1):
        for u in rng.choice(np.arange(1, n + 1), n // 20, replace=False).tolist():
            drops.setdefault(int(u), []).append(Drop(Stage.MASKED_INPUT, frozenset({r})))
    return drops


def _round_row(n: int, mode: str, i: int, res: RunResult, m: int, seed: int) -> dict[str, Any]:
    """Round i of a driver run: what its report says and what it cost; for a round that
    released, the largest error of the released model against the plaintext weighted mean
    of its survivors, checked within the round's error bound."""
    report, cost = res.reports[i], res.costs[i]
    row: dict[str, Any] = {
        "n": n, "mode": mode, "round": report.server_round, "status": report.status,
        "exchanges": report.exchanges, "pipelined": report.pipelined, "next_round_set_up": report.next_round_set_up,
        "survivors": len(report.survivors), "left_out": report.group_excluded, "retries": report.retries,
        "field_bits": report.field_bits, "wall_seconds": cost.wall_seconds, "site_cpu_ms": 1e3 * cost.sites_cpu_seconds / n,
        "sites_cpu_seconds": cost.sites_cpu_seconds, "server_cpu_seconds": cost.server_cpu_seconds,
        "site_calls": cost.site_calls, "error_bound": report.error_bound, "reason": report.reason,
        "stage_seconds": dict(report.stage_seconds)}
    if report.status == "ok":  # the released model is the plaintext weighted mean of the survivors
        w = np.array([_driver_weight(u) for u in report.survivors], dtype=np.float64)
        ref = np.zeros(m)
        for u, wu in zip(report.survivors, w, strict=True):
            ref += wu * _driver_delta(u, report.server_round, m, seed).astype(np.float64)
        ref /= w.sum()
        got = res.models[i + 1][0][1].astype(np.float64) - res.models[i][0][1].astype(np.float64)
        row["max_error"] = float(np.max(np.abs(got - ref)))
        assert row["max_error"] <= report.error_bound + 1e-6, (row["max_error"], report.error_bound)
    return row


def driver_run(n: int, m: int, rounds: int, mode: str = CONSISTENCY_GLOBAL, min_group: int = DEFAULT_MIN_GROUP,
               seed: int = 0) -> list[dict]:
    """[8] at one size and mode: ``rounds`` rounds through the round driver, the sites in
    this process, 5 % of them silent at each round's masked input; per round its figures
    (see the module doc)."""
    sites = {u: _driver_site(u, m, seed, mode, min_group, max(1000, n)) for u in range(1, n + 1)}
    config = DriverConfig(consistency=mode, min_group=min_group)
    initial = [("w", np.zeros(m, dtype=np.float32))]
    try:
        res = run_rounds(sites, initial, rounds, config, drops=_drop_plan(n, rounds, seed))
    except SecureAggregationFailed as exc:
        return [{"n": n, "mode": mode, "status": "failed", "reason": str(exc)}]
    return [_round_row(n, mode, i, res, m, seed) for i in range(len(res.reports))]


def driver_round_run(n: int, m: int = 10_000, rounds: int = 2, consistency: str = CONSISTENCY_GLOBAL,
                     workers: int = 2, min_group: int = DEFAULT_MIN_GROUP, seed: int = 0) -> dict:
    """[3] at one size and mode (the module doc says what and how): ``rounds`` rounds of
    the round driver over :class:`ShardedTransport` (the sites in ``workers`` processes),
    every default of ``SecAggConfig`` on, 5 % of the sites silent at each round's masked
    input. Per round (``rounds``): :func:`_round_row`'s figures, the public-key operations
    the round's own CPU paid (``ops``, :func:`attribute_ops` of :func:`round_ops` of
    ``driver.last_server``) and the CPU of all the round's processes; for the run: its
    peak resident memory (this process's peak plus each worker's beyond what it
    inherited at the fork)."""
    sites = {u: _driver_site(u, m, seed, consistency, min_group, max(1000, n)) for u in range(1, n + 1)}
    config = DriverConfig(consistency=consistency, min_group=min_group)
    initial = [("w", np.zeros(m, dtype=np.float32))]
    counted: dict[int, dict[str, dict[str, int]]] = {}  # round -> round_ops of its server
    all_cpu: dict[int, float] = {}  # round -> CPU of every process since the previous round ended
    t0 = time.perf_counter()
    with ShardedTransport(sites, workers=workers, drops=_drop_plan(n, rounds, seed)) as transport:
        used = transport.workers
        mark = [time.process_time() + sum(transport.worker_cpu)]

        def on_round(server_round: int, driver: RoundDriver) -> None:
            now = time.process_time() + sum(transport.worker_cpu)
            all_cpu[server_round], mark[0] = now - mark[0], now
            if driver.last_server is not None and driver.reports[-1].status == "ok":
                counted[server_round] = round_ops(driver.last_server, used)

        try:
            res = run_rounds(transport, initial, rounds, config, on_round=on_round)
        except SecureAggregationFailed as exc:
            return {"aborted": str(exc), "seconds": time.perf_counter() - t0, "consistency": consistency,
                    "min_group": min_group}
    stats = transport.stats
    rows = []
    for i in range(len(res.reports)):
        row = _round_row(n, consistency, i, res, m, seed)
        r = row["round"]
        row.update(seconds=row["wall_seconds"], cpu_seconds=all_cpu.get(r, math.nan))
        if r in counted:
            row["ops"] = attribute_ops(counted[r], counted.get(r + 1), pipelined=row["pipelined"],
                                       carried_next=row["next_round_set_up"], first=i == 0)
        rows.append(row)
    own = peak_rss_bytes()
    worker_own = sum(w.own_peak_bytes for w in stats)
    aborted = [row for row in rows if row["status"] != "ok"]
    return {
        "n": n, "m": m, "consistency": consistency, "min_group": min_group, "workers": used,
        "rounds": rows, "peak_rss_bytes": float(own + worker_own), "parent_peak_rss_bytes": float(own),
        "worker_own_peak_rss_bytes": float(worker_own),
        "worker_peak_rss_bytes": [float(w.peak_rss_bytes) for w in stats],
        "worker_cpu_seconds": [w.cpu_seconds for w in stats],
        **({"aborted": "; ".join(f"round {row['round']}: {row['status']}: {row['reason']}" for row in aborted)}
           if aborted else {}),
    }


def driver_rounds(out: dict, sizes: list[int], modes: list[str], m: int, rounds: int, min_group: int) -> dict:
    """[8]: the product path's rounds at every size and mode; prints one line per round and
    the final JSON line."""
    out["driver_m"], out["driver_rounds_per_size"], out["driver_min_group"] = m, rounds, min_group
    table: dict[str, dict[str, list[dict]]] = {mode: {} for mode in modes}
    print("[8] | n | mode | round | status | exchanges | pipelined | survivors | left out | wall s | per-site CPU ms "
          "| server CPU s | max error / bound |", file=sys.stderr)
    for n in sizes:
        for mode in modes:
            rows = table[mode][str(n)] = driver_run(n, m, rounds, mode, min_group)
            for r in rows:
                if r["status"] == "failed":
                    print(f"[8] | {n:,} | {mode} | - | FAILED: {r['reason'][:200]} |", file=sys.stderr, flush=True)
                    continue
                err = f"{r['max_error']:.2g} / {r['error_bound']:.2g}" if "max_error" in r else r["reason"][:80]
                print(f"[8] | {n:,} | {mode} | {r['round']} | {r['status']} | {r['exchanges']} | "
                      f"{'yes' if r['pipelined'] else 'no'} | {r['survivors']} | {r['left_out']} | "
                      f"{r['wall_seconds']:.2f} | {r['site_cpu_ms']:.1f} | {r['server_cpu_seconds']:.3f} | {err} |",
                      file=sys.stderr, flush=True)
    out["driver"] = table
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
