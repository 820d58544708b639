"""Typed errors of input validation.

Both derive from :class:`~sgs_flower.errors.SecAggError`, so the protocol can catch
them where it catches its own errors, and they are told apart by what follows:

* :class:`ProofError`: one site's bound proof is malformed or does not verify. Only that
  site is at fault; it is left out as a dropout and the round goes on.
* :class:`OpeningError`: the survivors' commitments, added up, do not open to the
  unmasked sum. Some site masked a vector other than the one it proved; the sum may be
  wrong, so nothing is released (the round is aborted).
"""

from __future__ import annotations

from sgs_flower.errors import SecAggError


class ProofError(SecAggError):
    """A malformed or failing bound proof (bytes, point, scalar or equation named)."""


class OpeningError(SecAggError):
    """The aggregate opening failed: the commitments do not match the unmasked sum."""
