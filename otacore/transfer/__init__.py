"""Sans-IO firmware transfer protocol, both ends (modelled on Device OS's v3 OTA protocol).

``TransferSender`` (server) and ``TransferReceiver`` (device) exchange typed messages
(``messages``) and report events; neither touches a socket, a clock or storage. See
``sender``, ``receiver`` and ``messages`` for the protocol, and ``bitmap`` for the chunk
bookkeeping.
"""

from __future__ import annotations

from otacore.transfer.messages import (
    Cancel,
    Chunk,
    ChunkAck,
    Event,
    FinishAck,
    FinishReply,
    Message,
    MessageKind,
    ReceiverStats,
    SenderStats,
    StartReply,
    TransferCompleted,
    TransferFailed,
    TransferMessage,
    TransferProgress,
    TransferProtocolError,
    TransferStatus,
    UpdateFinish,
    UpdateStart,
    decode_message,
    encode_message,
)
from otacore.transfer.receiver import (
    PartialDiscarded,
    ReadyToApply,
    ReceiverPhase,
    SaveState,
    TransferReceiver,
    TransferRejectedError,
    TransferStarted,
    WriteChunk,
)
from otacore.transfer.receiver_state import ReceiverState, ReceiverStateError
from otacore.transfer.sender import PreparedFile, RetransmitPolicy, SenderPhase, TransferSender

__all__ = [
    "Cancel",
    "Chunk",
    "ChunkAck",
    "Event",
    "FinishAck",
    "FinishReply",
    "Message",
    "MessageKind",
    "PartialDiscarded",
    "PreparedFile",
    "ReadyToApply",
    "ReceiverPhase",
    "ReceiverState",
    "ReceiverStateError",
    "ReceiverStats",
    "RetransmitPolicy",
    "SaveState",
    "SenderPhase",
    "SenderStats",
    "StartReply",
    "TransferCompleted",
    "TransferFailed",
    "TransferMessage",
    "TransferProgress",
    "TransferProtocolError",
    "TransferReceiver",
    "TransferRejectedError",
    "TransferSender",
    "TransferStarted",
    "TransferStatus",
    "UpdateFinish",
    "UpdateStart",
    "WriteChunk",
    "decode_message",
    "encode_message",
]
