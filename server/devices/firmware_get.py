"""Plain CoAP Block2 downloads of firmware (``GET fw/<sha256 hex>``, ota_wire point 6) by
one session's device: any stock CoAP client fetches, byte for byte, the images its product
may run, one block at a time (RFC 7959 2.4)."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import trio

from otacore.coap import BlockOption, Code, Message, MessageType, szx_for_size
from otacore.errors import NotFoundError, OtaError
from server.store import BlobMissingError

if TYPE_CHECKING:
    from server.devices.session import DeviceSessionHandler

log = logging.getLogger("ota.engine")
#: What names an image in ``fw/<sha256>`` (lowercased first).
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class FirmwareDownloads:
    """The ``GET fw/<sha256>`` resource of one session."""

    def __init__(self, handler: DeviceSessionHandler) -> None:
        self.handler = handler
        #: Images this session's device may download: (product, platform, SHA-256) -> size;
        #: only images the store allowed, so it stays small.
        self._downloads: dict[tuple[int, int, str], int] = {}
        #: (product, platform) the device is bound to: its product's platform.
        self._record_scope: tuple[int, int] | None = None

    async def serve_block(self, message: Message, sha256: str) -> None:
        """Plain CoAP Block2 download (RFC 7959 2.4) of a firmware the device may run.

        A block costs a block: whether the device may fetch the image is decided once per
        session (one indexed query), and each block reads only its own bytes. The server
        does not hash the file per block: the client names the image by its SHA-256 and
        checks the whole file it assembled against it.
        """
        handler = self.handler
        name = sha256.lower()
        try:
            size = await self._size(name) if _SHA256_HEX.fullmatch(name) else None
        except NotFoundError as exc:  # the device left its product meanwhile
            handler._respond(message, Code.NOT_FOUND, str(exc).encode()[:200])
            return
        except OtaError as exc:  # the store is unavailable
            handler._respond(message, Code.SERVICE_UNAVAILABLE, str(exc).encode()[:200])
            return
        if size is None:
            handler._respond(message, Code.NOT_FOUND, b"no such firmware for this device")
            return
        block = message.block2
        szx = block.szx if block is not None else szx_for_size(1024)
        num = block.num if block is not None else 0
        offset = num << (szx + 4)
        if offset >= max(size, 1):
            handler._respond(message, Code.BAD_OPTION, b"block past the end")
            return
        length = min(1 << (szx + 4), size - offset)
        try:
            data = await handler.plane.fleet.read_image_range(name, offset, length)
        except BlobMissingError:  # deleted during the session
            self._downloads.clear()
            handler._respond(message, Code.NOT_FOUND, b"no such firmware for this device")
            return
        except OSError as exc:
            log.error("cannot read stored image %s: %s", name, exc)
            handler._respond(message, Code.INTERNAL_SERVER_ERROR, b"stored firmware unreadable")
            return
        if len(data) != length:
            log.error("stored image %s is shorter than its %d-byte record", name, size)
            handler._respond(message, Code.INTERNAL_SERVER_ERROR, b"stored firmware is damaged")
            return
        response = Message(MessageType.ACK, Code.CONTENT, payload=data)
        response.set_block2(BlockOption(num, offset + length < size, szx))
        response.set_uint_option(28, size)  # Size2 (RFC 7959 4)
        handler.link.respond(message, response, trio.current_time())
        handler.rearm()  # the request worker flushes once the request is served

    async def _size(self, sha256: str) -> int | None:
        """The size of image ``sha256`` if this session's device may download it, decided
        once per session per image (a device fetches one image in hundreds of blocks)."""
        if self._record_scope is None:
            # The device's product and that product's platform, never what a Hello claims
            # (a Hello naming another platform is refused; a stock client sends none):
            # read once per session.
            self._record_scope = await self.handler.plane.fleet.device_platform(
                self.handler.device_id)
        product_id, platform = self._record_scope
        key = (product_id, platform, sha256)
        if key not in self._downloads:
            size = await self.handler.plane.fleet.downloadable_size(product_id, platform, sha256)
            if size is None:
                return None  # not remembered: an upload may make it downloadable
            self._downloads[key] = size
        return self._downloads[key]
