"""Exact deduplication by content hash, and near-duplicate removal with MinHash-LSH (datasketch)."""

from __future__ import annotations

import hashlib
import re
import struct

_SPACE = re.compile(r"\s+")


def content_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class ExactDedup:
    """Remembers the hash of every document seen; `seen(text)` is True for a repeat."""

    def __init__(self) -> None:
        self._hashes: set[bytes] = set()

    def seen(self, text: str) -> bool:
        digest = content_hash(text)
        if digest in self._hashes:
            return True
        self._hashes.add(digest)
        return False

    def __contains__(self, text: str) -> bool:
        return content_hash(text) in self._hashes


def _hash32(data: bytes) -> int:
    return struct.unpack("<I", hashlib.blake2b(data, digest_size=4).digest())[0]


def _band_hash(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()  # keeps the LSH index small per document


class NearDedup:
    """Near-duplicate detection: MinHash over character n-grams (any script, no word splitting),
    indexed in banded LSH. `seen(text)` is True when an earlier kept document is estimated to have
    Jaccard similarity >= `threshold`; otherwise the document is indexed and False returned."""

    def __init__(self, threshold: float = 0.85, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        from datasketch import MinHashLSH

        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, hashfunc=_band_hash)
        self._n = 0

    def signature(self, text: str):  # -> datasketch.MinHash
        from datasketch import MinHash

        norm = _SPACE.sub(" ", text.lower()).strip()
        n = self.ngram
        shingles = {norm[i : i + n].encode("utf-8") for i in range(max(1, len(norm) - n + 1))}
        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_hash32)
        m.update_batch(shingles)
        return m

    def matches(self, text: str) -> bool:
        """True when `text` is a near-duplicate of something indexed; never indexes it."""
        return bool(self._lsh.query(self.signature(text)))

    def seen(self, text: str) -> bool:
        sig = self.signature(text)
        if self._lsh.query(sig):
            return True
        self._lsh.insert(self._n, sig, check_duplication=False)
        self._n += 1
        return False
