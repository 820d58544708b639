"""Quantization error of scaled weights (README table): 10^6 coordinates, 5 clients,
32-bit field, clip 1.0, uniform updates; prints the bound, the measured max error and
the upload bytes per client for several weight profiles."""
import time

import numpy as np

from sgs_flower.pipeline import UpdateSpec, decode_update, encode_update

rng = np.random.default_rng(0)
D, n = 1_000_000, 5
for weights in ([8000]*5, [1,2,3,4,5], [10**6]*5, [100, 1000, 8000, 50000, 10**6]):
    spec = UpdateSpec(clip_range=1.0, max_cohort=n, metric_slots=8)
    xs = [rng.uniform(-1, 1, D).astype(np.float32) for _ in range(n)]
    t=time.perf_counter()
    vecs = [encode_update(x, {"loss": 0.5}, w, spec).vector for x, w in zip(xs, weights, strict=True)]
    te=(time.perf_counter()-t)/n
    total = np.zeros_like(vecs[0])
    for v in vecs:
        total += v
    dec = decode_update(total, spec, n, D, ["loss"])
    true = sum(w * x.astype(np.float64) for w, x in zip(weights, xs, strict=True)) / sum(weights)
    err = float(np.max(np.abs(dec.mean_delta - true)))
    print(f"weights {weights}: max err {err:.3g}, bound {dec.error_bound:.3g}, upload {vecs[0].nbytes} B vs float32 {D*4} B (+{vecs[0].nbytes-D*4} B), encode {te*1e3:.1f} ms/client, levels {spec.quantization.levels}")
