from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VersionWeight(_message.Message):
    __slots__ = ("version", "percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    percent: float
    def __init__(self, version: _Optional[str] = ..., percent: _Optional[float] = ...) -> None: ...

class ShadowPolicy(_message.Message):
    __slots__ = ("version", "percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    percent: float
    def __init__(self, version: _Optional[str] = ..., percent: _Optional[float] = ...) -> None: ...

class TrafficStatus(_message.Message):
    __slots__ = ("model", "split", "shadow", "effective", "serving_versions", "note", "rollout", "revision", "store_up")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SHADOW_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    STORE_UP_FIELD_NUMBER: _ClassVar[int]
    model: str
    split: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    shadow: ShadowPolicy
    effective: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    serving_versions: _containers.RepeatedScalarFieldContainer[str]
    note: str
    rollout: str
    revision: int
    store_up: bool
    def __init__(self, model: _Optional[str] = ..., split: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., shadow: _Optional[_Union[ShadowPolicy, _Mapping]] = ..., effective: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., serving_versions: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ..., rollout: _Optional[str] = ..., revision: _Optional[int] = ..., store_up: _Optional[bool] = ...) -> None: ...

class GetTrafficRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ListTrafficRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTrafficResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[TrafficStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[TrafficStatus, _Mapping]]] = ...) -> None: ...

class SetTrafficRequest(_message.Message):
    __slots__ = ("model", "split", "force")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    split: _containers.RepeatedCompositeFieldContainer[VersionWeight]
    force: bool
    def __init__(self, model: _Optional[str] = ..., split: _Optional[_Iterable[_Union[VersionWeight, _Mapping]]] = ..., force: _Optional[bool] = ...) -> None: ...

class ClearTrafficRequest(_message.Message):
    __slots__ = ("model", "force")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    force: bool
    def __init__(self, model: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class SetShadowRequest(_message.Message):
    __slots__ = ("model", "version", "percent")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    percent: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., percent: _Optional[float] = ...) -> None: ...

class ClearShadowRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TrafficHistoryRequest(_message.Message):
    __slots__ = ("model", "limit")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model: str
    limit: int
    def __init__(self, model: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("time", "who", "model", "action", "old_json", "new_json", "revision", "summary", "section")
    TIME_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OLD_JSON_FIELD_NUMBER: _ClassVar[int]
    NEW_JSON_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SECTION_FIELD_NUMBER: _ClassVar[int]
    time: float
    who: str
    model: str
    action: str
    old_json: str
    new_json: str
    revision: int
    summary: str
    section: str
    def __init__(self, time: _Optional[float] = ..., who: _Optional[str] = ..., model: _Optional[str] = ..., action: _Optional[str] = ..., old_json: _Optional[str] = ..., new_json: _Optional[str] = ..., revision: _Optional[int] = ..., summary: _Optional[str] = ..., section: _Optional[str] = ...) -> None: ...

class TrafficHistoryResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...

class StartRolloutRequest(_message.Message):
    __slots__ = ("model", "to_version", "from_version", "steps", "interval_seconds", "max_error_rate", "max_latency_ratio", "min_requests", "min_accuracy_ratio", "min_labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    to_version: str
    from_version: str
    steps: _containers.RepeatedScalarFieldContainer[float]
    interval_seconds: float
    max_error_rate: float
    max_latency_ratio: float
    min_requests: int
    min_accuracy_ratio: float
    min_labels: int
    def __init__(self, model: _Optional[str] = ..., to_version: _Optional[str] = ..., from_version: _Optional[str] = ..., steps: _Optional[_Iterable[float]] = ..., interval_seconds: _Optional[float] = ..., max_error_rate: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ..., min_accuracy_ratio: _Optional[float] = ..., min_labels: _Optional[int] = ...) -> None: ...

class RolloutRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class RolloutWindow(_message.Message):
    __slots__ = ("requests", "errors", "p99_ms", "replicas")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    p99_ms: float
    replicas: int
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., p99_ms: _Optional[float] = ..., replicas: _Optional[int] = ...) -> None: ...

class RolloutEvent(_message.Message):
    __slots__ = ("time", "event", "detail", "percent", "who")
    TIME_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    WHO_FIELD_NUMBER: _ClassVar[int]
    time: float
    event: str
    detail: str
    percent: float
    who: str
    def __init__(self, time: _Optional[float] = ..., event: _Optional[str] = ..., detail: _Optional[str] = ..., percent: _Optional[float] = ..., who: _Optional[str] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("model", "to_version", "from_version", "state", "step", "percent", "steps", "interval_seconds", "step_remaining_seconds", "reason", "canary", "baseline", "history", "owner", "max_error_rate", "max_latency_ratio", "min_requests", "min_accuracy_ratio", "min_labels", "feedback", "epoch", "lease_remaining_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEP_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MIN_ACCURACY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_LABELS_FIELD_NUMBER: _ClassVar[int]
    FEEDBACK_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEASE_REMAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    to_version: str
    from_version: str
    state: str
    step: int
    percent: float
    steps: _containers.RepeatedScalarFieldContainer[float]
    interval_seconds: float
    step_remaining_seconds: float
    reason: str
    canary: RolloutWindow
    baseline: RolloutWindow
    history: _containers.RepeatedCompositeFieldContainer[RolloutEvent]
    owner: str
    max_error_rate: float
    max_latency_ratio: float
    min_requests: int
    min_accuracy_ratio: float
    min_labels: int
    feedback: _containers.RepeatedCompositeFieldContainer[VersionFeedback]
    epoch: int
    lease_remaining_seconds: float
    def __init__(self, model: _Optional[str] = ..., to_version: _Optional[str] = ..., from_version: _Optional[str] = ..., state: _Optional[str] = ..., step: _Optional[int] = ..., percent: _Optional[float] = ..., steps: _Optional[_Iterable[float]] = ..., interval_seconds: _Optional[float] = ..., step_remaining_seconds: _Optional[float] = ..., reason: _Optional[str] = ..., canary: _Optional[_Union[RolloutWindow, _Mapping]] = ..., baseline: _Optional[_Union[RolloutWindow, _Mapping]] = ..., history: _Optional[_Iterable[_Union[RolloutEvent, _Mapping]]] = ..., owner: _Optional[str] = ..., max_error_rate: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., min_requests: _Optional[int] = ..., min_accuracy_ratio: _Optional[float] = ..., min_labels: _Optional[int] = ..., feedback: _Optional[_Iterable[_Union[VersionFeedback, _Mapping]]] = ..., epoch: _Optional[int] = ..., lease_remaining_seconds: _Optional[float] = ...) -> None: ...

class PublishHeader(_message.Message):
    __slots__ = ("model", "metadata_json", "allow_signature_change", "canary_percent", "baseline_npz", "size", "sha256", "source", "canary")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    ALLOW_SIGNATURE_CHANGE_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    BASELINE_NPZ_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    model: str
    metadata_json: str
    allow_signature_change: bool
    canary_percent: float
    baseline_npz: bytes
    size: int
    sha256: str
    source: str
    canary: StartRolloutRequest
    def __init__(self, model: _Optional[str] = ..., metadata_json: _Optional[str] = ..., allow_signature_change: _Optional[bool] = ..., canary_percent: _Optional[float] = ..., baseline_npz: _Optional[bytes] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., source: _Optional[str] = ..., canary: _Optional[_Union[StartRolloutRequest, _Mapping]] = ...) -> None: ...

class PublishChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PublishHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PublishHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PublishResult(_message.Message):
    __slots__ = ("model", "version", "state", "detail", "metadata_json", "rollout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    state: str
    detail: str
    metadata_json: str
    rollout: RolloutStatus
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[str] = ..., detail: _Optional[str] = ..., metadata_json: _Optional[str] = ..., rollout: _Optional[_Union[RolloutStatus, _Mapping]] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class VersionInfo(_message.Message):
    __slots__ = ("version", "state", "reason", "metadata_json", "traffic_percent", "has_baseline")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_PERCENT_FIELD_NUMBER: _ClassVar[int]
    HAS_BASELINE_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: str
    reason: str
    metadata_json: str
    traffic_percent: float
    has_baseline: bool
    def __init__(self, version: _Optional[str] = ..., state: _Optional[str] = ..., reason: _Optional[str] = ..., metadata_json: _Optional[str] = ..., traffic_percent: _Optional[float] = ..., has_baseline: _Optional[bool] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("model", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    versions: _containers.RepeatedCompositeFieldContainer[VersionInfo]
    def __init__(self, model: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[VersionInfo, _Mapping]]] = ...) -> None: ...

class FeedbackLabel(_message.Message):
    __slots__ = ("id", "labels")
    ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    id: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("model", "labels")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    model: str
    labels: _containers.RepeatedCompositeFieldContainer[FeedbackLabel]
    def __init__(self, model: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[FeedbackLabel, _Mapping]]] = ...) -> None: ...

class VersionFeedback(_message.Message):
    __slots__ = ("version", "labelled", "correct", "accuracy", "mean_absolute_error")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELLED_FIELD_NUMBER: _ClassVar[int]
    CORRECT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MEAN_ABSOLUTE_ERROR_FIELD_NUMBER: _ClassVar[int]
    version: str
    labelled: int
    correct: int
    accuracy: float
    mean_absolute_error: float
    def __init__(self, version: _Optional[str] = ..., labelled: _Optional[int] = ..., correct: _Optional[int] = ..., accuracy: _Optional[float] = ..., mean_absolute_error: _Optional[float] = ...) -> None: ...

class FeedbackStatus(_message.Message):
    __slots__ = ("model", "kind", "output", "kept", "capacity", "unmatched", "versions")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    UNMATCHED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    model: str
    kind: str
    output: str
    kept: int
    capacity: int
    unmatched: int
    versions: _containers.RepeatedCompositeFieldContainer[VersionFeedback]
    def __init__(self, model: _Optional[str] = ..., kind: _Optional[str] = ..., output: _Optional[str] = ..., kept: _Optional[int] = ..., capacity: _Optional[int] = ..., unmatched: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[VersionFeedback, _Mapping]]] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("matched", "unknown", "unknown_ids", "errors", "status")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_IDS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    matched: int
    unknown: int
    unknown_ids: _containers.RepeatedScalarFieldContainer[str]
    errors: _containers.RepeatedScalarFieldContainer[str]
    status: FeedbackStatus
    def __init__(self, matched: _Optional[int] = ..., unknown: _Optional[int] = ..., unknown_ids: _Optional[_Iterable[str]] = ..., errors: _Optional[_Iterable[str]] = ..., status: _Optional[_Union[FeedbackStatus, _Mapping]] = ...) -> None: ...

class GetFeedbackRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ApproveVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ApprovalStatus(_message.Message):
    __slots__ = ("model", "version", "approved_by", "time", "publisher", "gated", "already_approved")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    APPROVED_BY_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PUBLISHER_FIELD_NUMBER: _ClassVar[int]
    GATED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_APPROVED_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    approved_by: str
    time: float
    publisher: str
    gated: bool
    already_approved: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., approved_by: _Optional[str] = ..., time: _Optional[float] = ..., publisher: _Optional[str] = ..., gated: _Optional[bool] = ..., already_approved: _Optional[bool] = ...) -> None: ...
