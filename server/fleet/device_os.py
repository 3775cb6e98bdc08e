"""Device OS modules: the system parts (and bootloaders, radio stacks) the server sends ahead
of an application whose dependencies the device does not meet yet."""

from __future__ import annotations

from typing import Any

from otacore.errors import ConflictError, ModuleFormatError, ValidationError
from otacore.module import validate_module
from otacore.platforms import ModuleFunction
from server.fleet.base import FleetBase, Outcome, normalize_device_id, unknown_device
from server.fleet.roles import Actor, Permission
from server.store import Tx

#: Functions a Device OS release consists of (the application is product firmware).
DEVICE_OS_FUNCTIONS = frozenset({
    ModuleFunction.BOOTLOADER, ModuleFunction.SYSTEM_PART, ModuleFunction.RADIO_STACK,
    ModuleFunction.NCP_FIRMWARE,
})


class DeviceOsService(FleetBase):
    """Upload and look up Device OS modules."""

    async def upload_device_os(self, actor: Actor, image: bytes) -> dict[str, Any]:
        """Store a Device OS module after validating it; 400 for anything but a valid
        bootloader, system part, radio stack or NCP module; 409 for a known version."""
        return await self._run(self._upload_device_os_sync, actor, image)

    def _upload_device_os_sync(self, actor: Actor, image: bytes) -> Outcome:
        actor.require(Permission.ADMINISTER, "upload Device OS modules")
        try:
            info = validate_module(image)
        except ModuleFormatError as exc:
            raise ValidationError(f"not a valid module: {exc}") from exc
        if info.module_function not in DEVICE_OS_FUNCTIONS:
            raise ValidationError(
                f"module function {info.module_function} is not part of Device OS "
                "(bootloader 2, system part 4, NCP 7, radio stack 8); upload applications "
                "as product firmware"
            )
        key = (info.platform_id, info.module_function, info.module_index, info.module_version)
        with self.store.read() as tx:
            known = {
                (m["platform_id"], m["module_function"], m["module_index"], m["module_version"])
                for m in tx.list_system_modules(info.platform_id)
            }
        if key in known:
            raise ConflictError(f"Device OS module {key} is already stored")
        sha256 = self.store.blobs.put(image)  # durable before the row that names it
        now = self.clock()
        with self.store.write() as tx:
            tx.insert_system_module(info.to_json(), sha256, len(image), actor.subject, now)
            tx.add_audit(actor=actor.subject, action="device_os.upload", product_id=None,
                         target=f"device_os:{sha256}", details={"module": list(key)}, now=now)
        # ``sha256`` names the stored file (as ``GET /v1/device-os`` lists it and devices
        # fetch it); the module's own suffix digest stays apart as ``module_sha256``.
        module = info.to_json()
        module["module_sha256"] = module.pop("sha256")
        return Outcome({**module, "sha256": sha256, "size": len(image)})

    async def list_device_os(self, platform_id: int | None = None) -> list[dict[str, Any]]:
        """Device OS modules (of one platform), oldest version first."""

        def work() -> list[dict[str, Any]]:
            with self.store.read() as tx:
                return tx.list_system_modules(platform_id)

        return await self._read(work)

    async def device_os_binary(self, sha256: str) -> bytes:
        """The bytes of a stored module (verified against its SHA-256)."""
        return await self._read(self.store.blobs.get, sha256)

    async def device_platform(self, device_id: str) -> tuple[int, int]:
        """(product id, platform id) a device is bound to: its product's platform, the only
        one whose Device OS modules it may be sent (UnknownDeviceError when it has none)."""

        def work(tx: Tx) -> tuple[int, int]:
            found = tx.get_device_online(normalize_device_id(device_id))
            product = None if found is None else tx.get_product(found[0])
            if product is None:
                raise unknown_device(device_id)
            return product.id, product.platform_id

        return await self._read_grouped(work)

    async def blob_for_product(self, product_id: int, platform_id: int | None,
                               sha256: str) -> bytes | None:
        """The bytes of ``sha256`` if a device of the product may run it (its product
        firmware, or a Device OS module of its platform); None otherwise. Decided by the
        store at every call (one indexed query in a grouped read); the bytes of a recently
        read image come from memory (``server.fleet.recent_blobs``)."""

        def allowed(tx: Tx) -> bool:
            return tx.downloadable_size(product_id, platform_id, sha256) is not None

        if not await self._read_grouped(allowed):
            return None
        data = self.recent_blobs.get(sha256)
        if data is None:
            data = await self._read(self.store.blobs.get, sha256)  # verified on read
            self.recent_blobs.put(sha256, data)
        return data
