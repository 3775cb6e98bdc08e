"""One module's delivery to a session's device, for its updater
(:class:`~server.devices.updater.SessionUpdater`, which decides what to deliver): the offer
(the signed manifest, after any key rotation the device lacks, with its downgrade
authorisation), falling back to the next best file while the device refuses an encoded one
(a delta, a zstd frame), the transfer run by a :class:`~server.devices.transfer_run.
TransferRun`, and the attempts after a transfer the device stopped acknowledging.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import trio

from otacore.protocol.ota_wire import offer_request
from otacore.transfer import TransferSender, TransferStatus
from otacore.transfer.planner import Encoding, Offer, Verdict
from server import metrics
from server.devices.delivery import PlannedModule, SentFile
from server.devices.file_choice import file_to_send
from server.devices.key_sync import offer_signing_key
from server.devices.plan_inputs import offer_answer
from server.devices.transfer_run import TransferRun

if TYPE_CHECKING:
    from server.devices.updater import SessionUpdater
    from server.fleet import DeviceTarget

log = logging.getLogger("ota.engine")


async def deliver(updater: SessionUpdater, view: DeviceTarget, module: PlannedModule, *,
                  update_sha256: str | None = None) -> bool:
    """Offer and stream one module; True when the device validated it.

    ``update_sha256`` names the application the update ends with (``module`` itself
    when None): the update is reported started once, however many modules it takes.
    """
    engine = updater.engine
    info = module.info
    offer = Offer(module.sha256, info.module_function, info.module_index,
                  update_sha256 or module.sha256)
    attempt = 0
    while True:
        if attempt:
            # The device stopped acknowledging but the session lives: try again after a
            # pause, outside the transfer limiter; the device resumes from the chunks it
            # already holds.
            await trio.sleep(updater.planner.retry_pause(attempt))
            log.info("retrying the transfer to %s (attempt %d)", updater.device_id,
                     attempt + 1)
        updater.last_failure = None
        updater.attempt = attempt
        async with engine.limiter:
            verdict = await _deliver_once(updater, view, module, offer)
        if (verdict or updater.last_failure is not TransferStatus.TIMEOUT
                or not updater.planner.attempts_left(attempt)):
            return verdict
        attempt += 1


async def _deliver_once(updater: SessionUpdater, view: DeviceTarget, module: PlannedModule,
                        offer: Offer) -> bool:
    """One offer of the module (then the next best file while the device refuses an
    encoded one) and its transfer."""
    engine = updater.engine
    while True:
        sent = await file_to_send(engine, updater.planner, updater.device_id,
                                  updater.handler.hello, view, module, offer)
        verdict = await _offer_and_stream(updater, view, module, offer, sent)
        if verdict is not None:
            return verdict
        # The device refused the encoded file (its base is not what it reported, or it
        # takes no deltas or compressed images): the next best, in the same session.
        if sent.delta_base_sha256 is not None:
            engine.deltas.refused.add((updater.device_id, sent.delta_base_sha256,
                                       module.sha256))
        else:
            engine.compressed.refused.add((updater.device_id, module.sha256))


async def _offer_and_stream(updater: SessionUpdater, view: DeviceTarget,
                            module: PlannedModule, offer: Offer,
                            sent: SentFile) -> bool | None:
    """Offer the module as ``sent`` and stream it; None when the device refused an
    encoded (delta or compressed) offer and the caller should fall back."""
    engine, handler, fleet = updater.engine, updater.handler, updater.engine.fleet
    config = engine.config
    # The device first learns any key rotation it lacks (or, older firmware, is made
    # to reconnect for it): no offer signed with a key it cannot verify.
    signing_key = await offer_signing_key(handler, view.product.id, config.offer_timeout)
    if signing_key is None:
        return False
    # Device OS modules carry no product data: their manifest names version 0.
    product_version = (None if module.info.product_version is not None else 0)
    # The signed manifest always describes the target image, whatever travels.
    signed = engine.signed_manifest(view.product.id, product_version, module, signing_key)
    # An older application needs this device's own, expiring downgrade authorisation.
    authorization = engine.downgrade_authorization(view, handler.hello, product_version,
                                                   module, signing_key)
    base = (bytes.fromhex(sent.delta_base_sha256) if sent.delta_base_sha256 is not None
            else None)
    encoding = Encoding(sent.transfer)
    compressed = encoding is Encoding.ZSTD
    updater.offers += 1
    updater.confirmed_transfer = None  # the offer ends what the device held of the last one
    answer = await handler.request(
        offer_request(signed, delta_base_sha256=base, compressed=compressed,
                      authorization=authorization),
        config.offer_timeout)
    verdict = updater.planner.on_offer_answer(offer_answer(answer.code), encoding)
    if verdict is Verdict.DISABLE_UPDATES:
        await fleet.set_updates_enabled(updater.device_id, False)
        for step in updater.rollout_step("download_failed"):  # the device refused it
            await fleet.run_write(step)
        return False
    if verdict is Verdict.FALL_BACK:
        reason = bytes(answer.payload).decode(errors="replace")[:200]
        log.info("device %s refused a %s offer of %s: %s", updater.device_id,
                 sent.transfer, module.sha256[:12], reason)
        return None
    if verdict is Verdict.REFUSE_IMAGE:
        reason = bytes(answer.payload).decode(errors="replace")[:200]
        log.info("update of %s failed: it refused the image %s: %s", updater.device_id,
                 module.sha256[:12], reason,
                 extra={"event": "update_failed", "device_id": updater.device_id,
                        "product_id": view.product.id, "sha256": offer.update_sha256,
                        "reason": f"image refused: {reason}"})
        engine.failed.setdefault(updater.device_id, set()).add(module.sha256)
        engine.updating.pop(updater.device_id, None)
        await updater.record_status("failed", error=reason, rollout_outcome="image_refused",
                                    application_sha256=offer.update_sha256)
        metrics.update_ended("image_refused")
        return False
    if engine.updating.get(updater.device_id) != offer.update_sha256:
        # A new update: "started" is recorded with the memory at the transfer's first
        # write (see unrecorded_start), so both or neither are stored.
        engine.updating[updater.device_id] = offer.update_sha256
        updater.started_unrecorded = offer.update_sha256
        log.info("update of %s started: %s file of %s (%d bytes)", updater.device_id,
                 sent.transfer, offer.update_sha256[:12], len(sent.data),
                 extra={"event": "update_started", "device_id": updater.device_id,
                        "product_id": view.product.id,
                        "version": module.info.product_version,
                        "sha256": offer.update_sha256, "transfer": sent.transfer,
                        "bytes": len(sent.data),
                        "transport": handler.session.transport})
    updater.inbox.clear()  # drop what a previous transfer left
    hello = handler.hello
    chunk_size = updater.planner.chunk_size(
        handler.session.transport, hello.ota_chunk_size if hello is not None else None)
    info = module.info
    prepared = engine.prepared(sent.data, sent.sha256, chunk_size)
    sender = TransferSender(
        prepared, chunk_size, config.window_limit, secrets.randbits(31),
        module_function=info.module_function, module_index=info.module_index,
        module_version=info.module_version, base_sha256=base, compressed=compressed,
        progress_step=config.progress_step, policy=config.transfer_policy,
    )
    # From here the events that feed the transfer run it (server.devices.transfer_run).
    transfer = updater.transfer = TransferRun(updater, sender, view, module, offer, sent)
    updater.planner.transfer_started(offer, encoding, trio.current_time())
    staged = False
    try:
        verdict_of_stream = await transfer.run()
        staged = verdict_of_stream is True
        return verdict_of_stream
    finally:
        updater.planner.transfer_ended(staged=staged)
        updater.transfer = None
        updater.inbox.clear()
