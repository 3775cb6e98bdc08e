"""Which file travels for one offer of a module: the first of the delivery planner's
choices (:meth:`otacore.transfer.planner.DeliveryPlanner.file_choices`) the engine's caches
can make: a delta patch, a zstd frame of the image, or the image itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

from otacore.messages import Hello
from otacore.transfer.planner import (
    DeliveryPlanner,
    Encoding,
    FileChoice,
    Offer,
    delta_format_for,
)
from server.devices.delivery import PlannedModule, SentFile
from server.devices.plan_inputs import RefusedFor, target_facts

if TYPE_CHECKING:
    from server.devices.ota import OtaEngine
    from server.fleet import DeviceTarget


async def file_to_send(engine: OtaEngine, planner: DeliveryPlanner, device_id: str,
                       hello: Hello | None, view: DeviceTarget, module: PlannedModule,
                       offer: Offer) -> SentFile:
    """The first of the planner's file choices the caches can make: a delta when the
    device runs a known base and the patch is worth it; else the image zstd-compressed
    when the device inflates them (Hello's compressed_ota) and it compresses; else the
    image itself. When both a delta and a zstd frame can be made, the smaller travels
    (a patch must never cost more than the compressed image: issue 18); a device that
    refuses the one sent falls back through the planner's next choices as before."""
    info = module.info
    delta_format = delta_format_for(hello.delta_format if hello is not None else None,
                                    engine.config.delta_format_version)
    choices = planner.file_choices(
        offer, target_facts(view), compressed_ota=hello is not None and hello.compressed_ota,
        delta_refused=RefusedFor(engine.deltas.refused, device_id),
        zstd_refused=RefusedFor(engine.compressed.refused, device_id),
        delta_format=delta_format)
    for at, choice in enumerate(choices):
        sent = await _encode(engine, device_id, view, module, info.module_function,
                             info.module_index, choice, delta_format)
        if sent is None:
            continue
        if choice.encoding is Encoding.DELTA:
            rival = next((c for c in choices[at + 1:] if c.encoding is Encoding.ZSTD), None)
            if rival is not None:
                frame = await _encode(engine, device_id, view, module, info.module_function,
                                      info.module_index, rival, delta_format)
                if frame is not None and len(frame.data) < len(sent.data):
                    return frame
        return sent
    raise AssertionError("the planner's last choice is the image itself")  # pragma: no cover


async def _encode(engine: OtaEngine, device_id: str, view: DeviceTarget, module: PlannedModule,
                  function: int, index: int, choice: FileChoice,
                  delta_format: int) -> SentFile | None:
    """The file of ``choice`` (a delta made for at most ``delta_format``); None when it
    cannot be made or saves too little."""
    if choice.encoding is Encoding.DELTA:
        engine.deltas.max_ratio = engine.config.delta_max_ratio
        engine.deltas.effort = engine.config.delta_effort
        engine.deltas.codec = engine.config.delta_codec
        engine.deltas.workers = engine.config.delta_threads_per_patch
        delta = await engine.deltas.choose(view, function, index, module.sha256, module.image,
                                           delta_format)
        if delta is None:
            return None
        return SentFile("delta", delta.patch, delta.patch_sha256, delta.base_sha256)
    if choice.encoding is Encoding.ZSTD:
        engine.compressed.max_ratio = engine.config.compressed_max_ratio
        compressed = await engine.compressed.choose(device_id, module.sha256, module.image)
        if compressed is None:
            return None
        return SentFile("zstd", compressed.frame, compressed.frame_sha256)
    return SentFile("full", module.image, module.sha256)
