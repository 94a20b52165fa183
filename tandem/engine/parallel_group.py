"""A tensor- and pipeline-parallel group: the engine's process is rank 0, and ranks 1..N-1 (N = tp x pp) are
worker processes it starts (rank_worker.py).

Rank 0 runs the whole engine (scheduler, sampler, KV bookkeeping); every rank holds its share of the
weights and of the KV cache: its stage's layers (pipeline.py), and within them its KV heads and MLP slice
(sharding.py). Before each forward pass rank 0 sends the step's inputs to the workers over their command connections;
every rank then runs the same pass, kept in lockstep by what flows inside it (torch.distributed, NCCL
between GPUs and gloo between CPU processes): the all-reduces within a stage, and the hidden states sent
from stage to stage and back to rank 0, which alone computes logits and samples.

A worker's lifecycle: started (by rank 0 on its host, by rank_worker.serve_host on the group's other hosts) ->
joins (connects to rank 0's listener, says its rank, gets its set-up) -> loads its share -> ready -> commands
until "stop" or until its connection closes (rank 0 is gone) -> exits. A worker that dies breaks the group for good: the next send, all-reduce or
transfer raises ParallelGroupError, which the engine's host treats as fatal (its requests fail, its health
check fails), since the weights and KV the dead rank held are gone with it.
"""
from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import secrets
import threading
import time
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from typing import Any

import torch
import torch.distributed as dist

from tandem.engine.pipeline import Placement

log = logging.getLogger("tandem.parallel")
TIMEOUT = datetime.timedelta(seconds=120)  # one collective's wait; idle ranks wait on their connection, not here


class ParallelGroupError(RuntimeError):
    """A rank of the group died or failed: the engine cannot go on."""

    fatal = True


def gpu_backend() -> str:
    """The collectives between a group's GPUs: NCCL, one GPU per rank. TANDEM_GROUP_BACKEND=gloo lets ranks share
    GPUs (every collective staged through host memory), slowly: it exists to run a
    group's code on CUDA where there are fewer GPUs than ranks (NCCL refuses two ranks on one GPU)."""
    backend = os.environ.get("TANDEM_GROUP_BACKEND", "nccl")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"TANDEM_GROUP_BACKEND={backend!r}: nccl or gloo")
    return backend


def rank_device(device: torch.device, rank: int) -> torch.device:
    if device.type != "cuda":
        return device
    return torch.device("cuda", rank % torch.cuda.device_count() if gpu_backend() == "gloo" else rank)


class Links:
    """One rank's process groups: the whole group's (sends between stages) and its stage's tensor-parallel
    one (all-reduces). Creating them blocks until every rank has."""

    def __init__(self, store: dist.Store, placement: Placement, device: torch.device) -> None:
        nccl = device.type == "cuda" and gpu_backend() == "nccl"
        self.staged = device.type == "cuda" and not nccl  # gloo sends only host tensors

        def join(prefix: str, rank: int, size: int):
            scoped = dist.PrefixStore(prefix, store)
            if nccl:
                return dist.ProcessGroupNCCL(scoped, rank, size)
            return dist.ProcessGroupGloo(scoped, rank, size, TIMEOUT)

        p = placement
        self.world = join("world", p.rank, p.tp * p.pp)
        self.stage = self.world if p.pp == 1 else join(f"stage{p.stage}", p.rank % p.tp, p.tp) if p.tp > 1 else None

    def all_reduce(self, tensor: torch.Tensor) -> None:
        host = tensor.cpu() if self.staged else tensor
        self._wait(lambda: self.stage.allreduce([host]), "all-reduce")
        if self.staged:
            tensor.copy_(host)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        host = tensor.cpu() if self.staged else tensor
        self._wait(lambda: self.world.send([host], dst, 0), f"send to rank {dst}")

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        host = torch.empty_like(tensor, device="cpu") if self.staged else tensor
        self._wait(lambda: self.world.recv([host], src, 0), f"receive from rank {src}")
        if self.staged:
            tensor.copy_(host)

    @staticmethod
    def _wait(start, what: str) -> None:
        try:
            start().wait()
        except RuntimeError as exc:
            raise ParallelGroupError(f"a parallel group's {what} failed (a rank died?): {exc}") from None


class ParallelGroup:
    """Rank 0's side: starts this host's other ranks, lets every rank join (this host's and, in a group spread
    over hosts, the others' too: rank_worker.serve_host), sends them commands, and holds rank 0's links."""

    def __init__(self, config, model_path: str, hf_config: dict, max_model_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        from tandem.engine.rank_worker import serve_rank

        self.tp, self.pp = config.tensor_parallel_size, config.pipeline_parallel_size
        self.size = self.tp * self.pp
        self.hf_config = hf_config  # the whole model's: each rank cuts its share of weights and adapters from it
        self.placements = [Placement(rank, self.tp, self.pp) for rank in range(self.size)]
        group = config.group
        local = self.size // group.size  # ranks on this host: 0 .. local - 1
        if device.type == "cuda" and torch.cuda.device_count() < local and gpu_backend() == "nccl":
            raise ValueError(f"{local} ranks on this host (tensor_parallel_size x pipeline_parallel_size = {self.size} "
                             f"over {group.size} hosts) need {local} GPUs; {torch.cuda.device_count()} are visible "
                             "(TANDEM_GROUP_BACKEND=gloo lets ranks share them, slowly)")
        # ranks that share rank 0's GPU (TANDEM_GROUP_BACKEND=gloo): each holds a KV cache of rank 0's size
        self.ranks_per_gpu = (-(-local // torch.cuda.device_count())
                              if device.type == "cuda" and gpu_backend() == "gloo" else 1)
        spread = group.size > 1
        bind = "0.0.0.0" if spread else "127.0.0.1"  # a group on one host stays on loopback, on free ports
        # the key a rank proves it knows before anything is unpickled from it: this group's own when its ranks are
        # this process's children, the deployment's when they come from other hosts
        secret = group_secret() if spread else secrets.token_bytes(32)
        self.store = dist.TCPStore(bind, group.port if spread else 0, self.size, True, timeout=TIMEOUT,
                                   wait_for_workers=False)
        listener = Listener((bind, group.port + 1 if spread else 0), authkey=secret)
        # CPU ranks share the cores: each gets its part of this process's threads, rank 0 too while the group
        # lives (more threads than cores make every collective wait for a time slice). Only a stage's ranks
        # compute at once (the others wait on a receive), so the cores are split over tp ranks, not tp x pp.
        threads = torch.get_num_threads()
        per_rank = max(1, threads // self.tp)
        restore = threads if device.type == "cpu" else None
        ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.Process] = {}  # this host's ranks (the others' are their hosts')
        self.conns: list = [None] * (self.size - 1)  # rank r's command connection at r - 1
        self._closer = weakref.finalize(self, _stop, self.procs, self.conns, restore)
        for rank in range(1, local):
            self.procs[rank] = ctx.Process(target=serve_rank, name=f"tandem-rank{rank}", daemon=True,
                                           args=(("127.0.0.1", listener.address[1]), secret, rank, rank))
            self.procs[rank].start()
        try:
            self._gather(listener, 600 if spread else 120)
        finally:
            listener.close()
        for rank, conn in enumerate(self.conns, start=1):
            conn.send((config, hf_config, max_model_len, device, dtype, self.placements[rank], self.store.port, per_rank))
        self._lock = threading.RLock()
        if restore:
            torch.set_num_threads(per_rank)
        self.links = Links(self.store, self.placements[0], device)

    def _gather(self, listener: Listener, seconds: float) -> None:
        """Every other rank's command connection, in rank order (each says its rank first)."""
        done = threading.Event()

        def accept() -> None:
            try:
                while not all(self.conns):
                    try:
                        conn = listener.accept()
                    except AuthenticationError:
                        continue  # not one of ours: a wrong TANDEM_GROUP_SECRET, or a stray connection
                    rank = conn.recv()
                    if isinstance(rank, int) and 0 < rank < self.size and self.conns[rank - 1] is None:
                        self.conns[rank - 1] = conn
                    else:
                        conn.close()
            except (OSError, EOFError):
                pass  # the listener closed: rank 0 gave up waiting
            done.set()

        threading.Thread(target=accept, name="tandem-group-join", daemon=True).start()
        deadline = time.monotonic() + seconds
        while not done.wait(0.1):
            for rank, proc in self.procs.items():
                if proc.exitcode is not None and self.conns[rank - 1] is None:
                    raise ParallelGroupError(self._death(rank))
            if time.monotonic() > deadline:
                missing = [r for r in range(1, self.size) if self.conns[r - 1] is None]
                raise ParallelGroupError(f"ranks {missing} of the parallel group did not join within {seconds:.0f} s")

    # rank 0's collectives: the links', with a failure naming the rank that is gone
    def all_reduce(self, tensor: torch.Tensor) -> None:
        self._named(self.links.all_reduce, tensor)

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self._named(self.links.send, tensor, dst)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        self._named(self.links.recv, tensor, src)

    def _named(self, op, *args) -> None:
        try:
            op(*args)
        except ParallelGroupError as exc:
            dead = self._dead_ranks()
            raise ParallelGroupError(f"{'; '.join(dead)} ({exc})" if dead else str(exc)) from None

    def _dead_ranks(self) -> list[str]:
        """What is known of ranks that are gone: a local one's exit, a remote one's closed connection."""
        out = []
        for rank, conn in enumerate(self.conns, start=1):
            proc = self.procs.get(rank)
            if proc is not None:
                proc.join(0.2)
                if proc.exitcode is not None:
                    out.append(self._death(rank))
                continue
            try:
                # a live rank sends nothing unasked; a dead one's closing connection may trail the failed
                # collective by a moment (its sockets close one by one as it exits)
                if conn.poll(1.0):
                    last = conn.recv()
                    out.append(f"rank {rank} of the parallel group (on another host) failed: {last[1]}")
            except (EOFError, OSError):
                out.append(f"rank {rank} of the parallel group (on another host) is gone: its connection closed")
        return out

    def wait_ready(self) -> list[Any]:
        """Blocks until every worker answered (its share loaded, or a `call`); their answers, rank 1 first.
        A worker's failure raises here, naming it."""
        answers = []
        for rank, conn in enumerate(self.conns, start=1):
            try:
                status, detail = conn.recv()
            except (EOFError, OSError):
                raise ParallelGroupError(self._death(rank)) from None
            if status != "ok":
                raise ParallelGroupError(f"rank {rank} of the parallel group failed: {detail}")
            answers.append(detail)
        return answers

    def command(self, command: str, *args: Any, reply: bool = False) -> None:
        """Every worker runs `command` next (without `reply`, none answers: the step's collectives are the
        rendezvous)."""
        self.send_each(command, [args] * len(self.conns), reply)

    def send_each(self, command: str, args_by_rank: list[tuple | None], reply: bool = False) -> None:
        """`command` to every worker, each with its own arguments (rank 1's first; None: not to that one)."""
        with self._lock:  # the engine thread and transfer threads (KV arriving) both send
            for rank, (conn, args) in enumerate(zip(self.conns, args_by_rank), start=1):
                proc = self.procs.get(rank)
                if proc is not None and proc.exitcode is not None:
                    raise ParallelGroupError(self._death(rank))
                if args is None:
                    continue
                try:
                    conn.send((command, args, reply))
                except (BrokenPipeError, OSError):
                    raise ParallelGroupError(self._death(rank)) from None

    def call(self, command: str, *args: Any) -> list[Any]:
        """`command`, then every worker's answer (set-up commands, whose failures must surface; KV reads)."""
        with self._lock:
            self.command(command, *args, reply=True)
            return self.wait_ready()

    def close(self) -> None:
        self._closer()

    def _death(self, rank: int) -> str:
        proc = self.procs.get(rank)
        if proc is None:
            return f"rank {rank} of the parallel group (on another host) is unreachable"
        proc.join(0.5)
        code = proc.exitcode
        how = "is still running but unreachable" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"rank {rank} of the parallel group (pid {proc.pid}) {how}"


def start_group(config, model_path: str, hf_config: dict, max_model_len: int, device: torch.device,
                dtype: torch.dtype) -> ParallelGroup | None:
    """With tensor or pipeline parallelism, the group (its other ranks starting); None for one process. A model
    that does not split so is refused here, before any process starts."""
    from tandem.engine.sharding import shard_problem

    if config.tensor_parallel_size * config.pipeline_parallel_size == 1:
        return None
    problem = shard_problem(hf_config, config.tensor_parallel_size)
    if problem:
        raise ValueError(problem)
    if config.pipeline_parallel_size > hf_config["num_hidden_layers"]:
        raise ValueError(f"pipeline_parallel_size={config.pipeline_parallel_size} is more stages than the "
                         f"model's {hf_config['num_hidden_layers']} layers")
    return ParallelGroup(config, model_path, hf_config, max_model_len, device, dtype)


def group_secret() -> bytes:
    """The key the ranks of a group spanning hosts prove they know before joining (multiprocessing's HMAC
    challenge): TANDEM_GROUP_SECRET, the same on every host (the operator puts a random one per model in a
    Secret). Required: without it anything that reaches the leader's command port could join the group,
    and what ranks send each other is unpickled."""
    value = os.environ.get("TANDEM_GROUP_SECRET")
    if not value:
        raise ValueError("a group spanning hosts needs TANDEM_GROUP_SECRET: the same secret on every host of "
                         "the group (the operator sets it from the model's <model>-group-key Secret)")
    return value.encode()


def _stop(procs: dict, conns: list, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    for conn in conns:
        try:
            if conn is not None:
                conn.send(("stop", (), False))
        except (BrokenPipeError, OSError):
            pass
    for proc in procs.values():
        proc.join(5)
        if proc.exitcode is None:
            proc.kill()
            proc.join(5)
