"""Names of KV blocks: a hash chain over token ids, so identical prefixes get identical keys.

Block i of a prompt covers tokens [i*B, (i+1)*B). Its chain hash digests the hash of block i-1
and the token ids of block i, so it identifies the whole prefix up to the end of block i (as in
vLLM's automatic prefix caching): two requests sharing a prefix share the keys of its blocks,
and a single differing token changes the hash of its block and of every block after it.
Only full blocks are named; a partial tail block is never stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_NAMESPACE = "ringserve"
# 16 bytes (32 hex chars): collisions are out of reach for any realistic number of blocks.
HASH_BYTES = 16
HASH_HEX_CHARS = 2 * HASH_BYTES
# blake2b personalisation (at most 16 bytes): these digests never equal any other use of blake2b.
_CHAIN_SEED_PERSON = b"ringserve-kv-v1"


@dataclass(frozen=True)
class BlockRef:
    """One full block of a prompt: tokens [start, end), named by the hash of the prefix it ends."""

    index: int
    start: int
    end: int
    chain_hash: str
    # chain hash of block index-1 ("" for the first block): the kvstore evicts chains tail-first
    parent_hash: str = ""


@dataclass(frozen=True)
class KVBlockKey:
    """Where one layer of one block lives in Redis."""

    model_id: str
    layer: int
    chain_hash: str
    quant: str

    def redis_key(self) -> str:
        return f"{KEY_NAMESPACE}:kv:{self.model_id}:{self.quant}:{self.layer}:{self.chain_hash}"


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=HASH_BYTES, person=_CHAIN_SEED_PERSON).hexdigest()


def chain_seed(model_id: str) -> str:
    """The 'hash of block -1' of a model's chains: equal token ids under two models never collide."""
    return _digest(model_id.encode())


def block_chain(model_id: str, token_ids: Sequence[int], block_tokens: int) -> list[BlockRef]:
    """The full blocks of `token_ids` with their chain hashes (a tail shorter than a block is left out)."""
    if block_tokens < 1:
        raise ValueError("block_tokens must be at least 1")
    # Fixed-width little-endian ids: the digest of a block never depends on how ids are spelled.
    ids = np.asarray(token_ids, dtype="<i8")
    refs: list[BlockRef] = []
    parent = chain_seed(model_id)
    for index in range(len(ids) // block_tokens):
        start, end = index * block_tokens, (index + 1) * block_tokens
        chain_hash = _digest(bytes.fromhex(parent) + ids[start:end].tobytes())
        refs.append(BlockRef(index, start, end, chain_hash, parent_hash="" if index == 0 else parent))
        parent = chain_hash
    return refs


def is_chain_hash(value: str) -> bool:
    return len(value) == HASH_HEX_CHARS and all(c in "0123456789abcdef" for c in value)
