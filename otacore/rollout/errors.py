"""Errors of the rollout policy: bad plans, criteria, windows, transitions and saved state."""

from __future__ import annotations

from otacore.errors import ConflictError, ValidationError


class RolloutPlanError(ValidationError):
    """A phase plan, rate limit, back-off or success condition is malformed."""


class RolloutCriteriaError(ValidationError):
    """A failure threshold is malformed (percentage, minimum sample, action, kinds)."""


class MaintenanceWindowError(ValidationError):
    """A maintenance window's cron expression, duration or time zone is invalid."""


class RolloutOutcomeError(ValidationError):
    """A device outcome cannot be recorded (unknown outcome, device never offered...)."""


class RolloutStateError(ConflictError):
    """The rollout's state does not allow this operation (resume a running rollout...)."""


class RolloutFormatError(ValidationError):
    """Serialised rollout state is malformed or of an unknown format version."""
