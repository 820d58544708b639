"""What a lying server can build at the unmask stage of a global round (issue 30).

A global round's unmask request carries one BLS aggregate signature and the list of its
signers. The tests that play an active server hold the signers' individual consistency
signatures (the replies they collected) and build whatever request they want to try:
any signers, any signatures, summed with blspy exactly as the project's server does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sgs_flower.secagg import bls
from sgs_flower.secagg.wire import UnmaskRequest


def aggregate(signatures: Iterable[bytes]) -> bytes:
    """The 96-byte sum of BLS signatures (raw bytes, each a valid G2 point)."""
    return bytes(bls.aggregate([bls.parse_signature(s, "a signature") for s in signatures]))


def aggregate_request(
    run_id: int, round_id: int, recipient: int, survivors: tuple[int, ...],
    signatures: Mapping[int, bytes] | Iterable[tuple[int, bytes]], signers: tuple[int, ...] | None = None,
) -> UnmaskRequest:
    """An unmask request whose aggregate is the sum of ``signatures`` and whose signer
    list is ``signers`` (by default the nodes of ``signatures``, in their order)."""
    pairs = tuple(signatures.items()) if isinstance(signatures, Mapping) else tuple(signatures)
    listed = tuple(v for v, _ in pairs) if signers is None else signers
    return UnmaskRequest(run_id=run_id, round_id=round_id, recipient=recipient, survivors=survivors,
                         aggregate=aggregate(s for _, s in pairs), signers=listed)
