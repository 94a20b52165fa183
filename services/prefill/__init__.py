"""The prefill worker (`tandem prefill`): computes prompts' KV caches and writes them, layer by
layer as they are computed, into leased blocks of decode workers over gRPC."""
