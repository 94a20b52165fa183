"""Tandem's internal APIs: the .proto sources in this folder and the modules `make proto` generates
from them (`common_pb2`, `router_pb2`, `decode_pb2`, `prefill_pb2`, `kvstore_pb2` and their `_grpc`
twins)."""
