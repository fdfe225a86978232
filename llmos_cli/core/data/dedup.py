"""Exact deduplication by a 128-bit content hash."""

from __future__ import annotations

import hashlib


class ExactDedup:
    """Remembers the hash of every document seen; `seen(text)` is True for a repeat."""

    def __init__(self) -> None:
        self._hashes: set[bytes] = set()

    def seen(self, text: str) -> bool:
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._hashes:
            return True
        self._hashes.add(digest)
        return False
