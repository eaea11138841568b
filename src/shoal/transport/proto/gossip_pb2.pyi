from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OfferHeader(_message.Message):
    __slots__ = ("sender", "step", "payload_size", "wants_model")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    WANTS_MODEL_FIELD_NUMBER: _ClassVar[int]
    sender: str
    step: int
    payload_size: int
    wants_model: bool
    def __init__(self, sender: _Optional[str] = ..., step: _Optional[int] = ..., payload_size: _Optional[int] = ..., wants_model: _Optional[bool] = ...) -> None: ...

class AnswerHeader(_message.Message):
    __slots__ = ("sender", "accepted", "reason", "detail", "step", "offered_step", "payload_size")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    OFFERED_STEP_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SIZE_FIELD_NUMBER: _ClassVar[int]
    sender: str
    accepted: bool
    reason: str
    detail: str
    step: int
    offered_step: int
    payload_size: int
    def __init__(self, sender: _Optional[str] = ..., accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., step: _Optional[int] = ..., offered_step: _Optional[int] = ..., payload_size: _Optional[int] = ...) -> None: ...

class ExchangeChunk(_message.Message):
    __slots__ = ("offer", "answer", "data")
    OFFER_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offer: OfferHeader
    answer: AnswerHeader
    data: bytes
    def __init__(self, offer: _Optional[_Union[OfferHeader, _Mapping]] = ..., answer: _Optional[_Union[AnswerHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("sender",)
    SENDER_FIELD_NUMBER: _ClassVar[int]
    sender: str
    def __init__(self, sender: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
