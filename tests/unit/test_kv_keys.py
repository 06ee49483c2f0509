"""Block names: the hash chain identifies whole prefixes, and keys follow the documented format."""

from __future__ import annotations

import pytest

from shared.kv.keys import HASH_HEX_CHARS, BlockRef, KVBlockKey, block_chain, is_chain_hash

BLOCK = 4


def test_only_full_blocks_with_their_token_ranges():
    refs = block_chain("m", list(range(11)), BLOCK)
    assert [(r.index, r.start, r.end) for r in refs] == [(0, 0, 4), (1, 4, 8)]
    assert block_chain("m", [1, 2, 3], BLOCK) == []


def test_identical_prefixes_share_hashes_across_requests():
    a = block_chain("m", [5, 6, 7, 8, 9, 10, 11, 12, 1, 1, 1, 1], BLOCK)
    b = block_chain("m", [5, 6, 7, 8, 9, 10, 11, 12, 2, 2, 2, 2, 3], BLOCK)
    assert [r.chain_hash for r in a[:2]] == [r.chain_hash for r in b[:2]]
    assert a[2].chain_hash != b[2].chain_hash


def test_one_changed_token_changes_its_block_and_every_later_one():
    ids = list(range(100, 124))
    changed = list(ids)
    changed[9] += 1  # block 2
    before, after = block_chain("m", ids, BLOCK), block_chain("m", changed, BLOCK)
    same = [x.chain_hash == y.chain_hash for x, y in zip(before, after)]
    assert same == [True, True, False, False, False, False]


def test_a_block_hash_depends_on_everything_before_it():
    # Same tokens in block 1, different block 0: block 1's hash differs too (it names the prefix).
    a = block_chain("m", [1, 1, 1, 1, 7, 7, 7, 7], BLOCK)
    b = block_chain("m", [2, 2, 2, 2, 7, 7, 7, 7], BLOCK)
    assert a[1].chain_hash != b[1].chain_hash


def test_models_never_share_hashes():
    ids = list(range(8))
    assert {r.chain_hash for r in block_chain("a", ids, BLOCK)}.isdisjoint(
        r.chain_hash for r in block_chain("b", ids, BLOCK)
    )


def test_parents_link_the_chain_and_hashes_are_hex():
    refs = block_chain("m", list(range(16)), BLOCK)
    assert refs[0].parent_hash == ""
    assert [r.parent_hash for r in refs[1:]] == [r.chain_hash for r in refs[:-1]]
    assert all(is_chain_hash(r.chain_hash) and len(r.chain_hash) == HASH_HEX_CHARS for r in refs)
    assert len({r.chain_hash for r in refs}) == len(refs)


def test_token_id_types_do_not_matter():
    import numpy as np

    assert block_chain("m", np.arange(8, dtype=np.int32), BLOCK) == block_chain("m", list(range(8)), BLOCK)


def test_redis_key_format():
    key = KVBlockKey(model_id="llama", layer=3, chain_hash="ab" * 16, quant="int8")
    assert key.redis_key() == f"ringserve:kv:llama:int8:3:{'ab' * 16}"


def test_block_tokens_must_be_positive():
    with pytest.raises(ValueError):
        block_chain("m", [1, 2], 0)


def test_block_ref_is_hashable_and_frozen():
    ref = BlockRef(0, 0, 4, "0" * 32)
    assert {ref: 1}[ref] == 1
    with pytest.raises(AttributeError):
        ref.index = 2  # type: ignore[misc]
