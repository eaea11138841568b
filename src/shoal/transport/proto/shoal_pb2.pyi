from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Window(_message.Message):
    __slots__ = ("start_minute", "end_minute")
    START_MINUTE_FIELD_NUMBER: _ClassVar[int]
    END_MINUTE_FIELD_NUMBER: _ClassVar[int]
    start_minute: int
    end_minute: int
    def __init__(self, start_minute: _Optional[int] = ..., end_minute: _Optional[int] = ...) -> None: ...

class HelloRequest(_message.Message):
    __slots__ = ("device_id", "attributes", "capabilities", "windows", "runtime_version")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class CapabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    attributes: _containers.ScalarMap[str, str]
    capabilities: _containers.ScalarMap[str, str]
    windows: _containers.RepeatedCompositeFieldContainer[Window]
    runtime_version: str
    def __init__(self, device_id: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ..., capabilities: _Optional[_Mapping[str, str]] = ..., windows: _Optional[_Iterable[_Union[Window, _Mapping]]] = ..., runtime_version: _Optional[str] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("server_id", "model_version", "server_time")
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_FIELD_NUMBER: _ClassVar[int]
    server_id: str
    model_version: int
    server_time: float
    def __init__(self, server_id: _Optional[str] = ..., model_version: _Optional[int] = ..., server_time: _Optional[float] = ...) -> None: ...

class CheckInRequest(_message.Message):
    __slots__ = ("device_id", "held_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    held_version: int
    def __init__(self, device_id: _Optional[str] = ..., held_version: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("round", "model_version", "upload_key", "deadline", "settings", "spec_fingerprint", "kind", "upload_codec", "error_feedback", "clip_norm", "task_id", "served_model", "ckks", "heartbeat_s")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_CODEC_FIELD_NUMBER: _ClassVar[int]
    ERROR_FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SERVED_MODEL_FIELD_NUMBER: _ClassVar[int]
    CKKS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    upload_key: str
    deadline: float
    settings: _containers.ScalarMap[str, float]
    spec_fingerprint: str
    kind: str
    upload_codec: str
    error_feedback: bool
    clip_norm: float
    task_id: int
    served_model: bool
    ckks: CkksTask
    heartbeat_s: float
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., upload_key: _Optional[str] = ..., deadline: _Optional[float] = ..., settings: _Optional[_Mapping[str, float]] = ..., spec_fingerprint: _Optional[str] = ..., kind: _Optional[str] = ..., upload_codec: _Optional[str] = ..., error_feedback: _Optional[bool] = ..., clip_norm: _Optional[float] = ..., task_id: _Optional[int] = ..., served_model: _Optional[bool] = ..., ckks: _Optional[_Union[CkksTask, _Mapping]] = ..., heartbeat_s: _Optional[float] = ...) -> None: ...

class CkksTask(_message.Message):
    __slots__ = ("key_id", "clip", "max_weight", "slots")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    clip: float
    max_weight: int
    slots: int
    def __init__(self, key_id: _Optional[bytes] = ..., clip: _Optional[float] = ..., max_weight: _Optional[int] = ..., slots: _Optional[int] = ...) -> None: ...

class CkksContextRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    def __init__(self, key_id: _Optional[bytes] = ...) -> None: ...

class CkksContextReply(_message.Message):
    __slots__ = ("key_id", "context")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    key_id: bytes
    context: bytes
    def __init__(self, key_id: _Optional[bytes] = ..., context: _Optional[bytes] = ...) -> None: ...

class ComeBack(_message.Message):
    __slots__ = ("at", "reason")
    AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    at: float
    reason: str
    def __init__(self, at: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckInReply(_message.Message):
    __slots__ = ("task", "come_back")
    TASK_FIELD_NUMBER: _ClassVar[int]
    COME_BACK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    come_back: ComeBack
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., come_back: _Optional[_Union[ComeBack, _Mapping]] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("version", "base_version", "chunk_size")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    version: int
    base_version: int
    chunk_size: int
    def __init__(self, version: _Optional[int] = ..., base_version: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("version", "base_version", "total_size", "sha256", "offset", "data", "signed_header", "signature", "not_modified")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIGNED_HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    version: int
    base_version: int
    total_size: int
    sha256: bytes
    offset: int
    data: bytes
    signed_header: bytes
    signature: bytes
    not_modified: bool
    def __init__(self, version: _Optional[int] = ..., base_version: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., signed_header: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., not_modified: _Optional[bool] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("device_id", "have_version", "chunk_size")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    have_version: int
    chunk_size: int
    def __init__(self, device_id: _Optional[str] = ..., have_version: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class GetPlanRequest(_message.Message):
    __slots__ = ("device_id", "have_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    have_version: int
    def __init__(self, device_id: _Optional[str] = ..., have_version: _Optional[int] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("version", "plan", "signed_header", "signature", "not_modified")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    SIGNED_HEADER_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    NOT_MODIFIED_FIELD_NUMBER: _ClassVar[int]
    version: int
    plan: bytes
    signed_header: bytes
    signature: bytes
    not_modified: bool
    def __init__(self, version: _Optional[int] = ..., plan: _Optional[bytes] = ..., signed_header: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., not_modified: _Optional[bool] = ...) -> None: ...

class Declined(_message.Message):
    __slots__ = ("device_id", "task_id", "round", "upload_key", "reason", "detail", "model_version")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    task_id: int
    round: int
    upload_key: str
    reason: str
    detail: str
    model_version: int
    def __init__(self, device_id: _Optional[str] = ..., task_id: _Optional[int] = ..., round: _Optional[int] = ..., upload_key: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class UploadHeader(_message.Message):
    __slots__ = ("device_id", "round", "base_version", "upload_key", "idempotency_key", "num_examples", "metrics", "total_size", "sha256", "ckks_key")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CKKS_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    base_version: int
    upload_key: str
    idempotency_key: str
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    total_size: int
    sha256: bytes
    ckks_key: bytes
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., upload_key: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., ckks_key: _Optional[bytes] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadReply(_message.Message):
    __slots__ = ("accepted", "reason", "detail", "come_back")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COME_BACK_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    detail: str
    come_back: ComeBack
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., come_back: _Optional[_Union[ComeBack, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("device_id", "round", "progress")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    progress: float
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., progress: _Optional[float] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("keep_going",)
    KEEP_GOING_FIELD_NUMBER: _ClassVar[int]
    keep_going: bool
    def __init__(self, keep_going: _Optional[bool] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("device_id", "round", "model_version", "num_examples", "metrics", "task_id", "upload_key")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    model_version: int
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    task_id: int
    upload_key: str
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., task_id: _Optional[int] = ..., upload_key: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggKeys(_message.Message):
    __slots__ = ("enc_public", "mask_public", "kem_public")
    ENC_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    KEM_PUBLIC_FIELD_NUMBER: _ClassVar[int]
    enc_public: bytes
    mask_public: bytes
    kem_public: bytes
    def __init__(self, enc_public: _Optional[bytes] = ..., mask_public: _Optional[bytes] = ..., kem_public: _Optional[bytes] = ...) -> None: ...

class SecAggSetup(_message.Message):
    __slots__ = ("session", "roster", "graph_seed", "neighbours", "threshold", "bits", "length", "client_id", "clip", "value_bits", "max_weight", "rotation", "post_quantum")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    GRAPH_SEED_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    MAX_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ROTATION_FIELD_NUMBER: _ClassVar[int]
    POST_QUANTUM_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    roster: _containers.RepeatedScalarFieldContainer[int]
    graph_seed: bytes
    neighbours: int
    threshold: int
    bits: int
    length: int
    client_id: int
    clip: float
    value_bits: int
    max_weight: int
    rotation: SecAggRotation
    post_quantum: bool
    def __init__(self, session: _Optional[bytes] = ..., roster: _Optional[_Iterable[int]] = ..., graph_seed: _Optional[bytes] = ..., neighbours: _Optional[int] = ..., threshold: _Optional[int] = ..., bits: _Optional[int] = ..., length: _Optional[int] = ..., client_id: _Optional[int] = ..., clip: _Optional[float] = ..., value_bits: _Optional[int] = ..., max_weight: _Optional[int] = ..., rotation: _Optional[_Union[SecAggRotation, _Mapping]] = ..., post_quantum: _Optional[bool] = ...) -> None: ...

class SecAggRotation(_message.Message):
    __slots__ = ("dim", "clip", "gamma", "noise_std", "norm_bound", "block")
    DIM_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    NOISE_STD_FIELD_NUMBER: _ClassVar[int]
    NORM_BOUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    dim: int
    clip: float
    gamma: float
    noise_std: float
    norm_bound: float
    block: int
    def __init__(self, dim: _Optional[int] = ..., clip: _Optional[float] = ..., gamma: _Optional[float] = ..., noise_std: _Optional[float] = ..., norm_bound: _Optional[float] = ..., block: _Optional[int] = ...) -> None: ...

class SecAggKeyDirectory(_message.Message):
    __slots__ = ("session", "keys")
    class KeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: SecAggKeys
        def __init__(self, key: _Optional[int] = ..., value: _Optional[_Union[SecAggKeys, _Mapping]] = ...) -> None: ...
    SESSION_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    keys: _containers.MessageMap[int, SecAggKeys]
    def __init__(self, session: _Optional[bytes] = ..., keys: _Optional[_Mapping[int, SecAggKeys]] = ...) -> None: ...

class SecAggShares(_message.Message):
    __slots__ = ("session", "ciphertexts")
    class CiphertextsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    SESSION_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    ciphertexts: _containers.ScalarMap[int, bytes]
    def __init__(self, session: _Optional[bytes] = ..., ciphertexts: _Optional[_Mapping[int, bytes]] = ...) -> None: ...

class SecAggMaskedHeader(_message.Message):
    __slots__ = ("session", "total_size", "sha256")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    total_size: int
    sha256: bytes
    def __init__(self, session: _Optional[bytes] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class SecAggUnmaskRequest(_message.Message):
    __slots__ = ("session", "survivors", "dropped")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    survivors: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[bytes] = ..., survivors: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class SecAggUnmasking(_message.Message):
    __slots__ = ("session", "self_mask_shares", "mask_key_shares", "pair_kem_keys")
    class SelfMaskSharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class MaskKeySharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    class PairKemKeysEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: bytes
        def __init__(self, key: _Optional[int] = ..., value: _Optional[bytes] = ...) -> None: ...
    SESSION_FIELD_NUMBER: _ClassVar[int]
    SELF_MASK_SHARES_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_SHARES_FIELD_NUMBER: _ClassVar[int]
    PAIR_KEM_KEYS_FIELD_NUMBER: _ClassVar[int]
    session: bytes
    self_mask_shares: _containers.ScalarMap[int, bytes]
    mask_key_shares: _containers.ScalarMap[int, bytes]
    pair_kem_keys: _containers.ScalarMap[int, bytes]
    def __init__(self, session: _Optional[bytes] = ..., self_mask_shares: _Optional[_Mapping[int, bytes]] = ..., mask_key_shares: _Optional[_Mapping[int, bytes]] = ..., pair_kem_keys: _Optional[_Mapping[int, bytes]] = ...) -> None: ...

class SecAggHeader(_message.Message):
    __slots__ = ("device_id", "round", "base_version", "upload_key", "poll", "keys", "shares", "masked", "unmasking")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KEY_FIELD_NUMBER: _ClassVar[int]
    POLL_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    MASKED_FIELD_NUMBER: _ClassVar[int]
    UNMASKING_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    round: int
    base_version: int
    upload_key: str
    poll: bool
    keys: SecAggKeys
    shares: SecAggShares
    masked: SecAggMaskedHeader
    unmasking: SecAggUnmasking
    def __init__(self, device_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., upload_key: _Optional[str] = ..., poll: _Optional[bool] = ..., keys: _Optional[_Union[SecAggKeys, _Mapping]] = ..., shares: _Optional[_Union[SecAggShares, _Mapping]] = ..., masked: _Optional[_Union[SecAggMaskedHeader, _Mapping]] = ..., unmasking: _Optional[_Union[SecAggUnmasking, _Mapping]] = ...) -> None: ...

class SecAggChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: SecAggHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[SecAggHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SecAggWait(_message.Message):
    __slots__ = ("stage", "retry_after")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    stage: str
    retry_after: float
    def __init__(self, stage: _Optional[str] = ..., retry_after: _Optional[float] = ...) -> None: ...

class SecAggEnd(_message.Message):
    __slots__ = ("outcome", "detail")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    outcome: str
    detail: str
    def __init__(self, outcome: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("setup", "key_directory", "share_delivery", "unmask_request", "wait", "end", "refused")
    SETUP_FIELD_NUMBER: _ClassVar[int]
    KEY_DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    SHARE_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    UNMASK_REQUEST_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    setup: SecAggSetup
    key_directory: SecAggKeyDirectory
    share_delivery: SecAggShares
    unmask_request: SecAggUnmaskRequest
    wait: SecAggWait
    end: SecAggEnd
    refused: UploadReply
    def __init__(self, setup: _Optional[_Union[SecAggSetup, _Mapping]] = ..., key_directory: _Optional[_Union[SecAggKeyDirectory, _Mapping]] = ..., share_delivery: _Optional[_Union[SecAggShares, _Mapping]] = ..., unmask_request: _Optional[_Union[SecAggUnmaskRequest, _Mapping]] = ..., wait: _Optional[_Union[SecAggWait, _Mapping]] = ..., end: _Optional[_Union[SecAggEnd, _Mapping]] = ..., refused: _Optional[_Union[UploadReply, _Mapping]] = ...) -> None: ...
