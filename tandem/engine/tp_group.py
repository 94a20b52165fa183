"""A tensor-parallel group: the engine's process is rank 0, and ranks 1..N-1 are worker processes it starts.

Rank 0 runs the whole engine (scheduler, sampler, KV bookkeeping); every rank holds its shard of the
weights (sharding.py) and of the KV cache (its KV heads, every block). Before each forward pass rank 0
sends the step's inputs to the workers over a pipe; every rank then runs the same pass, and the
all-reduces inside it (torch.distributed: gloo on CPUs, NCCL on GPUs) keep them in lockstep. Only rank 0
computes logits and samples: after the last all-reduce every rank holds the same hidden states.

A worker's lifecycle: started -> (loads its shard) ready -> commands until "stop" or until its pipe
closes (rank 0 is gone) -> exits. A worker that dies breaks the group for good: the next send or
all-reduce raises ParallelGroupError, which the engine's host treats as fatal (its requests fail, its
health check fails), since the weights and KV the dead rank held are gone with it.
"""
from __future__ import annotations

import datetime
from functools import partial
import logging
import multiprocessing
import signal
import threading
import traceback
import weakref
from typing import Any

import torch
import torch.distributed as dist

from tandem.engine.kv_transfer import codec

log = logging.getLogger("tandem.tp")
_TIMEOUT = datetime.timedelta(seconds=120)  # one collective's wait; idle ranks wait on their pipe, not here


class ParallelGroupError(RuntimeError):
    """A rank of the tensor-parallel group died or failed: the engine cannot go on."""

    fatal = True


def _process_group(store: dist.Store, rank: int, size: int, device: torch.device):
    """Joins the group (blocks until every rank has): NCCL between GPUs, gloo between CPU processes."""
    if device.type == "cuda":
        return dist.ProcessGroupNCCL(store, rank, size)
    return dist.ProcessGroupGloo(store, rank, size, _TIMEOUT)


def rank_device(device: torch.device, rank: int) -> torch.device:
    return torch.device("cuda", rank) if device.type == "cuda" else device


class TPGroup:
    """Rank 0's side: starts the workers, sends them commands, all-reduces with them."""

    def __init__(self, config, model_path: str, hf_config: dict, max_model_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.size = config.tensor_parallel_size
        self.hf_config = hf_config  # the whole model's: each rank cuts its share of weights and adapters from it
        if device.type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(f"tensor_parallel_size={self.size} needs {self.size} GPUs; "
                             f"{torch.cuda.device_count()} are visible")
        # rank 0 binds the store on a free port first, so the workers can be told where it is
        self.store = dist.TCPStore("127.0.0.1", 0, self.size, True, timeout=_TIMEOUT, wait_for_workers=False)
        ctx = multiprocessing.get_context("spawn")
        self.procs, self.pipes = [], []
        for rank in range(1, self.size):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=serve_rank, name=f"tandem-tp{rank}", daemon=True,
                               args=(config, model_path, hf_config, max_model_len, device, dtype, rank, self.store.port,
                                     max(1, torch.get_num_threads() // self.size), theirs))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.pipes.append(mine)
        self._lock = threading.RLock()
        self.pg = _process_group(self.store, 0, self.size, device)
        self._closer = weakref.finalize(self, _stop, self.procs, self.pipes)

    def wait_ready(self) -> list[Any]:
        """Blocks until every worker answered (its shard loaded, or a `call`); their answers, rank 1 first.
        A worker's failure raises here, naming it."""
        answers = []
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                status, detail = pipe.recv()
            except (EOFError, OSError):
                raise ParallelGroupError(self._death(rank)) from None
            if status != "ok":
                raise ParallelGroupError(f"tensor-parallel rank {rank} failed: {detail}")
            answers.append(detail)
        return answers

    def send(self, command: str, *args: Any, reply: bool = False) -> None:
        """Every worker runs `command` next (without `reply`, none answers: the step's all-reduces are the
        rendezvous)."""
        self.send_each(command, [args] * len(self.pipes), reply)

    def send_each(self, command: str, args_by_rank: list[tuple], reply: bool = False) -> None:
        """`command` to every worker, each with its own arguments (rank 1's first)."""
        with self._lock:  # the engine thread and transfer threads (KV arriving) both send
            for rank, (proc, pipe, args) in enumerate(zip(self.procs, self.pipes, args_by_rank), start=1):
                if proc.exitcode is not None:
                    raise ParallelGroupError(self._death(rank))
                try:
                    pipe.send((command, args, reply))
                except (BrokenPipeError, OSError):
                    raise ParallelGroupError(self._death(rank)) from None

    def call(self, command: str, *args: Any) -> list[Any]:
        """`send`, then every worker's answer (set-up commands, whose failures must surface; KV reads)."""
        with self._lock:
            self.send(command, *args, reply=True)
            return self.wait_ready()

    def all_reduce(self, tensor: torch.Tensor) -> None:
        try:
            self.pg.allreduce([tensor]).wait()
        except RuntimeError as exc:
            raise ParallelGroupError(f"a tensor-parallel all-reduce failed (a rank died?): {exc}") from None

    def close(self) -> None:
        self._closer()

    def _death(self, rank: int) -> str:
        proc = self.procs[rank - 1]
        proc.join(0.5)
        code = proc.exitcode
        how = "is still running but unreachable" if code is None else (
            f"was killed by signal {-code}" if code < 0 else f"exited with status {code}")
        return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}"


class GroupCaches:
    """The group's KV cache as transfers and the KV store see it (codec.LocalCaches' two methods): every KV
    head, rank 0's from its own cache, the others' asked for over their pipes (between forward passes:
    a worker reads its pipe only then). With KV heads replicated over ranks, each is read from its first."""

    def __init__(self, local: list[torch.Tensor], group: TPGroup, num_kv_heads: int) -> None:
        from tandem.engine.sharding import Shard

        self.local, self.group = local, group
        self.num_layers, self.num_kv_heads = len(local), num_kv_heads
        self.spans = [Shard(rank, group.size).kv_span(num_kv_heads) for rank in range(group.size)]
        self.readers = [r for r, (lo, _) in enumerate(self.spans) if r == 0 or lo >= self.spans[r - 1][1]]

    def encode(self, layers: range, slots: torch.Tensor) -> memoryview:
        answers = [codec.encode(self.local[layers.start:layers.stop], slots)]
        answers += self.group.call("kv_read", layers, slots.numpy())
        _, _, _, _, dim = self.local[0].shape
        parts = [torch.frombuffer(answers[r], dtype=self.local[0].dtype).view(len(layers), 2, len(slots), -1, dim)
                 for r in self.readers]
        whole = torch.cat(parts, dim=3)
        return memoryview(whole.view(torch.uint8).numpy().reshape(-1))

    def decode_into(self, layer: int, slots: torch.Tensor, data: bytes | memoryview) -> None:
        whole = torch.frombuffer(data, dtype=self.local[0].dtype).view(2, len(slots), self.num_kv_heads, -1)
        shares = [whole[:, :, lo:hi].contiguous() for lo, hi in self.spans]
        self.group.send_each("kv_write", [(layer, slots.numpy(), share.view(torch.uint8).numpy().tobytes())
                                          for share in shares[1:]])
        codec.decode_into(self.local[layer], slots, memoryview(shares[0].view(torch.uint8).numpy().reshape(-1)))


def _stop(procs, pipes) -> None:
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


def serve_rank(config, model_path: str, hf_config: dict, max_model_len: int, device: torch.device,
               dtype: torch.dtype, rank: int, store_port: int, threads: int, pipe) -> None:
    """A worker rank's whole life: join the group, load its shard, then run rank 0's commands."""
    from tandem.engine import loader
    from tandem.engine.lora import LoRALayers, load_adapter
    from tandem.engine.model_runner import ModelRunner
    from tandem.engine.models import model_class
    from tandem.engine.sharding import Shard, shard_lora

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    torch.set_num_threads(threads)
    device = rank_device(device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", store_port, config.tensor_parallel_size, False, timeout=_TIMEOUT)
    pg = _process_group(store, rank, config.tensor_parallel_size, device)

    def all_reduce(tensor: torch.Tensor) -> None:
        pg.allreduce([tensor]).wait()

    runner: ModelRunner | None = None
    adapters = {}  # name -> this rank's share of a LoRA adapter
    shard = Shard(rank, config.tensor_parallel_size)
    try:
        model = loader.build_model(model_class(hf_config), hf_config, model_path, max_model_len, device,
                                   dtype, config.load_format, shard, all_reduce)
        pipe.send(("ok", None))
        while True:
            try:
                command, args, reply = pipe.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone
            if command == "stop":
                return
            answer = None
            with torch.inference_mode():
                if command == "runner":
                    runner = ModelRunner(model, *args, dtype, device)
                elif command == "pack":
                    model.pack_weights()
                elif command == "profile":
                    ModelRunner.profile_activations(model, *args, dtype, device)
                elif command == "loras":  # rank 0's _set_loras: its adapters, in its order (a step names them by index)
                    adapters = {name: adapters.get(name) or load_adapter(
                        name, path, model.shape, dtype, device, config.max_lora_rank,
                        partial(shard_lora, config=hf_config, shard=shard)) for name, path in args[0]}
                    layers = LoRALayers(model, list(adapters.values()))  # also detaches the ones dropped
                    runner.loras = layers if adapters else None
                elif command == "kv_read":  # GroupCaches.encode: this rank's heads
                    layers, slots = args
                    answer = bytes(codec.encode(runner.kv_caches[layers.start:layers.stop], torch.from_numpy(slots)))
                elif command == "kv_write":  # GroupCaches.decode_into: this rank's share
                    layer, slots, data = args
                    codec.decode_into(runner.kv_caches[layer], torch.from_numpy(slots), data)
                else:  # forward, copy, compile: the runner's own methods, as rank 0 runs them
                    getattr(runner, {"forward": "forward_eager", "copy": "_copy_blocks",
                                     "compile": "compile_prompt_kernels"}[command])(*args)
            if reply:
                pipe.send(("ok", answer))
    except BaseException as exc:  # noqa: BLE001 - rank 0 must hear why, then this rank is gone
        log.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        try:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        except (BrokenPipeError, OSError):
            pass
        raise SystemExit(1) from None
