"""The decode worker (`tandem decode`): the paged-attention engine with continuous batching over
requests prefilled elsewhere (their KV arrives into leased blocks) and requests it prefills
itself, streaming tokens back to the router over gRPC."""
