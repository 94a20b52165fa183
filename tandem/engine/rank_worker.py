"""A worker rank of a parallel group (parallel_group.py): its process's whole life. It joins the group, loads
its share of the model (its stage's layers, its shard of them), then runs rank 0's commands in order: set-up
(runner, pack, profile, compile), forward passes, block copies, LoRA adapter sets, and its part of KV reads
and writes (group_caches.py)."""
from __future__ import annotations

import logging
import signal
import time
import traceback
from functools import partial
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import torch
import torch.distributed as dist

from tandem.engine.kv_transfer import codec
from tandem.engine.parallel_group import TIMEOUT, Links, group_secret, rank_device
from tandem.engine.pipeline import Pipeline

log = logging.getLogger("tandem.parallel")


def serve_rank(leader: tuple[str, int], secret: bytes, rank: int, local_index: int) -> None:
    """Rank `rank`: joins rank 0 at `leader` (its command listener), gets its set-up, loads its share of the
    model on this host's device `local_index`, then runs rank 0's commands until told to stop."""
    from tandem.engine import loader
    from tandem.engine.lora import LoRALayers, load_adapter
    from tandem.engine.model_runner import ModelRunner
    from tandem.engine.models import model_class
    from tandem.engine.sharding import shard_lora

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    _die_with_parent()
    conn = _join(leader, secret, rank)
    config, hf_config, max_model_len, device, dtype, placement, store_port, threads = conn.recv()
    model_path = loader.resolve_model(config.model)  # this host's copy (a GGUF converts into its own cache)
    torch.set_num_threads(threads)
    device = rank_device(device, local_index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore(leader[0], store_port, placement.tp * placement.pp, False, timeout=TIMEOUT)
    links = Links(store, placement, device)
    pipeline = Pipeline(placement, links, hf_config["num_hidden_layers"]) if placement.pp > 1 else None
    runner: ModelRunner | None = None
    adapters = {}  # name -> this rank's share of a LoRA adapter
    try:
        model = loader.build_model(model_class(hf_config), hf_config, model_path, max_model_len, device, dtype,
                                   config.load_format, placement.shard, links.all_reduce,
                                   pipeline.layers if pipeline else None)
        conn.send(("ok", None))
        while True:
            try:
                command, args, reply = conn.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone
            if command == "stop":
                return
            answer = None
            with torch.inference_mode():
                if command == "runner":
                    runner = ModelRunner(model, *args, dtype, device, pipeline)
                elif command == "pack":
                    model.pack_weights()
                elif command == "profile":
                    ModelRunner.profile_activations(model, *args, dtype, device, pipeline)
                elif command == "loras":  # rank 0's _set_loras: its adapters, in its order (a step names them by index)
                    cut = partial(shard_lora, config=hf_config, shard=placement.shard) if placement.shard else None
                    adapters = {name: adapters.get(name) or load_adapter(
                        name, path, model.shape, dtype, device, config.max_lora_rank, cut) for name, path in args[0]}
                    layers = LoRALayers(model, list(adapters.values()))  # also detaches the ones dropped
                    runner.loras = layers if adapters else None
                elif command == "kv_read":  # GroupCaches.encode: this rank's heads of the layers it holds
                    layers, slots = args
                    mine = [runner.kv_caches[i] for i in runner.kv_layers if i in layers]
                    answer = bytes(codec.encode(mine, torch.from_numpy(slots))) if mine else b""
                elif command == "kv_write":  # GroupCaches.decode_into: this rank's share
                    layer, slots, data = args
                    codec.decode_into(runner.kv_caches[layer], torch.from_numpy(slots), data)
                else:  # forward, copy, compile: the runner's own methods, as rank 0 runs them
                    getattr(runner, {"forward": "forward_eager", "copy": "_copy_blocks",
                                     "compile": "compile_prompt_kernels"}[command])(*args)
            if reply:
                conn.send(("ok", answer))
    except BaseException as exc:  # noqa: BLE001 - rank 0 must hear why, then this rank is gone
        log.error("rank %d of the parallel group failed:\n%s", rank, traceback.format_exc())
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except (BrokenPipeError, OSError):
            pass
        raise SystemExit(1) from None


def _die_with_parent() -> None:
    """Linux: SIGKILL this rank when the process that started it dies (a host's ranks must not outlive it, and
    rank 0's would only notice at their next command)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _join(leader: tuple[str, int], secret: bytes, rank: int, seconds: float = 600):
    """The command connection to rank 0, retried while it is not listening yet (another host's ranks may start
    first); it is told this rank's number."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            conn = Client(leader, authkey=secret)
            break
        except AuthenticationError:
            raise SystemExit(f"rank {rank} cannot join the parallel group at {leader[0]}:{leader[1]}: the leader "
                             "refused its key (TANDEM_GROUP_SECRET differs between the group's hosts)") from None
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    conn.send(rank)
    return conn


def serve_host(group, world: int, http_port: int | None = None) -> int:
    """A group's host other than the leader's (`group`: config.GroupConfig, index > 0): starts its ranks, which
    join rank 0 on the leader, and answers /health (200 while every one of them runs) for its pod's probes.
    Returns when one of them exits: 0 when rank 0 stopped the group, else 1 (the group is broken, and restarting
    this host's pod, which the operator does to the whole group, is the way back); on SIGTERM, 0."""
    import http.server
    import multiprocessing
    import threading

    per_host = world // group.size
    first = group.index * per_host
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=serve_rank, name=f"tandem-rank{first + i}", daemon=True,
                         args=((group.leader, group.port + 1), group_secret(), first + i, i)) for i in range(per_host)]
    for proc in procs:
        proc.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            alive = all(p.exitcode is None for p in procs)
            self.send_response(503 if not alive else 200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = None
    if http_port:
        server = http.server.ThreadingHTTPServer(("0.0.0.0", http_port), Health)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    log.info("host %d of the group: ranks %d-%d joining rank 0 at %s:%d", group.index, first, first + per_host - 1,
             group.leader, group.port + 1)
    try:
        while not stop.wait(0.5):
            dead = [p for p in procs if p.exitcode is not None]
            if dead and dead[0].exitcode == 0:  # rank 0 told its ranks to stop: the group ended
                return 0
            if dead:
                log.error("%s exited with status %s: this host's part of the group is gone", dead[0].name,
                          dead[0].exitcode)
                return 1
        return 0
    finally:
        if server is not None:
            server.shutdown()
        for proc in procs:
            proc.kill()
            proc.join(5)
