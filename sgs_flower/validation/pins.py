"""SHA-256 pins of the validation generators, in blocks (generated data, checked by a test).

Why: deriving the 2 x 8,192 Bulletproofs generators by hash-to-curve costs seconds, and a
deployed site runs every message in a new process. :mod:`group` keeps them in a disk cache;
these pins let any process, the verifier included, load a cached block only if it is
exactly what hash-to-curve gives (``tests/test_validation_crypto.py::test_the_pinned_generator_blocks_are_hash_to_curve``
re-derives every block).
"""

from __future__ import annotations

#: Generators per pinned block.
BLOCK = 1024

#: label -> SHA-256 (hex) of each block's uncompressed big-endian (x, y) encodings.
PINNED: dict[bytes, tuple[str, ...]] = {
    b'bulletproofs/g': (
        "7bea8086cc263557ecedbf8957a0fe2ca6af3f89d7ea682acf5b7958a5021fa4",
        "276ed646bd47fb2920c065ac9eab5a9429234173b2f565d51099c9fba7f4fad7",
        "c94033f753c8c59d1104eb0fde22f9085dafb1117dc920316d70b807cd7aff73",
        "dab056c93a80723c0e7b48c5d3673ce85352765bd9ef070b9284006c7b88faaf",
        "42ff0844c2e3a791790f2b8be4fb785d8529a3dafe7f03bb6f3e63c5d74b8230",
        "d0c4ecb4007115d5b12c75774815eebedb65d7853394938d2bde44ad6da10e67",
        "bfabe32a4c2f1f39310fe75246486e8ec907b499bd3e4403b754e2919ab47080",
        "8877de4a8cf4559877bcb12816477d9d9d3e1027ceaa90824cada90e70a2a735",
    ),
    b'bulletproofs/h': (
        "3261f7403c963e61953664c3fec8aa3cff9a0f003078f793ead7ff16870ba696",
        "c4f084cc9f45b696c7fda163c9e82bced196d623e777ee4cc1b600b76c2d2cc4",
        "c43aef8ae3ef2104109edbfd46b86783360a1c8e359009d748ee4e4a8a9f243b",
        "a74a34037bc596b78d27d50ef707deccff9f37a79b4d44a2cb895358ecc25963",
        "baf029571636c09dd30433ebdddc16f369f65be5ac2ca105defc0321aee3787d",
        "08b16385249db5f68646389d7ca5d2b74d6c372b3b5823935a6f5aafe5d742cc",
        "894ab3cd14aae0047ef9f935293acaebbe4608859224a4a4ae233cd599fc65a0",
        "d1ccb77403bee7c577c2a1cc798d4ee82594b3b6b7265d2d2ac9c7f50f8e855d",
    ),
}
