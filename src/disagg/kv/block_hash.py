"""Content hash of a full KV block, chained over the blocks before it.

hash_i = H(hash_{i-1}, model id, the block's token ids). Equal hashes mean equal KV (same model,
same tokens at the same positions), so any process computes the same key with no coordination:
the engine's prefix cache uses it now, a shared pool can later.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

ROOT = bytes(16)


def block_hash(parent: bytes | None, token_ids: Sequence[int], model_id: str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or ROOT)
    h.update(model_id.encode())
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


def chain_hashes(token_ids: Sequence[int], block_size: int, model_id: str,
                 start: list[bytes] | None = None) -> list[bytes]:
    """Hashes of every full block of `token_ids`, extending `start` (hashes already known)."""
    hashes = list(start or [])
    for i in range(len(hashes), len(token_ids) // block_size):
        parent = hashes[-1] if hashes else None
        hashes.append(block_hash(parent, token_ids[i * block_size : (i + 1) * block_size], model_id))
    return hashes


def tokens_digest(token_ids: Sequence[int]) -> str:
    """Digest of a token sequence, so a KV receiver can check the KV belongs to its prompt."""
    return hashlib.blake2b(struct.pack(f"<{len(token_ids)}q", *token_ids), digest_size=16).hexdigest()
