"""The released model of a model-confidential run: a site unmasks the saved masked model.

The server's ``Result`` (and the file the app saves) holds only the masked model
(:class:`~sgs_flower.confidential.masked_model.MaskedModel` as arrays). A site, or
whoever the sites give a key file to, recovers the plaintext model with
``sgs-flower unmask``; the MAC is checked, so a file the server changed is refused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sgs_flower.confidential.masked_model import MaskedModel, unmask
from sgs_flower.confidential.model_key import load_key_file


def find_key_file(masked: MaskedModel, folder: Path) -> Path | None:
    """A site's key file under ``folder`` (searched recursively) holding the model's key."""
    for path in sorted(folder.rglob("*.model-key.json")):
        try:
            if load_key_file(path).key_id == masked.key_id:
                return path
        except (OSError, ValueError, KeyError):
            continue
    return None


def unmask_file(masked_path: Path, key_path: Path) -> dict[str, np.ndarray]:
    """The plaintext model (entry name -> array) of a saved masked model."""
    with np.load(masked_path, allow_pickle=False) as f:
        masked = MaskedModel.from_arrays({k: f[k] for k in f.files})
    state = load_key_file(key_path)
    arrays = unmask(masked, state.key, state.key_id)
    return {k: a for (k, _, _), a in zip(masked.layout, arrays, strict=True)}
