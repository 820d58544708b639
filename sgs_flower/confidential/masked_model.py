"""The global model under the sites' model key: what the server holds instead of the model.

Why this works at secure aggregation's price: FedAvg's new model is the weighted mean of
the survivors' new local models, a *sum* divided by the total weight. Each site encodes its
whole new model (not its delta) with the round's fixed point, exactly as a delta is
encoded (:func:`sgs_flower.pipeline.encode_update`, weights scaled), and adds to the
vector's model words a mask ``M_u = PRG(model_key, run, round, attempt, u)`` of its own
before the SecAgg+ masks go on. The server's unmasked sum is then

    Y = sum_u enc(w_u x_u) + sum_{u in survivors} M_u      (mod 2^b)

which is uniform to anyone without the key (every ``M_u`` is an independent uniform
vector; per-site masks, not one mask times the cohort size, so no low bits survive
when the survivor count is even). The server stores ``Y`` with the public facts a site
needs to remove the masks (run, round, attempt, survivors, spec, layout): the masked
model. A site with the key subtracts the survivors' masks and decodes the sum like
the server decodes a delta sum, giving the weighted mean model: the server's update
rule is the identity in the masked domain, the division by the total weight happens at
the site.

Integrity: masks alone are malleable (the server could add a known offset to ``Y``, or
lie about the survivors). So each site also puts ``TAG_WORDS`` words of a linear MAC in
the same vector, ``tag_u = R . (model words || weight and count words)`` with a secret Toeplitz matrix ``R``
derived from the key and the round's public context (never from the survivors, which
no site knows yet); the tags sum like everything else, so the unmasked sum carries
``R . (sum of model words || total weight)``. A site unmasking the model recomputes it and
refuses a mismatch (:class:`ModelIntegrityError`): a changed word, survivor list, spec,
layout, round or weight. Over Z_{2^b} one tag word is fooled with probability at most
1/2 (an offset in the top bit only), so 48 words bound a forgery by 2^-48. The tag words
are masked like the model words, so they reveal nothing about ``R`` or the model.

What the server still learns: the clip counts (how many coordinates lay beyond the
public range, for a retry), the failure counters, the weight histogram, the total weight
and the count. The in-range bins of the range histograms are masked (they would give
the model's magnitude profile); the bins beyond the range stay in the clear, they are
all zero unless a retry is needed and say only how far beyond the range values lay.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgs_flower.pipeline import (
    HIST_BINS,
    HIST_LOW,
    UpdateSpec,
    apply_delta,
    decode_update,
    model_delta,
)
from sgs_flower.secagg.errors import MalformedMessageError, ModelIntegrityError
from sgs_flower.secagg.keys import derive
from sgs_flower.secagg.prg import MaskExpander, dtype_for_bits, expand, reduce_mod

FORMAT = "sgs-masked-model/1"
WORDS_KEY = "sgs.masked-model"  # the masked sum's words, in the ArrayRecord the server holds
META_KEY = "sgs.masked-model.meta"  # its public facts (JSON, as uint8), beside the words
LABEL_MASK = b"sgs-model-mask/1"
LABEL_MAC = b"sgs-model-mac/1"
IN_RANGE_BINS = -HIST_LOW  # histogram bins below the range (thresholds r/8, r/4, r/2): masked

Layout = tuple[tuple[str, tuple[int, ...], str], ...]


def layout_of(named: Sequence[tuple[str, np.ndarray]]) -> Layout:
    """Names, shapes and dtypes of the model's entries: what a site rebuilds it into."""
    return tuple((k, tuple(int(d) for d in a.shape), np.dtype(a.dtype).str) for k, a in named)


def layout_digest(layout: Layout) -> bytes:
    return hashlib.sha256(json.dumps([list(e) for e in layout]).encode()).digest()


def zeros_like_layout(layout: Layout) -> list[np.ndarray]:
    return [np.zeros(shape, dtype=np.dtype(dt)) for _, shape, dt in layout]


def model_words(spec: UpdateSpec, model_size: int) -> int:
    """Words of the vector covered by the MAC: the encoded model and the metric slots."""
    return spec.encoded_size(model_size) + spec.metric_words


def masked_positions(spec: UpdateSpec, model_size: int) -> np.ndarray:
    """Indices of the vector under the model key's masks: model words, metric slots, tag
    words, and the in-range bins of both range histograms."""
    body = model_words(spec, model_size) + spec.tag_words
    hist = np.concatenate([np.arange(IN_RANGE_BINS), HIST_BINS + np.arange(IN_RANGE_BINS)]) + body
    return np.concatenate([np.arange(body), hist])


def trailing_words(spec: UpdateSpec, model_size: int) -> int:
    """Words after the counters: the weight (in one word or several limbs) and the count.
    The MAC covers them with the model words, whatever the weight's encoding."""
    return spec.vector_length(model_size) - model_words(spec, model_size) - spec.tag_words - spec.counters


@dataclass(frozen=True)
class RoundContext:
    """The public facts one round's key masks and MAC are derived from."""

    run_id: int
    round_id: int
    spec: UpdateSpec
    layout: Layout

    def digest(self, attempt: int) -> bytes:
        """Cached per attempt: a site derives one mask key per survivor from it."""
        cache = self.__dict__.setdefault("_digests", {})
        if attempt not in cache:
            body = json.dumps({"run": self.run_id, "round": self.round_id, "attempt": attempt,
                               "spec": self.spec.to_config()}, sort_keys=True).encode()
            cache[attempt] = hashlib.sha256(body + layout_digest(self.layout)).digest()
        return cache[attempt]


def _mask_key(key: bytes, ctx: RoundContext, attempt: int, node: int) -> bytes:
    return derive(key, LABEL_MASK, ctx.digest(attempt), node)


def site_mask(key: bytes, ctx: RoundContext, attempt: int, node: int, length: int) -> np.ndarray:
    """``M_u``: the model-key mask of node ``u`` for one attempt of one round."""
    return expand(_mask_key(key, ctx, attempt, node), length, ctx.spec.field_bits)


def mac_vector(key: bytes, ctx: RoundContext, attempt: int, columns: int) -> np.ndarray:
    """The secret Toeplitz MAC matrix ``R`` as its generating vector ``c`` (uniform words
    mod 2^b, ``columns + TAG_WORDS - 1`` of them): row ``i`` of ``R`` is
    ``c[i : i + columns]``.

    Why Toeplitz: a uniform matrix would cost TAG_WORDS keystreams of the model's size
    per site and round; this costs one. It is as strong here: for an offset ``D != 0``,
    let ``j`` be the last index whose entry has the least 2-adic valuation ``v``; row
    ``i`` multiplies ``c[i + j]`` by ``D[j]``, while the rows before it meet
    ``c[i + j]`` only through entries of higher valuation, which leave one more bit of
    it unknown; so each row is fooled with probability at most 1/2 given the rows before
    it, and all TAG_WORDS rows with at most 2^-TAG_WORDS."""
    k = derive(key, LABEL_MAC, ctx.digest(attempt))
    return expand(k, columns + ctx.spec.tag_words - 1, ctx.spec.field_bits)


def _tags(c: np.ndarray, words: np.ndarray, trailing: np.ndarray, field_bits: int, rows: int) -> np.ndarray:
    """``R . v mod 2^b`` for the Toeplitz ``R`` of ``c``: row ``i`` is the contiguous
    slice ``c[i : i + len(v)]``. Up to 32 bits in uint32 words, whose dot product wraps
    mod 2^32 exactly (2^b divides it) and runs 5x faster than in uint64 here; wider
    fields in uint64 (mod 2^64)."""
    dtype = np.uint32 if field_bits <= 32 else np.uint64
    v = np.concatenate([words.astype(dtype), trailing.astype(dtype)])
    cc = c.astype(dtype)
    out = np.empty(rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(rows):
            out[i] = np.dot(cc[i : i + v.size], v)
    return reduce_mod(out, field_bits)


def seal(vector: np.ndarray, key: bytes, ctx: RoundContext, attempt: int, node: int, model_size: int) -> np.ndarray:
    """Site side: write the MAC tag of an encoded vector and add the site's key mask, in
    place (the vector then goes to SecAgg+ masking). ``vector`` is the encoder's output
    for this round's spec (model words, metric slots, zeroed tag words, counters,
    weight, count)."""
    spec = ctx.spec
    b = spec.field_bits
    n_words = model_words(spec, model_size)
    if vector.size != spec.vector_length(model_size):
        raise MalformedMessageError(f"a vector of {vector.size} words does not fit the round's spec")
    k = trailing_words(spec, model_size)
    c = mac_vector(key, ctx, attempt, n_words + k)
    vector[n_words : n_words + spec.tag_words] = _tags(c, vector[:n_words], vector[vector.size - k :], b,
                                                       spec.tag_words).astype(vector.dtype)
    pos = masked_positions(spec, model_size)
    region = np.ascontiguousarray(vector[pos])
    MaskExpander(pos.size, region.dtype).accumulate(region, [(_mask_key(key, ctx, attempt, node), +1)])
    vector[pos] = reduce_mod(region, b)
    return vector


@dataclass(frozen=True)
class MaskedModel:
    """The masked sum and what a site needs to unmask it (all public)."""

    words: np.ndarray
    run_id: int
    round_id: int
    attempt: int
    survivors: tuple[int, ...]
    key_id: str
    spec: UpdateSpec
    layout: Layout

    @property
    def context(self) -> RoundContext:
        cached = self.__dict__.get("_context")
        if cached is None:
            cached = RoundContext(self.run_id, self.round_id, self.spec, self.layout)
            object.__setattr__(self, "_context", cached)
        return cached

    @property
    def model_size(self) -> int:
        return int(sum(int(np.prod(shape)) for _, shape, _ in self.layout))

    def meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "run": self.run_id, "round": self.round_id, "attempt": self.attempt,
                "survivors": list(self.survivors), "key-id": self.key_id, "spec": self.spec.to_config(),
                "layout": [[k, list(s), d] for k, s, d in self.layout]}

    def to_arrays(self) -> dict[str, np.ndarray]:
        """As plain arrays (an ArrayRecord's or an .npz file's entries)."""
        raw = json.dumps(self.meta(), sort_keys=True).encode()
        return {WORDS_KEY: self.words, META_KEY: np.frombuffer(raw, dtype=np.uint8).copy()}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MaskedModel:
        """Parse what the server sent (or a saved file); malformed input is a typed error."""
        if set(arrays) != {WORDS_KEY, META_KEY}:
            raise MalformedMessageError(f"a masked model holds exactly {WORDS_KEY!r} and {META_KEY!r}, got {sorted(arrays)}")
        try:
            meta = json.loads(np.asarray(arrays[META_KEY], dtype=np.uint8).tobytes())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            spec = UpdateSpec.from_config(meta["spec"])
            layout: Layout = tuple((str(k), tuple(int(d) for d in s), str(np.dtype(d).str)) for k, s, d in meta["layout"])
            survivors = tuple(int(u) for u in meta["survivors"])
            out = cls(words=np.asarray(arrays[WORDS_KEY]), run_id=int(meta["run"]), round_id=int(meta["round"]),
                      attempt=int(meta["attempt"]), survivors=survivors, key_id=str(meta["key-id"]), spec=spec,
                      layout=layout)
        except MalformedMessageError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"malformed masked model: {exc!r}") from exc
        if not spec.model_key or spec.model_key != out.key_id:
            raise MalformedMessageError("masked model's spec does not name its model key")
        if out.words.dtype != dtype_for_bits(spec.field_bits) or out.words.shape != (spec.vector_length(out.model_size),):
            raise MalformedMessageError(
                f"masked model's words ({out.words.dtype}, {out.words.shape}) do not fit its spec "
                f"({spec.vector_length(out.model_size)} words of {spec.field_bits} bits)")
        if not survivors or len(set(survivors)) != len(survivors):
            raise MalformedMessageError("masked model's survivor list is empty or repeats a node")
        return out


def unmask(masked: MaskedModel, key: bytes, key_id: str) -> list[np.ndarray]:
    """Site side: remove the survivors' key masks, check the MAC, decode the weighted
    mean model into the layout's arrays. Raises :class:`ModelIntegrityError` when the
    words, survivors, spec, layout, round or weight were changed (or the key differs)."""
    if masked.key_id != key_id:
        raise ModelIntegrityError(
            f"the masked model is under model key {masked.key_id}, this site holds {key_id or 'none'}")
    spec, ctx = masked.spec, masked.context
    b, size = spec.field_bits, masked.model_size
    pos = masked_positions(spec, size)
    region = np.ascontiguousarray(masked.words[pos])
    # every survivor's mask subtracted in one sweep over the region (words wrap; 2^b divides them)
    MaskExpander(pos.size, region.dtype).accumulate(
        region, [(_mask_key(key, ctx, masked.attempt, u), -1) for u in masked.survivors])
    total = masked.words.astype(np.uint64)
    total[pos] = reduce_mod(region, b)
    n_words = model_words(spec, size)
    k = trailing_words(spec, size)
    c = mac_vector(key, ctx, masked.attempt, n_words + k)
    expect = _tags(c, total[:n_words], total[total.size - k :], b, spec.tag_words)
    if not np.array_equal(expect, total[n_words : n_words + spec.tag_words]):
        raise ModelIntegrityError(
            "the masked model fails its MAC: its words, survivor list, spec, layout, round or weight are not "
            "what the sites aggregated (a server that changed or replayed it, or another key); refused")
    decoded = decode_update(total.astype(masked.words.dtype), spec, len(masked.survivors), size)
    if decoded.total_weight <= 0:
        raise ModelIntegrityError("the masked model carries no usable update (total weight 0)")
    like = zeros_like_layout(masked.layout)
    return apply_delta(like, decoded.mean_delta)


def flat_model(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """A model's entries as one vector in the update order (float entries, then integer
    ones), which is what a site encodes in this mode instead of its delta."""
    return model_delta(list(arrays), [np.zeros_like(a) for a in arrays])
