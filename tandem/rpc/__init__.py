"""What the services share on the wire: gRPC channel and server settings, conversions between
engine objects and `tandem.proto` messages, and the token stream's two ends (decode turns
cumulative outputs into deltas, the router turns deltas back into cumulative outputs)."""
