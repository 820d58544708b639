"""Input validation under secure aggregation: the cryptographic core (no Flower).

A site proves, without revealing its encoded update x, that ||x||_2 is at most the
round's bound B (up to the stated slack gamma), and the survivors' commitments must
open to the unmasked sum so that what was proven is what was summed. See
``docs/validation.md`` for the derivation and the costs.

Modules, one job each: :mod:`.group` (BLS12-381 G1 via arkworks), :mod:`.transcript`
(Fiat–Shamir), :mod:`.rangeproof` (aggregated Bulletproofs), :mod:`.projection`
(Rademacher projections and the soundness parameters), :mod:`.proof` (the site's
statement), :mod:`.opening` (the server's check after unmask).
"""
