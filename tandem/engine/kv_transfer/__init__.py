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

The engine keeps the KV of a prompt's last token out of every transfer: decode computes that one
token itself, so it samples the first output token with its own sampler (seeds, n, logprobs and
penalties behave exactly as in a colocated engine).
"""
