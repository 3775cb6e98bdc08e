"""The download half of an emulated device: an offer (``POST m``), the transfer into the
inactive slot (``POST u``), and staging the validated image (see :mod:`otacore.device.emulated`
for the whole machine, and :mod:`otacore.protocol.ota_wire` for the contract).

:class:`DownloadMixin` is mixed into :class:`~otacore.device.emulated.EmulatedDevice`; it keeps
what it needs from the device (flash, trust store, link, availability) as declared attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from otacore.coap import Code, Message
from otacore.device import (
    ModuleKey,
)
from otacore.device.availability import (
    UPDATES_PENDING_EVENT,
    AvailabilityEvent,
    UpdateAvailability,
)
from otacore.device.emulated_api import DeviceConfig, DeviceFlash, InstalledModule
from otacore.device.slots import (
    RollbackContext,
    Verdict,
    accept_download,
    plan_download,
)
from otacore.device.slots import stage_update as stage_record
from otacore.errors import OtaError, PayloadSchemaError
from otacore.protocol.link import (
    TcpLink,
    UdpLink,
)
from otacore.protocol.ota_wire import (
    OFFER_ACCEPTED,
    OFFER_REFUSED,
    OFFER_UNAVAILABLE,
    offer_compressed,
    offer_delta_base,
    split_offer,
    transfer_request,
)
from otacore.signing import Manifest, TrustStore
from otacore.transfer import (
    PartialDiscarded,
    ReadyToApply,
    ReceiverState,
    ReceiverStateError,
    SaveState,
    TransferFailed,
    TransferMessage,
    TransferReceiver,
    TransferRejectedError,
    TransferStarted,
    TransferStatus,
    UpdateStart,
    WriteChunk,
)
from otacore.transfer.messages import Message as TransferMessageBase
from otacore.transfer.receiver import ReceiverOutput
from otacore.zstd_image import CompressedImageError, inflate_image


@dataclass(slots=True)
class AcceptedOffer:
    """An accepted offer: the signed manifest and what the download checks produced."""

    signed: bytes
    manifest: Manifest
    delta_base: bytes | None
    compressed: bool = False  # the file is the image as one zstd frame
    authorization: bytes | None = None  # a downgrade authorisation for this device
    #: The device's wall-clock time when it accepted the offer (None: it has no clock).
    #: The image is checked again once complete, but an authorisation is judged as of the
    #: offer: a transfer that outlasts its lifetime is not lost for that.
    offered_at: float | None = None
    verdict: Verdict | None = None
    image: bytes | None = None  # a delta's or compressed file's image, written at apply time

    @property
    def key(self) -> ModuleKey:
        return self.manifest.module_key


class DownloadMixin:
    """Offer, transfer and staging of one module at a time (part of EmulatedDevice)."""

    config: DeviceConfig
    flash: DeviceFlash
    bytes_received: int
    bytes_total: int
    last_error: str
    _availability: UpdateAvailability
    _trust: TrustStore | None
    _link: UdpLink | TcpLink | None
    _modules: tuple[InstalledModule, ...]
    _offer: AcceptedOffer | None
    _receiver: TransferReceiver
    #: The offer of a validated transfer the receiver stopped waiting to be confirmed: kept
    #: so that its FinishAck, if it still comes in this session, stages it (see
    #: TransferReceiver.lapsed_transfer_id). None otherwise.
    _lapsed_offer: AcceptedOffer | None = None

    def _answer(self, request: Message, code: int, payload: bytes = b"") -> None:
        raise NotImplementedError  # EmulatedDevice answers on its link

    def _on_availability(self, events: list[AvailabilityEvent]) -> None:
        raise NotImplementedError  # EmulatedDevice publishes, notifies the app or resets

    def wall_time(self, now: float) -> float | None:
        raise NotImplementedError  # EmulatedDevice reads its real-time clock, if any

    def _rollback_context(self, authorization: bytes | None,
                          wall_time: float | None) -> RollbackContext:
        """Who this device is, the offer's downgrade authorisation and the time, for the
        anti-rollback check (otacore.downgrade)."""
        return RollbackContext(self.config.device_id, authorization, wall_time)

    def _refuse(self, request: Message, reason: str, detail: str) -> None:
        line = f"{reason}: {detail}".replace("\n", " ")
        self._answer(request, OFFER_REFUSED, line.encode())
        self.last_error = f"refused an update: {line}"

    def _on_offer(self, request: Message, now: float) -> None:
        availability = self._availability
        # A new offer ends the transfer under way, or a lapsed one (accepted or not, the
        # new offer's answer tells the server this device is not waiting on the old one).
        busy = self._receiver.transfer_id is not None or self._lapsed_offer is not None
        if availability.update_in_progress or busy:
            self._abandon_transfer(now, "a new offer replaces this transfer")
        if not (availability.updates_enabled or availability.updates_forced):
            self._answer(request, OFFER_UNAVAILABLE, b"updates are disabled on this device")
            # The server marks the update pending; the device knows it just refused one.
            self._on_availability(availability.on_cloud_event(UPDATES_PENDING_EVENT, "true"))
            return
        try:
            base = offer_delta_base(request)
            compressed = offer_compressed(request)
            signed, authorization = split_offer(request.payload)
        except PayloadSchemaError as exc:
            self._answer(request, Code.BAD_REQUEST, str(exc).encode())
            return
        if compressed and not self.config.compressed_ota:
            # It never announced compressed OTA in its Hello: the server sends the raw image.
            self._refuse(request, "UNSUPPORTED", "this device does not inflate compressed images")
            return
        if self._trust is None:
            self._refuse(request, "UNKNOWN_KEY", "no trust store is provisioned on this device")
            return
        flash = self.flash
        plan = plan_download(
            flash.boot_record(),
            signed,
            self._trust,
            platform_id=self.config.platform_id,
            installed=flash.installed_modules(),
            rollback=self._rollback_context(authorization, self.wall_time(now)),
        )
        verdict = plan.verdict
        manifest = verdict.manifest
        if verdict.reason is not None or manifest is None:
            reason = verdict.reason.name if verdict.reason is not None else "MANIFEST_FORMAT"
            self._refuse(request, reason, verdict.detail)
            return
        if base is not None:
            running = {(m.function, m.index): m.sha256 for m in self._modules}
            if running.get(manifest.module_key) != base:
                self._refuse(
                    request,
                    TransferStatus.BAD_BASE.name,
                    f"the delta base {base.hex()} is not the running image",
                )
                return
        if plan.changed:
            flash.commit_boot_record(plan.record)  # drops a stale pending activation first
        availability.offer_update()
        offer = AcceptedOffer(signed, manifest, base, compressed, authorization,
                              self.wall_time(now))
        self._offer = offer
        self._receiver = self._receiver_for(offer)
        self.bytes_received, self.bytes_total = 0, manifest.size
        self.last_error = ""
        self._answer(request, OFFER_ACCEPTED)

    # --- the transfer -----------------------------------------------------------------------

    def _idle_receiver(self) -> TransferReceiver:
        """A receiver for transfers nobody offered: refuses starts, cancels strays."""

        def no_offer(start: UpdateStart) -> None:
            raise TransferRejectedError(
                "no update offer was accepted in this session", TransferStatus.REFUSED
            )

        return TransferReceiver(None, read_stored=lambda offset, length: b"", check_start=no_offer)

    def _saved_state(self) -> ReceiverState | None:
        raw = self.flash.load_transfer_state()
        if raw is None:
            return None
        try:
            return ReceiverState.from_bytes(raw)
        except ReceiverStateError:
            self.flash.clear_transfer_state()
            return None

    def _receiver_for(self, offer: AcceptedOffer) -> TransferReceiver:
        flash = self.flash
        function, index = offer.key

        def read_stored(offset: int, length: int) -> bytes:
            slot = flash.inactive_slot(function, index)
            return flash.read_slot(function, index, slot, offset, length)

        return TransferReceiver(
            self._saved_state(),
            read_stored=read_stored,
            window_bytes=self.config.window_bytes,
            idle_timeout=self.config.transfer_idle_timeout,
            max_file_size=self.config.max_binary_size,
            check_start=lambda start: _check_start(offer, start),
            check_file=lambda start, view: self._check_file(offer, view),
            finish_retry=self.config.finish_retry,
            finish_retries=self.config.finish_retries,
            finish_reask=self.config.finish_reask,
            finish_reask_max=self.config.finish_reask_max,
        )

    def _check_file(self, offer: AcceptedOffer, view: memoryview) -> None:
        """The whole file is in the slot: rebuild a delta or inflate a compressed image, then
        every acceptance check."""
        image = bytes(view)
        if offer.compressed:
            try:
                image = inflate_image(
                    image, offer.manifest.size, max_window_log=self.config.max_zstd_window_log
                )
            except CompressedImageError as exc:
                raise TransferRejectedError(f"the compressed image is refused: {exc}") from exc
        elif offer.delta_base is not None:
            from otacore.delta import apply_patch, read_header  # only for devices taking deltas

            readable = self.config.delta_format
            try:
                version = read_header(image).version
            except (OtaError, ValueError) as exc:
                raise TransferRejectedError(f"the delta does not apply: {exc}") from exc
            if readable is not None and version > readable:
                # (emulates an applier of that version: it knows no newer format)
                raise TransferRejectedError(
                    f"the delta does not apply: patch format version {version} is newer than "
                    f"this device's applier reads ({readable})"
                )
            function, index = offer.key
            running = {(m.function, m.index): m.slot for m in self._modules}
            base = self.flash.read_slot(function, index, running[offer.key])
            try:
                image = apply_patch(base, image)
            except (OtaError, ValueError) as exc:
                raise TransferRejectedError(f"the delta does not apply: {exc}") from exc
        assert self._trust is not None
        verdict = accept_download(
            image,
            offer.signed,
            self._trust,
            platform_id=self.config.platform_id,
            installed=self.flash.installed_modules(),
            record=self.flash.boot_record(),
            rollback=self._rollback_context(offer.authorization, offer.offered_at),
        )
        if verdict.reason is not None:
            raise TransferRejectedError(f"{verdict.reason.name}: {verdict.detail}")
        offer.verdict = verdict
        offer.image = image if offer.delta_base is not None or offer.compressed else None

    def _apply_receiver(self, outputs: list[ReceiverOutput], now: float) -> None:
        offer = self._offer
        if offer is not None and any(
            isinstance(out, TransferStarted) and out.resume_offset == 0 for out in outputs
        ):
            # A download from chunk 1: empty the slot, so no byte of an older image remains
            # past the new one's end (the bootloader checks the whole slot).
            self.flash.begin_inactive(*offer.key)
        for out in outputs:
            if isinstance(out, TransferMessageBase):
                if self._link is not None:
                    self._link.notify(transfer_request(cast(TransferMessage, out)), now)
            elif isinstance(out, WriteChunk):
                assert offer is not None
                self.flash.write_inactive(*offer.key, out.offset, bytes(out.data))
                self.bytes_received += len(out.data)
            elif isinstance(out, SaveState):
                if out.state is None:
                    self.flash.clear_transfer_state()
                else:
                    self.flash.save_transfer_state(out.state.to_bytes())
            elif isinstance(out, TransferStarted):
                start = out.start
                self.bytes_total = start.file_size
                self.bytes_received = min(out.resume_offset * start.chunk_size, start.file_size)
            elif isinstance(out, ReadyToApply):
                self._stage(now)
            elif isinstance(out, TransferFailed):
                self.last_error = f"transfer failed ({out.status.name}): {out.reason}"
                # A validated transfer whose confirmation is late: the update ends (the
                # device must not hang in it), but the offer is kept to stage the file if
                # the FinishAck still comes (see _stage).
                lapsed = self._receiver.lapsed_transfer_id is not None
                self._lapsed_offer = offer if lapsed else None
                self._end_offer(staged=False)
            # PartialDiscarded: the receiver starts over; nothing else to do.
            elif not isinstance(out, PartialDiscarded):  # pragma: no cover - exhaustive
                raise TypeError(f"unexpected receiver output {out!r}")

    def _abandon_transfer(self, now: float, reason: str) -> None:
        # cancel() also forgets a lapsed transfer, whose late FinishAck is then ignored.
        self._apply_receiver(self._receiver.cancel(now, reason), now)
        self._lapsed_offer = None
        self._end_offer(staged=False)

    def _end_offer(self, *, staged: bool) -> None:
        if self._offer is not None or self._availability.update_in_progress:
            self._offer = None
            self._on_availability(self._availability.on_update_finished(staged))

    def _stage(self, now: float) -> None:
        """The server confirmed the validated file: switch atomically at the next reset.

        The confirmation may come after the receiver stopped waiting for it (the update had
        ended unstaged): the lapsed offer is staged then, and the reset requested anew."""
        offer = self._offer
        late = offer is None
        if offer is None:
            offer, self._lapsed_offer = self._lapsed_offer, None
        assert offer is not None and offer.verdict is not None
        flash = self.flash
        if offer.image is not None:  # the slot holds a patch or a zstd frame: write the image
            flash.begin_inactive(*offer.key)
            flash.write_inactive(*offer.key, 0, offer.image)
        try:
            record = stage_record(flash.boot_record(), offer.verdict)
        except ValueError as exc:
            self.last_error = str(exc)
            self._end_offer(staged=False)
            return
        flash.commit_boot_record(record)  # the one write that stages the update
        flash.clear_transfer_state()
        if late:  # the update already ended (unstaged): it now needs the reset
            self._on_availability(self._availability.on_update_finished(True))
        else:
            self._end_offer(staged=True)


def _check_start(offer: AcceptedOffer, start: UpdateStart) -> None:
    """UpdateStart must announce the file the signed manifest names (or the offered delta)."""
    manifest = offer.manifest
    if start.compressed != offer.compressed:
        raise TransferRejectedError(
            "UpdateStart and the offer disagree on whether the image is compressed"
        )
    if offer.compressed:
        pass  # the frame's own SHA-256 is in UpdateStart; the image inside is checked later
    elif offer.delta_base is None:
        if start.is_delta:
            raise TransferRejectedError(
                "a delta was sent for a full-image offer", TransferStatus.BAD_BASE
            )
        if (start.file_sha256, start.file_size) != (manifest.sha256, manifest.size):
            raise TransferRejectedError(
                f"UpdateStart names a {start.file_size}-byte file {start.file_sha256.hex()}, the "
                f"signed manifest a {manifest.size}-byte file {manifest.sha256.hex()}"
            )
    elif start.base_sha256 != offer.delta_base:
        raise TransferRejectedError(
            "UpdateStart names another delta base than the offer", TransferStatus.BAD_BASE
        )
    announced = (start.module_function, start.module_index, start.module_version)
    signed = (manifest.module_function, manifest.module_index, manifest.module_version)
    if start.module_function and announced != signed:
        raise TransferRejectedError(
            f"UpdateStart announces module {announced}, the signed manifest {signed}"
        )
