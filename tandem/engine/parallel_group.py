"""A tensor- and pipeline-parallel group: the engine's process is rank 0, and ranks 1..N-1 (N = tp x pp) are
worker processes it starts (rank_worker.py).

Rank 0 runs the whole engine (scheduler, sampler, KV bookkeeping); every rank holds its share of the
weights and of the KV cache: its stage's layers (pipeline.py), and within them its KV heads and MLP slice
(sharding.py). Before each forward pass rank 0 sends the step's inputs to the workers over their pipes;
every rank then runs the same pass, kept in lockstep by what flows inside it (torch.distributed, NCCL
between GPUs and gloo between CPU processes): the all-reduces within a stage, and the hidden states sent
from stage to stage and back to rank 0, which alone computes logits and samples.

A worker's lifecycle: started -> (loads its share) ready -> commands until "stop" or until its pipe closes
(rank 0 is gone) -> exits. A worker that dies breaks the group for good: the next send, all-reduce or
transfer raises ParallelGroupError, which the engine's host treats as fatal (its requests fail, its health
check fails), since the weights and KV the dead rank held are gone with it.
"""
from __future__ import annotations

import datetime
import multiprocessing
import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

from tandem.engine.pipeline import Placement

TIMEOUT = datetime.timedelta(seconds=120)  # one collective's wait; idle ranks wait on their pipe, not here


class ParallelGroupError(RuntimeError):
    """A rank of the group died or failed: the engine cannot go on."""

    fatal = True


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class Links:
    """One rank's process groups: the whole group's (sends between stages) and its stage's tensor-parallel
    one (all-reduces). Creating them blocks until every rank has."""

    def __init__(self, store: dist.Store, placement: Placement, device: torch.device) -> None:
        def join(prefix: str, rank: int, size: int):
            scoped = dist.PrefixStore(prefix, store)
            if device.type == "cuda":
                return dist.ProcessGroupNCCL(scoped, rank, size)
            return dist.ProcessGroupGloo(scoped, rank, size, TIMEOUT)

        p = placement
        self.world = join("world", p.rank, p.tp * p.pp)
        self.stage = self.world if p.pp == 1 else join(f"stage{p.stage}", p.rank % p.tp, p.tp) if p.tp > 1 else None

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._wait(lambda: self.stage.allreduce([tensor]), "all-reduce")

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._wait(lambda: self.world.send([tensor], dst, 0), f"send to rank {dst}")

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._wait(lambda: self.world.recv([tensor], src, 0), f"receive from rank {src}")

    @staticmethod
    def _wait(start, what: str) -> None:
        try:
            start().wait()
        except RuntimeError as exc:
            raise ParallelGroupError(f"a parallel group's {what} failed (a rank died?): {exc}") from None


class ParallelGroup:
    """Rank 0's side: starts the workers, sends them commands, and holds rank 0's links."""

    def __init__(self, config, model_path: str, hf_config: dict, max_model_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        from tandem.engine.rank_worker import serve_rank

        self.tp, self.pp = config.tensor_parallel_size, config.pipeline_parallel_size
        self.size = self.tp * self.pp
        self.hf_config = hf_config  # the whole model's: each rank cuts its share of weights and adapters from it
        self.placements = [Placement(rank, self.tp, self.pp) for rank in range(self.size)]
        if device.type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {self.size} needs {self.size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        # rank 0 binds the store on a free port first, so the workers can be told where it is
        self.store = dist.TCPStore("127.0.0.1", 0, self.size, True, timeout=TIMEOUT, wait_for_workers=False)
        # CPU ranks share the cores: each gets its part of this process's threads, rank 0 too while the group
        # lives (more threads than cores make every collective wait for a time slice). Only a stage's ranks
        # compute at once (the others wait on a receive), so the cores are split over tp ranks, not tp x pp.
        threads = torch.get_num_threads()
        per_rank = max(1, threads // self.tp)
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.pipes = [], []
        for rank in range(1, self.size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=serve_rank, name=f"tandem-rank{rank}", daemon=True,
                               args=(config, model_path, hf_config, max_model_len, device, dtype,
                                     self.placements[rank], self.store.port,
                                     per_rank, theirs))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.pipes.append(mine)
        self._lock = threading.RLock()
        self.links = Links(self.store, self.placements[0], device)
        restore = threads if device.type == "cpu" else None
        if restore:
            torch.set_num_threads(per_rank)
        self._closer = weakref.finalize(self, _stop, self.procs, self.pipes, restore)

    def all_reduce(self, tensor: torch.Tensor) -> None:
        self.links.all_reduce(tensor)

    def wait_ready(self) -> list[Any]:
        """Blocks until every worker answered (its share loaded, or a `call`); their answers, rank 1 first.
        A worker's failure raises here, naming it."""
        answers = []
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                status, detail = pipe.recv()
            except (EOFError, OSError):
                raise ParallelGroupError(self._death(rank)) from None
            if status != "ok":
                raise ParallelGroupError(f"rank {rank} of the parallel group failed: {detail}")
            answers.append(detail)
        return answers

    def send(self, command: str, *args: Any, reply: bool = False) -> None:
        """Every worker runs `command` next (without `reply`, none answers: the step's collectives are the
        rendezvous)."""
        self.send_each(command, [args] * len(self.pipes), reply)

    def send_each(self, command: str, args_by_rank: list[tuple | None], reply: bool = False) -> None:
        """`command` to every worker, each with its own arguments (rank 1's first; None: not to that one)."""
        with self._lock:  # the engine thread and transfer threads (KV arriving) both send
            for rank, (proc, pipe, args) in enumerate(zip(self.procs, self.pipes, args_by_rank), start=1):
                if proc.exitcode is not None:
                    raise ParallelGroupError(self._death(rank))
                if args is None:
                    continue
                try:
                    pipe.send((command, args, reply))
                except (BrokenPipeError, OSError):
                    raise ParallelGroupError(self._death(rank)) from None

    def call(self, command: str, *args: Any) -> list[Any]:
        """`send`, then every worker's answer (set-up commands, whose failures must surface; KV reads)."""
        with self._lock:
            self.send(command, *args, reply=True)
            return self.wait_ready()

    def close(self) -> None:
        self._closer()

    def _death(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        proc.join(0.5)
        code = proc.exitcode
        how = "is still running but unreachable" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"rank {rank} of the parallel group (pid {proc.pid}) {how}"


def _stop(procs, pipes, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    for pipe in pipes:
        try:
            pipe.send(("stop", (), False))
        except (BrokenPipeError, OSError):
            pass
    for proc in procs:
        proc.join(5)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)
