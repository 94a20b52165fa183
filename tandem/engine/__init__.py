"""The engine: model, paged KV cache, scheduler, sampler, one schedule -> execute -> update loop."""
