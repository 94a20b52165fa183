"""The greedy step's tail (argmax, logprob, next inputs) against its torch twin (Triton's interpreter
on CPUs)."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels.greedy import greedy_advance, greedy_advance_ref

device = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16


def _state(n: int, width: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, width * BLOCK_SIZE - 1, (n,), generator=g)
    positions[0] = BLOCK_SIZE - 1  # the next position opens a new block
    if n > 1:
        positions[1] = width * BLOCK_SIZE - 1  # the next position lies past the table: slot -1
    tables = torch.randperm(1000, generator=g)[: n * width].view(n, width).int()
    return dict(input_ids=torch.zeros(n, dtype=torch.long), positions=positions,
                context_lens=(positions + 1).int(), slots=torch.zeros(n, dtype=torch.long),
                block_tables=tables)


def _run(fn, logits, state, **bans):
    s = {k: v.clone().to(device) for k, v in state.items()}
    n = logits.shape[0]
    tokens = torch.empty(n, dtype=torch.long, device=device)
    logprobs = torch.empty(n, dtype=torch.float32, device=device)
    fn(logits.to(device), tokens, logprobs, s["input_ids"], s["positions"], s["context_lens"], s["slots"],
       s["block_tables"], BLOCK_SIZE, **{k: v.to(device) for k, v in bans.items()}, step=2 if bans else 0)
    return tokens, logprobs, s


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("n,vocab", ((1, 1000), (3, 5000), (5, 4097)))
def test_matches_twin(n, vocab, dtype):
    g = torch.Generator().manual_seed(vocab + n)
    logits = (4 * torch.randn(n, vocab, generator=g)).to(dtype)
    state = _state(n, 3, n)
    tokens, logprobs, s = _run(greedy_advance, logits, state)
    want_tokens, want_logprobs, want = _run(greedy_advance_ref, logits, state)
    assert tokens.tolist() == want_tokens.tolist() == logits.float().argmax(-1).tolist()
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
    for key in ("input_ids", "positions", "context_lens", "slots"):
        assert s[key].tolist() == want[key].tolist(), key
    assert s["input_ids"].tolist() == tokens.tolist()
    assert s["positions"].tolist() == (state["positions"] + 1).tolist()
    pos = state["positions"][0].item() + 1  # opens block 1 of row 0's table
    assert s["slots"][0].item() == state["block_tables"][0, pos // BLOCK_SIZE].item() * BLOCK_SIZE
    if n > 1:
        assert s["slots"][1].item() == -1


def test_ties_go_to_the_lowest_id():
    """Equal maxima in different chunks and inside one chunk: torch.argmax's first one wins."""
    logits = torch.zeros(2, 5000)
    logits[0, [4100, 2500, 300]] = 7.0
    logits[1, [2049, 2050]] = 3.0
    tokens, _, _ = _run(greedy_advance, logits, _state(2, 3, 0))
    assert tokens.tolist() == [300, 2049]


def test_bans_apply_while_rows_have_steps_left():
    """Row 0 still bans (ban_left 3 > step 2): its best id is skipped but counts in the logprob's
    normaliser; row 1 (ban_left 2) is free again and picks it."""
    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(1))
    logits[:, 2999] = 20.0
    logits[:, 7] = 19.0
    banned, ban_left = torch.tensor([2999, 5, 6]), torch.tensor([3, 2])
    tokens, logprobs, _ = _run(greedy_advance, logits, _state(2, 3, 0), banned=banned, ban_left=ban_left)
    want_tokens, want_logprobs, _ = _run(greedy_advance_ref, logits, _state(2, 3, 0), banned=banned,
                                         ban_left=ban_left)
    assert tokens.tolist() == want_tokens.tolist() == [7, 2999]
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-5)
    assert logprobs[0].item() == pytest.approx((19.0 - torch.logsumexp(logits[0], 0)).item(), abs=1e-4)


def test_wrapper_rejects_bad_inputs():
    logits = torch.randn(2, 100, device=device)
    s = _state(2, 3, 0)
    ok = dict(tokens=torch.empty(2, dtype=torch.long), logprobs=torch.empty(2),
              input_ids=s["input_ids"], positions=s["positions"], context_lens=s["context_lens"],
              slots=s["slots"], block_tables=s["block_tables"])
    ok = {k: v.to(device) for k, v in ok.items()}
    with pytest.raises(ValueError, match="contiguous \\[2\\]"):
        greedy_advance(logits, **{**ok, "context_lens": ok["context_lens"].long()}, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="block_tables"):
        greedy_advance(logits, **{**ok, "block_tables": ok["block_tables"].long()}, block_size=BLOCK_SIZE)
    with pytest.raises(ValueError, match="go together"):
        greedy_advance(logits, **ok, block_size=BLOCK_SIZE, banned=torch.tensor([1], device=device))


def test_compile_variants_leaves_its_inputs():
    """The start-up pass over the launch variants (one row and three, with and without banned ids, a
    lookahead's step rows 0-2) runs on throwaway outputs: the logits it reads are left as they were."""
    from tandem.kernels.greedy import compile_variants

    logits = torch.randn(3, 300, device=device).to(torch.float16)
    before = logits.clone()
    compile_variants(logits, BLOCK_SIZE)
    assert torch.equal(logits, before)


@pytest.mark.skipif(device == "cuda", reason="on a GPU the tests above compile and run every variant for real")
def test_ban_loop_compiles_for_hopper():
    """The banning variant (a loop over any number of banned ids) compiles for sm_90 at the 8B vocabulary's
    chunking, one-row (PDL) and many."""
    from tests.kernels.test_paged_decode_attention import compile_for_sm90

    launches = [("tandem.kernels.greedy", "_chunk_kernel",
                 dict(NUM_CHUNKS=63, CHUNK=2048, HAS_BANS=bans, PDL=pdl), dict(num_warps=4))
                for bans in (False, True) for pdl in (False, True)]
    assert len(compile_for_sm90(launches)) == 4
