from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_MODE_PREFIX: _ClassVar[KeyMode]
    KEY_MODE_POSITION_FREE: _ClassVar[KeyMode]

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_ENCODED: _ClassVar[PayloadKind]
    PAYLOAD_RAW_KV: _ClassVar[PayloadKind]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_LOAD_KV: _ClassVar[Action]
    ACTION_LOAD_TEXT: _ClassVar[Action]
    ACTION_BLEND: _ClassVar[Action]
KEY_MODE_PREFIX: KeyMode
KEY_MODE_POSITION_FREE: KeyMode
PAYLOAD_ENCODED: PayloadKind
PAYLOAD_RAW_KV: PayloadKind
ACTION_LOAD_KV: Action
ACTION_LOAD_TEXT: Action
ACTION_BLEND: Action

class ModelSpec(_message.Message):
    __slots__ = ("model", "model_fingerprint", "tokenizer", "layers", "kv_heads", "head_dim", "dtype")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    model: str
    model_fingerprint: str
    tokenizer: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., tokenizer: _Optional[str] = ..., layers: _Optional[int] = ..., kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class Context(_message.Message):
    __slots__ = ("model", "token_ids", "chunk_tokens", "mode")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    model: ModelSpec
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    chunk_tokens: int
    mode: KeyMode
    def __init__(self, model: _Optional[_Union[ModelSpec, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., chunk_tokens: _Optional[int] = ..., mode: _Optional[_Union[KeyMode, str]] = ...) -> None: ...

class ChunkRef(_message.Message):
    __slots__ = ("key", "index", "level")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    key: str
    index: int
    level: str
    def __init__(self, key: _Optional[str] = ..., index: _Optional[int] = ..., level: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("context", "keys", "levels")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    context: Context
    keys: _containers.RepeatedScalarFieldContainer[str]
    levels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., keys: _Optional[_Iterable[str]] = ..., levels: _Optional[_Iterable[str]] = ...) -> None: ...

class LevelEntry(_message.Message):
    __slots__ = ("level", "key", "present", "size_bytes")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    level: str
    key: str
    present: bool
    size_bytes: int
    def __init__(self, level: _Optional[str] = ..., key: _Optional[str] = ..., present: _Optional[bool] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ChunkStatus(_message.Message):
    __slots__ = ("index", "token_start", "token_count", "levels")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNT_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_start: int
    token_count: int
    levels: _containers.RepeatedCompositeFieldContainer[LevelEntry]
    def __init__(self, index: _Optional[int] = ..., token_start: _Optional[int] = ..., token_count: _Optional[int] = ..., levels: _Optional[_Iterable[_Union[LevelEntry, _Mapping]]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkStatus]
    def __init__(self, chunks: _Optional[_Iterable[_Union[ChunkStatus, _Mapping]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("context", "chunks", "piece_bytes")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PIECE_BYTES_FIELD_NUMBER: _ClassVar[int]
    context: Context
    chunks: _containers.RepeatedCompositeFieldContainer[ChunkRef]
    piece_bytes: int
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[ChunkRef, _Mapping]]] = ..., piece_bytes: _Optional[int] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("position", "key", "found", "total_bytes", "offset", "data", "last", "level")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    position: int
    key: str
    found: bool
    total_bytes: int
    offset: int
    data: bytes
    last: bool
    level: str
    def __init__(self, position: _Optional[int] = ..., key: _Optional[str] = ..., found: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., level: _Optional[str] = ...) -> None: ...

class PutRequest(_message.Message):
    __slots__ = ("context", "begin", "data")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    BEGIN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    context: Context
    begin: PutChunk
    data: bytes
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., begin: _Optional[_Union[PutChunk, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("index", "key", "level", "total_bytes", "kind")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: str
    level: str
    total_bytes: int
    kind: PayloadKind
    def __init__(self, index: _Optional[int] = ..., key: _Optional[str] = ..., level: _Optional[str] = ..., total_bytes: _Optional[int] = ..., kind: _Optional[_Union[PayloadKind, str]] = ...) -> None: ...

class PutResult(_message.Message):
    __slots__ = ("index", "key", "created", "stored_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: str
    created: bool
    stored_bytes: int
    def __init__(self, index: _Optional[int] = ..., key: _Optional[str] = ..., created: _Optional[bool] = ..., stored_bytes: _Optional[int] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, _Mapping]]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "missing")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[int] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class ClientProfile(_message.Message):
    __slots__ = ("client_id", "prefill_tokens_per_s", "decode_elements_per_s", "bandwidth_bytes_per_s", "blend_recompute_fraction")
    class DecodeElementsPerSEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    DECODE_ELEMENTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    BLEND_RECOMPUTE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    prefill_tokens_per_s: float
    decode_elements_per_s: _containers.ScalarMap[str, float]
    bandwidth_bytes_per_s: float
    blend_recompute_fraction: float
    def __init__(self, client_id: _Optional[str] = ..., prefill_tokens_per_s: _Optional[float] = ..., decode_elements_per_s: _Optional[_Mapping[str, float]] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., blend_recompute_fraction: _Optional[float] = ...) -> None: ...

class PlanRequest(_message.Message):
    __slots__ = ("context", "ttft_budget_ms", "quality_floor", "client", "allow_blend")
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TTFT_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FLOOR_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ALLOW_BLEND_FIELD_NUMBER: _ClassVar[int]
    context: Context
    ttft_budget_ms: float
    quality_floor: str
    client: ClientProfile
    allow_blend: bool
    def __init__(self, context: _Optional[_Union[Context, _Mapping]] = ..., ttft_budget_ms: _Optional[float] = ..., quality_floor: _Optional[str] = ..., client: _Optional[_Union[ClientProfile, _Mapping]] = ..., allow_blend: _Optional[bool] = ...) -> None: ...

class ChunkDecision(_message.Message):
    __slots__ = ("index", "action", "level", "key", "expected_bytes", "expected_ms", "transfer_ms", "decode_ms", "compute_ms", "reason")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    index: int
    action: Action
    level: str
    key: str
    expected_bytes: int
    expected_ms: float
    transfer_ms: float
    decode_ms: float
    compute_ms: float
    reason: str
    def __init__(self, index: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ..., level: _Optional[str] = ..., key: _Optional[str] = ..., expected_bytes: _Optional[int] = ..., expected_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class PlanResponse(_message.Message):
    __slots__ = ("decisions", "expected_ttft_ms", "within_budget", "bandwidth_bytes_per_s", "prefill_tokens_per_s", "explanation")
    DECISIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    WITHIN_BUDGET_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    decisions: _containers.RepeatedCompositeFieldContainer[ChunkDecision]
    expected_ttft_ms: float
    within_budget: bool
    bandwidth_bytes_per_s: float
    prefill_tokens_per_s: float
    explanation: str
    def __init__(self, decisions: _Optional[_Iterable[_Union[ChunkDecision, _Mapping]]] = ..., expected_ttft_ms: _Optional[float] = ..., within_budget: _Optional[bool] = ..., bandwidth_bytes_per_s: _Optional[float] = ..., prefill_tokens_per_s: _Optional[float] = ..., explanation: _Optional[str] = ...) -> None: ...
