"""Issue 29: the masked-input reply's timing, as a lying server measures it.

A site trains inside the masked-input exchange, so without a policy its reply time grows
with its data and tells the server its ``num-examples`` (the issue measured ~0.15 ms per
example on the app). ``sgs-reply-quantum`` makes the site answer at a multiple of the
quantum after the request arrived. Sites here train for a time proportional to their
num-examples (0.3 ms per example, 36..360 examples: 11..108 ms) through the real mod.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Context, Message
from test_active_server import N_MOD, ModSite, _masked_extra, _spec, _through_shares

from sgs_flower.secagg.wire import Stage

PER_EXAMPLE = 3e-4


class SlowSite(ModSite):
    """Training takes ``PER_EXAMPLE`` seconds per example, as real training does."""

    def __init__(self, node: int, examples: int, node_config: dict | None = None) -> None:
        super().__init__(node, node_config)
        self.examples = examples

    def train(self, msg: Message, context: Context) -> Message:
        time.sleep(PER_EXAMPLE * self.examples)
        return super().train(msg, context)


def _reply_seconds(node_config: dict | None) -> tuple[list[int], list[float]]:
    examples = [36 + 81 * (u - 1) for u in range(1, N_MOD + 1)]  # 36 .. 360 for 5 sites
    sites = {u: SlowSite(u, examples[u - 1], node_config) for u in range(1, N_MOD + 1)}
    spec = _spec()
    bundles = _through_shares(sites, spec)
    seconds = []
    for u, site in sites.items():
        extra, fields = _masked_extra(spec)
        t0 = time.monotonic()
        out = site.send(Stage.MASKED_INPUT, bundles[u], extra, fields)
        seconds.append(time.monotonic() - t0)
        assert not out.has_error(), out.error.reason
        assert site.trained == 1
    return examples, seconds


def test_without_a_quantum_the_reply_time_tells_num_examples_documented_limit():
    """The limit docs/threat_model.md states: a least-squares line through (reply time,
    num-examples) reads every site's num-examples back within 25 %."""
    examples, seconds = _reply_seconds(None)
    slope, intercept = np.polyfit(seconds, examples, 1)
    guessed = np.polyval([slope, intercept], seconds)
    assert np.corrcoef(seconds, examples)[0, 1] > 0.95
    assert np.max(np.abs(guessed - examples) / np.array(examples)) < 0.25


def test_with_sgs_reply_quantum_every_site_answers_at_the_quantum():
    """With a quantum above the longest training every reply takes the quantum: the
    spread of reply times is a scheduling jitter, not a function of the data."""
    quantum = 0.3
    _, seconds = _reply_seconds({"sgs-reply-quantum": str(quantum)})
    assert all(quantum <= s < quantum + 0.1 for s in seconds), seconds
    # without the policy the spread is the training times' (~0.1 s); with it, jitter only
    assert max(seconds) - min(seconds) < 0.05, seconds
