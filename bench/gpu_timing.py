"""Device time of a launch sequence with no host in the way: captured once in a CUDA graph, replayed."""
from __future__ import annotations

from typing import Callable

import torch


def graph_us(fn: Callable[[int], object], variants: int, rounds: int = 2, replays: int = 5) -> float:
    """Microseconds per call of fn(i): the graph calls fn(0..variants-1) `rounds` times over (each i may
    touch its own copy of the data, so that L2 holds none of it), after one eager warm-up pass."""
    for i in range(variants):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(rounds * variants):
            fn(i % variants)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / (rounds * variants)
