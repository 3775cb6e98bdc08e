"""A window of the sender's chunks as wire messages, through the chunk framing kernel.

:class:`~otacore.transfer.sender.TransferSender` hands out :class:`Chunk` messages; the
per-chunk path turns each into a CoAP ``POST u`` (``ota_wire.transfer_request``), encodes
it on the link and seals it alone. :func:`frame_chunks` does the same for every chunk of
one ``handle``/``poll`` answer in one call of :mod:`otacore.chunk_framing`, byte for byte,
and seals them when given the session's record layer. :func:`split_chunk_runs` cuts a
sender's output into runs of chunks and the other items, in order, so a shell can frame
each run at once and send everything else as before.

Not imported by ``otacore.transfer`` itself: ``otacore.protocol`` (which names the
transfer path) imports ``otacore.transfer``, so this module imports them both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import cache
from typing import Literal, overload

from otacore.chunk_framing import ChunkFramingError, encoded_options, frame_window, seal_window
from otacore.coap import OptionNumber
from otacore.protocol.ota_wire import PATH_TRANSFER
from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.tls13 import Tls13RecordLayer
from otacore.transfer.messages import Chunk
from otacore.transfer.sender import Output, PreparedFile

__all__ = ["frame_chunks", "split_chunk_runs", "transfer_options"]


@cache
def transfer_options() -> bytes:
    """The encoded options of every transfer message: Uri-Path ``u`` (ota_wire point 2)."""
    return encoded_options([(int(OptionNumber.URI_PATH), PATH_TRANSFER.encode())])


@overload
def frame_chunks(
    prepared: PreparedFile,
    chunks: Sequence[Chunk],
    *,
    transport: Literal["udp", "tcp"],
    message_ids: int | Sequence[int] = 0,
    token: bytes = b"",
    sealer: None = None,
) -> list[bytes]: ...


@overload
def frame_chunks(
    prepared: PreparedFile,
    chunks: Sequence[Chunk],
    *,
    transport: Literal["udp"],
    message_ids: int | Sequence[int] = 0,
    token: bytes = b"",
    sealer: DtlsRecordLayer,
) -> list[bytes]: ...


@overload
def frame_chunks(
    prepared: PreparedFile,
    chunks: Sequence[Chunk],
    *,
    transport: Literal["tcp"],
    message_ids: int | Sequence[int] = 0,
    token: bytes = b"",
    sealer: Tls13RecordLayer,
) -> bytes: ...


def frame_chunks(
    prepared: PreparedFile,
    chunks: Sequence[Chunk],
    *,
    transport: Literal["udp", "tcp"],
    message_ids: int | Sequence[int] = 0,
    token: bytes = b"",
    sealer: DtlsRecordLayer | Tls13RecordLayer | None = None,
) -> list[bytes] | bytes:
    """The wire form of ``chunks`` (a sender's chunks of ``prepared``): without a sealer,
    the CoAP messages ``transfer_request(chunk)`` gives, encoded as the ``transport``'s link
    encodes them (UDP: NON, one message id each from ``message_ids``; TCP: RFC 8323
    frames); with the session's record layer, those messages sealed (DTLS 1.2: datagrams;
    TLS 1.3: stream bytes for one write).

    The chunk bytes and CRCs come from ``prepared`` by chunk number (the sender's chunks
    are views of it); every chunk must belong to one transfer and to ``prepared``.

    Over UDP take the ids from the link's message layer, one
    ``ReliableLayer.next_message_id()`` per chunk (RFC 7252 4.4: it skips the ids of CONs
    awaiting their ACK). That is all ``UdpLink.notify`` does that matters for a chunk:
    the NON it remembers serves only to report a Reset, which the link passes on for
    requests awaiting an answer, and a chunk awaits none.
    """
    if not chunks:
        if isinstance(sealer, Tls13RecordLayer):
            return sealer.seal_many([])
        return []
    transfer_id = chunks[0].transfer_id
    numbers = []
    for chunk in chunks:
        if chunk.transfer_id != transfer_id:
            raise ChunkFramingError(
                f"chunks of transfers {transfer_id} and {chunk.transfer_id} in one window; "
                "frame each transfer's chunks apart"
            )
        numbers.append(chunk.index)
    if sealer is not None:
        expected = "udp" if isinstance(sealer, DtlsRecordLayer) else "tcp"
        if transport != expected:
            raise ChunkFramingError(
                f"a {type(sealer).__name__} seals {expected} messages, not {transport} ones"
            )
    frames = frame_window(
        prepared.view,
        prepared.chunk_size,
        numbers,
        transfer_id=transfer_id,
        transport=transport,
        options=transfer_options(),
        crcs=prepared.chunk_crcs,
        message_ids=message_ids,
        tokens=token,
    )
    if sealer is None:
        return frames
    return seal_window(frames, sealer)


def split_chunk_runs(outputs: Sequence[Output]) -> Iterator[list[Chunk] | Output]:
    """The items of a sender's ``start``/``handle``/``poll`` answer, in order, with each
    run of consecutive :class:`Chunk` messages gathered into one list (for
    :func:`frame_chunks`); every other message or event comes alone."""
    run: list[Chunk] = []
    for item in outputs:
        if isinstance(item, Chunk):
            run.append(item)
            continue
        if run:
            yield run
            run = []
        yield item
    if run:
        yield run
