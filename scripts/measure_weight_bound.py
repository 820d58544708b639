"""Quantization error of scaled weights (docs/protocol.md table): 10^6 coordinates, 5
clients, 32-bit field, clip 1.0, uniform updates; for several weight profiles, the bound
and the measured max error at the old fixed scale S = max_weight = 10^6 and at the
covering scale from the cohort's weight histogram (what rounds 2.. use), and the upload
bytes per client."""
import dataclasses
import time

import numpy as np

from sgs_flower.pipeline import UpdateSpec, covering_weight_scale, decode_update, encode_update

rng = np.random.default_rng(0)
D, n = 1_000_000, 5
for weights in ([1] * 5, [163] * 5, [8000] * 5, [10**6] * 5, [1, 2, 3, 4, 5], [100, 1000, 8000, 50000, 10**6]):
    xs = [rng.uniform(-1, 1, D).astype(np.float32) for _ in range(n)]
    true = sum(w * x.astype(np.float64) for w, x in zip(weights, xs, strict=True)) / sum(weights)
    base = UpdateSpec(clip_range=1.0, max_cohort=n, metric_slots=8, weight_scale=10**6)
    row = []
    scale = base.max_weight
    for spec in (base, None):
        if spec is None:
            spec = dataclasses.replace(base, weight_scale=scale)
        t = time.perf_counter()
        vecs = [encode_update(x, {"loss": 0.5}, w, spec).vector for x, w in zip(xs, weights, strict=True)]
        te = (time.perf_counter() - t) / n
        total = np.zeros_like(vecs[0])
        for v in vecs:
            total += v
        dec = decode_update(total, spec, n, D, ["loss"])
        scale = covering_weight_scale(spec.max_weight, dec.weight_histogram)
        err = float(np.max(np.abs(dec.mean_delta - true)))
        row.append(f"S={spec.weight_unit}: bound {dec.error_bound:.2g}, max err {err:.2g}")
    print(f"weights {weights}: " + "; ".join(row) + f"; upload {vecs[0].nbytes} B vs float32 {D * 4} B "
          f"(+{vecs[0].nbytes - D * 4} B), encode {te * 1e3:.1f} ms/client, levels {spec.quantization.levels}")
