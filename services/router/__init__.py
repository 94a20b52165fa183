"""The router (`tandem router`): the OpenAI-compatible gateway in front of prefill and decode
pools. Workers register and heartbeat over gRPC; plugins pick the workers of each request; the
same OpenAI application as `tandem serve` runs over a remote engine client."""
