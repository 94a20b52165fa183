"""KV transfer between engines: one connector, two roles, transports behind them.

- `layout`: what a worker's KV cache looks like and the compatibility hash peers compare.
- `producer.KVProducer` (prefill's role): the scheduler side plans, per step, which prompt tokens'
  KV each transfer still needs; the worker side, called by attention after each layer's cache
  write, copies those tokens' K and V out as chunks and hands them to the request's sink (a
  transport), so the transfer overlaps the rest of the forward pass.
- `consumer.KVConsumer` (decode's role): the scheduler side reserves blocks for a prompt under a
  lease with a deadline and admits the request once its KV is complete; the worker side writes
  chunks a transport received into the leased blocks, refusing any that arrive after the lease
  ended.
- `codec`: chunk bytes and checksums, shared by both sides.

For a single sequence (n = 1, not resumed) the transfer carries the KV of every prompt token and
the first output token, which prefill samples with the request's parameters (the same sampler, so
seeds, penalties and logprobs match a colocated engine) and decode emits as soon as the KV is in:
the first token waits for no forward pass on decode (../shared/DESIGN.md, step 4). For n > 1 and
resumed sequences the transfer leaves the last prompt token out; decode computes it and samples
(it forks the sequences and knows a resumed one's output so far).
"""

# The largest chunk, by default. 4 MiB: gRPC's cost per message (~0.3 ms in Python here) made 1 MiB
# chunks 20-30% slower on loopback (bench/kv_transport.py); one 1,000-token layer of an 8B model
# (GQA, bf16) is 4 MB. Here, not in codec, so that processes that only parse flags skip torch.
DEFAULT_CHUNK_BYTES = 4 << 20
