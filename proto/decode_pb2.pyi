from tandem.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PrefillMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOCAL: _ClassVar[PrefillMode]
    REMOTE: _ClassVar[PrefillMode]

class LeaseAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREFILL_LOCALLY: _ClassVar[LeaseAction]
    RELEASE: _ClassVar[LeaseAction]
LOCAL: PrefillMode
REMOTE: PrefillMode
PREFILL_LOCALLY: LeaseAction
RELEASE: LeaseAction

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "params", "priority", "prefill", "lease_seconds", "resume_token_ids", "seed_index")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREFILL_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESUME_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_INDEX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: _common_pb2.SamplingParams
    priority: int
    prefill: PrefillMode
    lease_seconds: float
    resume_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed_index: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., prefill: _Optional[_Union[PrefillMode, str]] = ..., lease_seconds: _Optional[float] = ..., resume_token_ids: _Optional[_Iterable[int]] = ..., seed_index: _Optional[int] = ...) -> None: ...

class LogprobEntry(_message.Message):
    __slots__ = ("token_id", "logprob", "rank")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    rank: int
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., rank: _Optional[int] = ...) -> None: ...

class TokenLogprobs(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[LogprobEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[LogprobEntry, _Mapping]]] = ...) -> None: ...

class SeqDelta(_message.Message):
    __slots__ = ("index", "token_start", "token_ids", "logprobs", "text_start", "text", "cumulative_logprob", "finish_reason", "stop_str", "stop_token")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TEXT_START_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STR_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_start: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    text_start: int
    text: str
    cumulative_logprob: float
    finish_reason: str
    stop_str: str
    stop_token: int
    def __init__(self, index: _Optional[int] = ..., token_start: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., text_start: _Optional[int] = ..., text: _Optional[str] = ..., cumulative_logprob: _Optional[float] = ..., finish_reason: _Optional[str] = ..., stop_str: _Optional[str] = ..., stop_token: _Optional[int] = ...) -> None: ...

class RequestMetrics(_message.Message):
    __slots__ = ("queue_s", "num_cached_tokens", "num_preemptions")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    num_cached_tokens: int
    num_preemptions: int
    def __init__(self, queue_s: _Optional[float] = ..., num_cached_tokens: _Optional[int] = ..., num_preemptions: _Optional[int] = ...) -> None: ...

class TokenUpdate(_message.Message):
    __slots__ = ("seqs", "finished", "prompt_logprobs", "metrics")
    SEQS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    seqs: _containers.RepeatedCompositeFieldContainer[SeqDelta]
    finished: bool
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprobs]
    metrics: RequestMetrics
    def __init__(self, seqs: _Optional[_Iterable[_Union[SeqDelta, _Mapping]]] = ..., finished: _Optional[bool] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TokenLogprobs, _Mapping]]] = ..., metrics: _Optional[_Union[RequestMetrics, _Mapping]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("ticket", "update")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    ticket: _common_pb2.Ticket
    update: TokenUpdate
    def __init__(self, ticket: _Optional[_Union[_common_pb2.Ticket, _Mapping]] = ..., update: _Optional[_Union[TokenUpdate, _Mapping]] = ...) -> None: ...

class ResolveLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "action", "reason")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    action: LeaseAction
    reason: str
    def __init__(self, lease_id: _Optional[str] = ..., action: _Optional[_Union[LeaseAction, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class ResolveLeaseReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class TransferOpen(_message.Message):
    __slots__ = ("lease_id", "request_id", "layout", "transfer_id", "transport")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    request_id: str
    layout: _common_pb2.LayoutDescriptor
    transfer_id: str
    transport: str
    def __init__(self, lease_id: _Optional[str] = ..., request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.LayoutDescriptor, _Mapping]] = ..., transfer_id: _Optional[str] = ..., transport: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("seq", "layer", "token_start", "num_tokens", "data", "checksum", "staged", "shm_offset", "shm_length", "num_layers")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    SHM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHM_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    layer: int
    token_start: int
    num_tokens: int
    data: bytes
    checksum: int
    staged: bool
    shm_offset: int
    shm_length: int
    num_layers: int
    def __init__(self, seq: _Optional[int] = ..., layer: _Optional[int] = ..., token_start: _Optional[int] = ..., num_tokens: _Optional[int] = ..., data: _Optional[bytes] = ..., checksum: _Optional[int] = ..., staged: _Optional[bool] = ..., shm_offset: _Optional[int] = ..., shm_length: _Optional[int] = ..., num_layers: _Optional[int] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: TokenLogprobs
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Union[TokenLogprobs, _Mapping]] = ...) -> None: ...

class TransferClose(_message.Message):
    __slots__ = ("num_chunks", "num_bytes", "first_token")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    num_bytes: int
    first_token: FirstToken
    def __init__(self, num_chunks: _Optional[int] = ..., num_bytes: _Optional[int] = ..., first_token: _Optional[_Union[FirstToken, _Mapping]] = ...) -> None: ...

class TransferMessage(_message.Message):
    __slots__ = ("open", "chunk", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: TransferOpen
    chunk: KVChunk
    close: TransferClose
    def __init__(self, open: _Optional[_Union[TransferOpen, _Mapping]] = ..., chunk: _Optional[_Union[KVChunk, _Mapping]] = ..., close: _Optional[_Union[TransferClose, _Mapping]] = ...) -> None: ...

class TransferAck(_message.Message):
    __slots__ = ("seq", "status", "error", "complete")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        OK: _ClassVar[TransferAck.Status]
        CHECKSUM_MISMATCH: _ClassVar[TransferAck.Status]
        REFUSED: _ClassVar[TransferAck.Status]
    OK: TransferAck.Status
    CHECKSUM_MISMATCH: TransferAck.Status
    REFUSED: TransferAck.Status
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    status: TransferAck.Status
    error: str
    complete: bool
    def __init__(self, seq: _Optional[int] = ..., status: _Optional[_Union[TransferAck.Status, str]] = ..., error: _Optional[str] = ..., complete: _Optional[bool] = ...) -> None: ...
