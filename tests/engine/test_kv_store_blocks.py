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


def test_imported_blocks_are_prefix_hits_and_change_nothing(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    prompt = prompts_for(7, [70])[0]  # 4 full blocks of 16 and 6 tokens
    writer = engine(path, None)
    generate(writer, "w", prompt)
    hashes = writer.block_hashes(prompt)
    assert len(hashes) == 4
    exported = writer.export_blocks(hashes + [12345])  # an unknown hash is left out
    assert [h for h, _ in exported] == hashes
    assert len({len(p) for _, p in exported}) == 1 and len(exported[0][1]) == 2 * 2 * 16 * 2 * 16 * 4

    reader = engine(path, None)
    assert reader.import_blocks(hashes[:3], [p for _, p in exported[:3]]) == 3
    assert reader.kv.pool.num_free == reader.kv.pool.num_blocks  # loaded blocks stay free: evictable
    out = generate(reader, "r", prompt)
    assert out.num_cached_tokens == 48  # the three loaded blocks, not computed again
    assert out.outputs[0].token_ids == colocated(path, [prompt], GREEDY)[0]
    # imported again: already cached, nothing written, still counted as the cached prefix
    assert reader.import_blocks(hashes[:3], [b"" for _ in range(3)]) == 3


def test_import_checks_sizes_and_never_evicts_its_own_blocks(tiny_model_dirs):
    path = tiny_model_dirs["llama"]
    prompt = prompts_for(8, [100])[0]
    writer = engine(path, None)
    generate(writer, "w", prompt)
    exported = writer.export_blocks(writer.block_hashes(prompt))
    hashes, payloads = [h for h, _ in exported], [p for _, p in exported]
    with pytest.raises(ValueError, match="this layout's are"):
        engine(path, None).import_blocks(hashes[:1], [payloads[0][:-4]])
    small = engine(path, None, blocks=4)  # room for three: an import stops before evicting the first
    assert small.import_blocks(hashes, payloads) == 3
    assert all(small.kv.pool.lookup(h) is not None for h in hashes[:3])
    off = engine(path, None, enable_prefix_caching=False)  # nowhere to keep them
    assert off.import_blocks(hashes, payloads) == 0
