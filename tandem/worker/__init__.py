"""What prefill and decode workers share: reporting their state to routers (heartbeats with the
prefix cache's change log), their HTTP side (/health, /metrics), KV-transfer metrics, and the
process that runs a gRPC server, an HTTP server and an engine thread together."""
