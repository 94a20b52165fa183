#!/usr/bin/env python3
"""The KV transport alone, with no forward pass competing for the cores: a real `tandem decode`
worker grants a lease for a ~N-token prompt, this process writes the lease's KV (random bytes in
the worker's layout) with the prefill worker's sender, and reports GB/s (see bench/README.md).
`--transport grpc` streams the bytes over gRPC; `shm` (default) stages them in the lease's
shared-memory area with gRPC for control (as two workers on one host do); `nixl` WRITEs them through NIXL
into decode's registered staging buffer, gRPC for control (UCX_TLS=shm,self,tcp UCX_NET_DEVICES=lo here)."""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

from tandem.engine.kv_transfer import codec
from tandem.engine.kv_transfer.codec import KVChunkData
from tandem.engine.sampler import Sample
from tandem.prefill.sender import GrpcKVSender
from tandem.proto import decode_pb2, decode_pb2_grpc, router_pb2, router_pb2_grpc
from tandem.rpc.convert import layout_from_proto, params_to_proto
from tandem.rpc.grpc_util import CHANNEL_OPTIONS, keep_bulk_buffers_mapped
from tandem.sampling_params import SamplingParams
from tandem.worker.process import free_port


async def one(address: str, tokens: int, chunk_bytes: int, window: int, seed: int,
              transport: str = "shm", one_layer: bool = False) -> tuple[float, object]:
    channel = grpc.aio.insecure_channel(address)
    stub = decode_pb2_grpc.DecodeStub(channel)
    state = await router_pb2_grpc.WorkerStub(channel).GetState(router_pb2.StateRequest())
    layout = layout_from_proto(state.info.layout)
    prompt = torch.randint(3, 40000, (tokens,), generator=torch.Generator().manual_seed(seed)).tolist()
    call = stub.Generate(decode_pb2.GenerateRequest(
        request_id=f"bench-{seed}", prompt_token_ids=prompt, prefill=decode_pb2.REMOTE, lease_seconds=60,
        params=params_to_proto(SamplingParams(max_tokens=1, temperature=0))))
    ticket = (await call.read()).ticket
    sync_channel = grpc.insecure_channel(ticket.endpoint, options=CHANNEL_OPTIONS)
    sender = GrpcKVSender(sync_channel, ticket, state.info.layout, "bench", window=window,
                          shm=transport != "grpc", token_bytes=layout.token_bytes)
    tb, n = layout.token_bytes, ticket.num_tokens - ticket.skip_tokens
    # views of one buffer, so only the transport copies; layers grouped as a step's KV after its forward
    # pass is (KVProducer.save_step), or one layer a chunk as during it (--one-layer)
    group = 1 if one_layer else max(1, chunk_bytes // (n * tb))
    data = memoryview(os.urandom(tb * n * group))
    started = time.perf_counter()
    run = asyncio.get_running_loop().run_in_executor(None, sender.run)
    for first in range(0, layout.num_layers, group):
        k = min(group, layout.num_layers - first)
        for a, b in codec.split(ticket.skip_tokens, ticket.num_tokens, tb, chunk_bytes):
            sender.put(KVChunkData(first, a, b - a, data[:(b - a) * tb * k], num_layers=k))
    sender.finish(Sample(prompt[-1], 0.0, None))  # the lease wants every token's KV and the first output token
    stats = await run
    wall = time.perf_counter() - started
    while await call.read() is not grpc.aio.EOF:  # decode admits the request and finishes it
        pass
    await channel.close()
    sync_channel.close()
    return wall, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="HF folder or .gguf (default: the embedded SmolLM2)")
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--chunk-bytes", type=int, default=codec.DEFAULT_CHUNK_BYTES)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--transport", choices=["shm", "grpc", "nixl"], default="shm",
                   help="shm: bytes staged in shared memory, gRPC for control (default); nixl: staged through "
                        "NIXL; grpc: bytes over gRPC")
    p.add_argument("--one-layer", action="store_true",
                   help="a chunk per layer (as when KV leaves during the forward pass); default: layers grouped "
                        "up to --chunk-bytes (as after it)")
    args = p.parse_args()
    keep_bulk_buffers_mapped()  # as the workers do
    port = free_port()
    env = {**os.environ, "TANDEM_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(args.threads)}
    cmd = [str(Path(sys.executable).with_name("tandem")), "decode", *([args.model] if args.model else []),
           "--host", "127.0.0.1", "--port", str(port), "--kv-cache-gib", "1", "--num-threads", str(args.threads),
           "--kv-transport", "auto" if args.transport == "shm" else args.transport]
    proc = subprocess.Popen(cmd, cwd=tempfile.gettempdir(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("TANDEM_READY"):
                break
        address = f"127.0.0.1:{port}"
        results = [asyncio.run(one(address, args.tokens, args.chunk_bytes, args.window, i, args.transport,
                                   args.one_layer))
                   for i in range(args.repeats + 1)][1:]  # the first one warms up
        walls = [w for w, _ in results]
        mb = results[0][1].bytes / 1e6
        assert all(s.transport == args.transport for _, s in results), [s.transport for _, s in results]
        grouping = "one layer each" if args.one_layer else "layers grouped"
        print(f"transport {args.transport}: {args.tokens}-token prompt, {mb:.1f} MB in {results[0][1].chunks} "
              f"messages (chunks of <= {args.chunk_bytes} B, {grouping}), window {args.window}: "
              f"median {statistics.median(walls) * 1e3:.1f} ms open-to-complete = "
              f"{mb / 1e3 / statistics.median(walls):.2f} GB/s; wire-time GB/s median "
              f"{statistics.median(s.gbps for _, s in results):.2f}; handshake "
              f"{statistics.median(s.handshake_s for _, s in results) * 1e3:.2f} ms")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
