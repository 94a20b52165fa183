"""Whole cached blocks out of one engine and into another by hash (the prefix KV store's engine side,
tandem/engine/kv_roles.py): the importing engine finds them as prefix hits, computes only the rest,
and generates what an engine that computed everything generates."""
from __future__ import annotations

import pytest

from tandem import SamplingParams
from tests.engine.test_kv_transfer import GREEDY, colocated, engine, prompts_for, run


def generate(e, rid: str, ids: list[int], params: SamplingParams = GREEDY):
    e.add_request(rid, ids, params)
    return run(e)[rid]


def exported(path: str, prompt: list[int]) -> tuple[list[int], list[bytes]]:
    writer = engine(path, None)
    generate(writer, "w", prompt)
    blocks = writer.export_blocks(writer.block_hashes(prompt))
    return [h for h, _ in blocks], [p for _, p in blocks]


def test_imported_blocks_are_prefix_hits_and_change_nothing(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    prompt = prompts_for(7, [70])[0]  # 4 full blocks of 16 and 6 tokens
    writer = engine(path, None)
    generate(writer, "w", prompt)
    hashes = writer.block_hashes(prompt)
    assert len(hashes) == 4
    blocks = writer.export_blocks(hashes + [12345])  # an unknown hash is left out
    assert [h for h, _ in blocks] == hashes
    assert {len(p) for _, p in blocks} == {2 * 2 * 16 * 2 * 16 * 4}  # layers, K/V, slots, KV heads, dim, fp32

    reader = engine(path, None)
    assert reader.import_blocks([], hashes[:3], [p for _, p in blocks[:3]]) == 3
    assert reader.kv.pool.num_free == reader.kv.pool.num_blocks  # loaded blocks stay free: evictable
    assert reader.export_blocks(hashes[:3]) == blocks[:3]  # each block's bytes where they belong
    out = generate(reader, "r", prompt)
    assert out.num_cached_tokens == 48  # the three loaded blocks, not computed again
    assert out.outputs[0].token_ids == colocated(path, [prompt], GREEDY)[0]
    assert reader.import_blocks([], hashes[:3], [p for _, p in blocks[:3]]) == 0  # cached already: nothing written


def test_import_keeps_the_chain_whole(tiny_model_dirs):
    """Importing never evicts the cached prefix it extends, nor its own blocks; what the pool must give
    up later goes from the chain's end, so what is left is still a prefix."""
    path = tiny_model_dirs["llama"]
    prompt = prompts_for(8, [100])[0]  # 6 full blocks
    hashes, payloads = exported(path, prompt)
    small = engine(path, None, blocks=6)
    assert small.import_blocks([], hashes[:2], payloads[:2]) == 2  # this worker's own cached prefix
    # 6 free blocks, 2 of them that prefix (least recently used): room for 3 more, and the prefix stays
    assert small.import_blocks(hashes[:2], hashes[2:], payloads[2:]) == 3
    cached = lambda: [small.kv.pool.lookup(h) is not None for h in hashes]  # noqa: E731
    assert cached() == [True] * 5 + [False]
    # another request takes three blocks: the one free uncached block, then the chain's last two
    small.kv.pool.free(small.kv.pool.allocate(3))
    assert cached() == [True, True, True, False, False, False]


def test_import_refuses_blocks_of_another_size_and_needs_a_prefix_cache(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    hashes, payloads = exported(path, prompts_for(9, [40])[0])
    with pytest.raises(ValueError, match="this layout's are"):
        engine(path, None).import_blocks([], hashes[:1], [payloads[0][:-4]])
    assert engine(path, None, enable_prefix_caching=False).import_blocks([], hashes, payloads) == 0
