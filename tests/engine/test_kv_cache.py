"""The paged KV cache: block hashes, the block pool, and the per-request manager, with real objects
(no engine) — plus one engine-level check that prefix caching is used and changes nothing."""
from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest

from tandem.engine.kv_cache.block_hash import (common_prefix_blocks, extend_hashes, hash_block, hash_blocks,
                                               root_hash)
from tandem.engine.kv_cache.block_pool import BlockPool
from tandem.engine.kv_cache.manager import KVCacheManager
from tandem.engine.request import RequestGroup
from tandem.sampling_params import SamplingParams

BS = 4  # block size for the unit tests


def _requests(prompt: list[int], request_id: str = "r", **params):
    """The sequences of one request group (n / best_of of them), as the engine would create them."""
    group = RequestGroup.create(request_id, None, prompt, SamplingParams(**params), arrival_time=0.0)
    return group.seqs


def _admit(kv: KVCacheManager, req) -> int:
    """What the scheduler does for a new request: look up the cached prefix, allocate the rest, and
    (pretending the forward pass ran) mark every token computed. Returns the cached token count."""
    prefix = kv.computed_prefix(req)
    cached = len(prefix) * kv.block_size
    assert kv.allocate(req, req.num_tokens - cached, prefix)  # num_computed_tokens is still 0 here
    req.num_computed_tokens = req.num_tokens
    return cached


def _decode(kv: KVCacheManager, req, token: int) -> None:
    """One decode step: the sampled token is appended, then room for it is allocated and it is computed."""
    req.append_token(token)
    assert kv.allocate(req, 1)
    req.num_computed_tokens += 1


# ---- block hashes ------------------------------------------------------------------------------------


def test_hashes_are_deterministic_and_match_the_documented_format():
    tokens = list(range(100, 140))
    a = hash_blocks(tokens, 16)
    assert a == hash_blocks(list(tokens), 16)
    # independent re-derivation: sha256(parent u64 LE || tokens as i64 LE), first 8 bytes LE
    parent = int.from_bytes(hashlib.sha256(b"tandem-kv-root:tandem").digest()[:8], "little")
    assert root_hash() == parent
    for i, h in enumerate(a):
        d = hashlib.sha256(struct.pack("<Q", parent) + struct.pack("<16q", *tokens[16 * i:16 * i + 16])).digest()
        parent = int.from_bytes(d[:8], "little")
        assert h == parent


def test_hashes_are_stable_across_processes():
    """Not Python's randomized hash(): a process with a different PYTHONHASHSEED agrees."""
    code = ("from tandem.engine.kv_cache.block_hash import hash_blocks; "
            "print(hash_blocks(list(range(7, 71)), 16, seed='s', extra_keys=('lora-a', 3)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert out.stdout.strip() == str(hash_blocks(list(range(7, 71)), 16, seed="s", extra_keys=("lora-a", 3)))


def test_hashes_differ_with_seed_and_extra_keys():
    tokens = list(range(32))
    base = hash_blocks(tokens, 16)
    assert len(set(base)) == 2
    assert set(hash_blocks(tokens, 16, seed="other")).isdisjoint(base)
    with_salt = hash_blocks(tokens, 16, extra_keys=("salt",))
    assert set(with_salt).isdisjoint(base)
    assert set(hash_blocks(tokens, 16, extra_keys=("pepper",))).isdisjoint(with_salt)
    assert root_hash("a") != root_hash("b")


def test_hashes_chain():
    tokens = list(range(64))
    base = hash_blocks(tokens, 16)
    early = hash_blocks([999] + tokens[1:], 16)  # first token changed: every hash changes
    assert all(x != y for x, y in zip(base, early))
    late = hash_blocks(tokens[:40] + [999] + tokens[41:], 16)  # token 40 is in block 2
    assert late[:2] == base[:2] and late[2] != base[2] and late[3] != base[3]
    # the same block content after a different parent hashes differently
    assert hash_block(base[0], tokens[16:32]) == base[1]
    assert hash_block(base[1], tokens[16:32]) != base[1]


def test_partial_blocks_have_no_hash_and_extend_matches_full_computation():
    assert hash_blocks(list(range(15)), 16) == []
    assert len(hash_blocks(list(range(16)), 16)) == 1
    assert len(hash_blocks(list(range(47)), 16)) == 2
    tokens = list(range(50))
    hashes: list[int] = []
    for end in range(0, 51):  # token by token, as a request grows
        extend_hashes(hashes, tokens[:end], 16, "tandem")
        assert hashes == hash_blocks(tokens[:end], 16)
    assert common_prefix_blocks(hashes, set(hashes[:2])) == 2
    assert common_prefix_blocks(hashes, {hashes[1], hashes[2]}) == 0  # must be a prefix


# ---- block pool ---------------------------------------------------------------------------------------


def test_pool_allocation_and_free_counts():
    pool = BlockPool(8, enable_caching=True)
    assert pool.num_free == 8 and pool.usage() == 0.0
    a = pool.allocate(3)
    assert len({b.block_id for b in a}) == 3 and all(b.ref_cnt == 1 for b in a)
    assert pool.num_free == 5 and pool.usage() == pytest.approx(3 / 8)
    b = pool.allocate(5)
    assert pool.num_free == 0 and {x.block_id for x in a + b} == set(range(8))
    with pytest.raises(MemoryError):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free == 3
    pool.free(b)
    assert pool.num_free == 8
    with pytest.raises(ValueError, match="at least 1 block"):
        BlockPool(0, enable_caching=True)


def test_pool_ref_counts():
    pool = BlockPool(4, enable_caching=True)
    (blk,) = pool.allocate(1)
    pool.touch([blk])  # a second holder
    assert blk.ref_cnt == 2
    pool.free([blk])
    assert blk.ref_cnt == 1 and pool.num_free == 3  # still held: not free
    pool.free([blk])
    assert blk.ref_cnt == 0 and pool.num_free == 4


def test_pool_double_free_asserts():
    pool = BlockPool(4, enable_caching=True)
    (blk,) = pool.allocate(1)
    pool.free([blk])
    with pytest.raises(AssertionError, match="freed twice"):
        pool.free([blk])


def test_pool_evicts_least_recently_freed_cached_block_first():
    pool = BlockPool(4, enable_caching=True)
    a, b, c, d = pool.allocate(4)
    for blk, h in ((a, 101), (b, 102), (c, 103)):
        pool.cache(blk, h)
    pool.free([a])
    pool.free([b])
    pool.free([c])
    pool.free([d])  # uncached: goes to the head, reused before any cached prefix is evicted
    assert [pool.lookup(h) for h in (101, 102, 103)] == [a, b, c]
    assert pool.allocate(1) == [d]
    assert pool.lookup(101) is a
    # revive b (a prefix hit), release it again: it becomes the most recently used
    pool.touch([pool.lookup(102)])
    assert pool.num_free == 2
    pool.free([b])
    (x,) = pool.allocate(1)
    assert x is a and a.block_hash is None and pool.lookup(101) is None  # oldest evicted first
    assert pool.lookup(102) is b and pool.lookup(103) is c
    (y,) = pool.allocate(1)
    assert y is c and pool.lookup(103) is None and pool.lookup(102) is b
    (z,) = pool.allocate(1)
    assert z is b and pool.lookup(102) is None


def test_pool_caching_disabled_and_reset():
    off = BlockPool(2, enable_caching=False)
    (blk,) = off.allocate(1)
    off.cache(blk, 7)
    assert off.lookup(7) is None and blk.block_hash is None
    on = BlockPool(2, enable_caching=True)
    (blk,) = on.allocate(1)
    on.cache(blk, 7)
    assert on.reset_prefix_cache() is False  # a block is in use
    on.free([blk])
    assert on.lookup(7) is blk
    assert on.reset_prefix_cache() is True
    assert on.lookup(7) is None and blk.block_hash is None


# ---- manager --------------------------------------------------------------------------------------


def test_manager_allocates_blocks_for_tokens():
    kv = KVCacheManager(16, BS, enable_caching=True, hash_seed="tandem")
    (req,) = _requests(list(range(10)))
    assert _admit(kv, req) == 0
    assert len(kv.block_ids(req)) == 3  # ceil(10 / 4)
    assert kv.pool.num_free == 13
    _decode(kv, req, 50)  # token 11: fits the third block
    _decode(kv, req, 51)  # token 12: fits the third block
    assert len(kv.block_ids(req)) == 3
    _decode(kv, req, 52)  # token 13: a fourth block
    assert len(kv.block_ids(req)) == 4 and kv.pool.num_free == 12
    kv.free(req)
    assert kv.pool.num_free == 16
    kv.free(req)  # idempotent: a finished request is freed once only
    assert kv.pool.num_free == 16


def test_manager_refuses_when_out_of_blocks():
    kv = KVCacheManager(2, BS, enable_caching=True, hash_seed="tandem")
    (req,) = _requests(list(range(9)))  # needs 3 blocks
    assert not kv.allocate(req, 9)
    assert kv.pool.num_free == 2 and kv.block_ids(req) == []


def test_prefix_lookup_returns_shared_blocks():
    kv = KVCacheManager(16, BS, enable_caching=True, hash_seed="tandem")
    prompt = list(range(200, 211))  # 11 tokens: 2 full blocks + 3
    (first,) = _requests(prompt, "a")
    assert _admit(kv, first) == 0
    (second,) = _requests(prompt + [7, 8], "b")  # same prompt, longer
    assert _admit(kv, second) == 8
    ta, tb = kv._blocks(kv.tables["a"]), kv._blocks(kv.tables["b"])
    assert tb[0] is ta[0] and tb[1] is ta[1]  # the very same blocks
    assert ta[0].ref_cnt == 2 and ta[1].ref_cnt == 2
    assert tb[2] is not ta[2] and ta[2].ref_cnt == 1
    assert kv.prefix_queries == 11 + 13 and kv.prefix_hits == 8
    # the shared blocks are released only when both requests have gone
    kv.free(first)
    assert tb[0].ref_cnt == 1 and kv.pool.num_free == 16 - 4
    kv.free(second)
    assert kv.pool.num_free == 16


def test_prefix_hit_never_covers_the_last_token():
    kv = KVCacheManager(16, BS, enable_caching=True, hash_seed="tandem")
    prompt = list(range(8))  # exactly 2 full blocks
    (a,) = _requests(prompt, "a")
    _admit(kv, a)
    kv.free(a)
    (b,) = _requests(prompt, "b")
    assert len(kv.computed_prefix(b)) == 1  # the last token's logits must be computed
    (c,) = _requests(prompt, "c", prompt_logprobs=1)
    assert kv.computed_prefix(c) == []  # prompt logprobs need every position computed


def test_freed_prefix_is_revived_and_cache_survives_until_evicted():
    kv = KVCacheManager(4, BS, enable_caching=True, hash_seed="tandem")
    prompt = list(range(300, 309))  # 3 blocks: 2 full + 1 partial
    (a,) = _requests(prompt, "a")
    _admit(kv, a)
    full = kv.tables["a"][:2]
    kv.free(a)
    assert kv.pool.num_free == 4
    (b,) = _requests(prompt, "b")
    assert _admit(kv, b) == 8
    assert kv.tables["b"][:2] == full
    kv.free(b)
    # a different prompt needing all 4 blocks evicts the cached prefix
    (c,) = _requests(list(range(900, 916)), "c")
    assert _admit(kv, c) == 0
    kv.free(c)
    (d,) = _requests(prompt, "d")
    assert kv.computed_prefix(d) == []


def test_fork_shares_blocks_and_copy_on_write_leaves_parent_untouched():
    kv = KVCacheManager(16, BS, enable_caching=True, hash_seed="tandem")
    parent, child = _requests(list(range(10)), "p", n=2, temperature=1.0)  # 2 full blocks + 2 tokens
    _admit(kv, parent)
    parent.append_token(41)  # first sample; the child forks with its own first token
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    child.append_token(42)
    pt, ct = kv._blocks(kv.tables["p"]), kv._blocks(kv.tables["p#1"])
    assert ct == pt and all(b.ref_cnt == 2 for b in pt)
    assert kv.pool.num_free == 13  # the fork took no new block
    parent_blocks = list(pt)

    # the child writes position 10 first: the shared partial block is copied for it
    assert kv.allocate(child, 1)
    copies = kv.take_copies()
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == parent_blocks[2].block_id and dst not in [b.block_id for b in parent_blocks]
    assert kv._blocks(kv.tables["p"]) == parent_blocks  # the parent's table is untouched
    assert kv.block_ids(child) == [parent_blocks[0].block_id, parent_blocks[1].block_id, dst]
    assert parent_blocks[2].ref_cnt == 1 and parent_blocks[0].ref_cnt == 2
    assert kv.take_copies() == []  # consumed

    # now the parent is the sole holder: it writes in place, no copy
    assert kv.allocate(parent, 1)
    assert kv.take_copies() == [] and kv._blocks(kv.tables["p"]) == parent_blocks
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free == 16


def test_fork_at_a_block_boundary_needs_no_copy():
    kv = KVCacheManager(16, BS, enable_caching=True, hash_seed="tandem")
    parent, child = _requests(list(range(8)), "p", n=2, temperature=1.0)  # exactly 2 blocks
    _admit(kv, parent)
    parent.append_token(1)
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    child.append_token(2)
    assert kv.allocate(parent, 1) and kv.allocate(child, 1)
    assert kv.take_copies() == []
    assert kv.block_ids(parent)[:2] == kv.block_ids(child)[:2]
    assert kv.block_ids(parent)[2] != kv.block_ids(child)[2]
    kv.free(parent)
    kv.free(child)
    assert kv.pool.num_free == 16


def test_copy_on_write_needs_a_free_block():
    kv = KVCacheManager(3, BS, enable_caching=True, hash_seed="tandem")
    parent, child = _requests(list(range(10)), "p", n=2, temperature=1.0)  # 3 blocks: the whole pool
    _admit(kv, parent)
    parent.append_token(1)
    kv.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    child.append_token(2)
    assert not kv.allocate(child, 1)  # nothing to copy into
    assert kv.take_copies() == [] and kv.tables["p#1"] == kv.tables["p"]
    kv.free(child)
    assert kv.allocate(parent, 1) and kv.take_copies() == []
    kv.free(parent)
    assert kv.pool.num_free == 3


# ---- engine level -------------------------------------------------------------------------------------


@pytest.mark.parametrize("caching", [True, False])
def test_engine_prefix_caching_hits_and_same_output(make_llm, tiny_model_dirs, caching):
    from tandem import SamplingParams as SP

    llm = make_llm(tiny_model_dirs["llama"], block_size=16, num_gpu_blocks_override=32, max_model_len=256,
                   enable_prefix_caching=caching)
    prompt = list(range(1000, 1050))  # 50 tokens: 3 full blocks + 2
    sp = SP(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate([prompt], sp, use_tqdm=False)[0]
    hits0 = llm.stats().prefix_cache_hits
    assert hits0 == 0 and first.num_cached_tokens == 0
    second = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    if caching:
        assert llm.stats().prefix_cache_hits - hits0 == 48
        assert second.num_cached_tokens == 48
        # a follow-up that continues the first answer reuses the blocks its decode steps filled
        follow = prompt + first.outputs[0].token_ids + [5, 6, 7]  # 61 tokens
        third = llm.generate([follow], sp, use_tqdm=False)[0]
        assert third.num_cached_tokens == 48  # 3 blocks; block 4 (tokens 48..63) was never full
        longer = SP(temperature=0, max_tokens=20, ignore_eos=True)
        out = llm.generate([prompt], longer, use_tqdm=False)[0]  # computes tokens 0..68: block 3 fills
        assert out.outputs[0].token_ids[:8] == first.outputs[0].token_ids
        fifth = llm.generate([prompt + out.outputs[0].token_ids[:14] + [9, 9, 9]], sp, use_tqdm=False)[0]
        assert fifth.num_cached_tokens == 64
    else:
        assert llm.stats().prefix_cache_hits == 0 and second.num_cached_tokens == 0


def test_engine_prefix_hit_within_one_batch(make_llm, tiny_model_dirs):
    """Identical prompts admitted in the same step share the blocks the first one is filling: the
    forward pass writes every layer's KV before that layer's attention reads it."""
    from tandem import SamplingParams as SP

    llm = make_llm(tiny_model_dirs["llama"], block_size=16, num_gpu_blocks_override=32, max_model_len=256)
    prompt = list(range(3000, 3050))
    sp = SP(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate([prompt] * 3, sp, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48]
    assert outs[1].outputs[0].token_ids == outs[0].outputs[0].token_ids == outs[2].outputs[0].token_ids
    solo = make_llm(tiny_model_dirs["llama"], block_size=16, num_gpu_blocks_override=32, max_model_len=256,
                    enable_prefix_caching=False)
    assert solo.generate([prompt], sp, use_tqdm=False)[0].outputs[0].token_ids == outs[0].outputs[0].token_ids


def test_engine_prefix_cache_under_eviction_pressure(make_llm, tiny_model_dirs):
    """A small cache where cached prefixes are evicted and their blocks reused for other prompts:
    every answer equals the answer of an engine without prefix caching."""
    from tandem import SamplingParams as SP

    a, b, c = list(range(100, 130)), list(range(200, 226)), list(range(300, 333))
    order = [a, b, a + [5, 6, 7], c, a, b[:20] + [9] * 10, c[:-1], a]
    sp = SP(temperature=0, max_tokens=8, ignore_eos=True)
    plain = make_llm(tiny_model_dirs["llama"], block_size=4, num_gpu_blocks_override=24, max_model_len=128,
                     enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in plain.generate(order, sp, use_tqdm=False)]
    cached = make_llm(tiny_model_dirs["llama"], block_size=4, num_gpu_blocks_override=24, max_model_len=128)
    got, hits = [], []
    for i in range(0, len(order), 2):  # pairs, so two prompts compete for the 24 blocks
        outs = cached.generate(order[i:i + 2], sp, use_tqdm=False)
        got += [o.outputs[0].token_ids for o in outs]
        hits += [o.num_cached_tokens for o in outs]
    assert got == want
    assert sum(hits) > 0 and hits[2] == 28  # a's 7 full blocks survived b


def test_whole_prompts_fill_their_own_blocks():
    """The throwaway batch that start-up profiles (and bench/gpu_overlap.py runs): each prompt in its own
    run of blocks, every token at its slot."""
    from tandem.engine.attention import whole_prompts

    seqs, slots = whole_prompts([3, 17], 16, first_block=5)
    assert [(s.row, s.query_len, s.context_len, s.block_table) for s in seqs] == [(0, 3, 3, [5]), (3, 17, 17, [6, 7])]
    assert slots == [80, 81, 82] + list(range(96, 113))
