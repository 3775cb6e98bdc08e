"""Errors of the fleet service's business rules (status codes follow the bases)."""

from __future__ import annotations

from otacore.errors import ConflictError, NotFoundError, ValidationError


class UnknownProductError(NotFoundError):
    """No product has this id or slug."""


class UnknownDeviceError(NotFoundError):
    """The device is not in this product (or not known at all)."""


class UnknownFirmwareError(NotFoundError):
    """The product has no firmware of this version."""


class UnknownGroupError(NotFoundError):
    """The product has no group of this name."""


class FirmwareRejectedError(ValidationError):
    """An upload breaks an upload rule (module, version, platform, size, duplicate)."""


class ReleaseRefusedError(ValidationError):
    """A release breaks a release rule (not yet seen running, unknown group, ...)."""


class WrongPlatformError(ValidationError):
    """A device's Hello names another platform than its product's: a device is bound to its
    product's platform (it would be offered another platform's Device OS modules)."""

    def __init__(self, product_platform: int, hello_platform: int) -> None:
        self.product_platform = product_platform
        self.hello_platform = hello_platform
        super().__init__(
            f"this device belongs to a product of platform {product_platform}; its Hello "
            f"names platform {hello_platform} (a device runs one platform's Device OS: "
            f"add it to a product of platform {hello_platform} instead)"
        )


class DeviceRuleError(ValidationError):
    """A device change breaks a rule (flash to a non-development device, bad lock, ...)."""


class DuplicateError(ConflictError):
    """A name that must be unique is taken, or the thing is still in use."""


class UnknownRolloutError(NotFoundError):
    """The product has no rollout with this id."""


class RolloutRefusedError(ValidationError):
    """A rollout breaks a rollout rule (firmware not yet seen running, unknown group, bad
    plan or criteria...)."""


class RolloutConflictError(ConflictError):
    """Another active rollout already covers the same target scope, or the rollout's state
    does not allow the operation."""


class UnknownWindowError(NotFoundError):
    """The product (or group) has no maintenance window to clear."""
