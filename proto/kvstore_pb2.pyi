from tandem.proto import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BlockKey(_message.Message):
    __slots__ = ("compat_hash", "block_hash")
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    compat_hash: str
    block_hash: int
    def __init__(self, compat_hash: _Optional[str] = ..., block_hash: _Optional[int] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("key", "payload", "crc32", "layout")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    key: BlockKey
    payload: bytes
    crc32: int
    layout: _common_pb2.LayoutDescriptor
    def __init__(self, key: _Optional[_Union[BlockKey, _Mapping]] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ..., layout: _Optional[_Union[_common_pb2.LayoutDescriptor, _Mapping]] = ...) -> None: ...

class PutReply(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: BlockKey
    def __init__(self, key: _Optional[_Union[BlockKey, _Mapping]] = ...) -> None: ...

class GetReply(_message.Message):
    __slots__ = ("found", "payload", "crc32", "tier")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    found: bool
    payload: bytes
    crc32: int
    tier: str
    def __init__(self, found: _Optional[bool] = ..., payload: _Optional[bytes] = ..., crc32: _Optional[int] = ..., tier: _Optional[str] = ...) -> None: ...

class ExistsRequest(_message.Message):
    __slots__ = ("compat_hash", "block_hashes")
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    compat_hash: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, compat_hash: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class ExistsReply(_message.Message):
    __slots__ = ("present", "prefix_blocks")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    prefix_blocks: int
    def __init__(self, present: _Optional[_Iterable[bool]] = ..., prefix_blocks: _Optional[int] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("compat_hash", "snapshot")
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    compat_hash: str
    snapshot: bool
    def __init__(self, compat_hash: _Optional[str] = ..., snapshot: _Optional[bool] = ...) -> None: ...

class StoreEvent(_message.Message):
    __slots__ = ("kind", "compat_hash", "block_hashes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STORED: _ClassVar[StoreEvent.Kind]
        REMOVED: _ClassVar[StoreEvent.Kind]
    STORED: StoreEvent.Kind
    REMOVED: StoreEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    kind: StoreEvent.Kind
    compat_hash: str
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[StoreEvent.Kind, str]] = ..., compat_hash: _Optional[str] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...
