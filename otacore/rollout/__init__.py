"""Safe rollouts (issue 15), sans-IO: phase plans with stable device placement, per-device
outcomes, failure thresholds, maintenance windows and the rollout state machine."""

from __future__ import annotations

from otacore.rollout.criteria import Action, Crossing, Scope, Threshold, parse_action
from otacore.rollout.errors import (
    MaintenanceWindowError,
    RolloutCriteriaError,
    RolloutFormatError,
    RolloutOutcomeError,
    RolloutPlanError,
    RolloutStateError,
)
from otacore.rollout.events import Decision, EventKind, RolloutEvent, State, Verdict
from otacore.rollout.outcomes import (
    FAILURES,
    Counts,
    DeviceProgress,
    Outcome,
    RolloutCounts,
    parse_outcome,
)
from otacore.rollout.phases import Phase, PhasePlan, PlanKind, device_position
from otacore.rollout.policy import Backoff, Policy, RateLimit
from otacore.rollout.rollout import Rollout
from otacore.rollout.targets import RolloutScope
from otacore.rollout.windows import MaintenanceWindow, any_open, next_opening, windows_for

__all__ = [
    "FAILURES",
    "Action",
    "Backoff",
    "Counts",
    "Crossing",
    "Decision",
    "DeviceProgress",
    "EventKind",
    "MaintenanceWindow",
    "MaintenanceWindowError",
    "Outcome",
    "Phase",
    "PhasePlan",
    "PlanKind",
    "Policy",
    "RateLimit",
    "Rollout",
    "RolloutCounts",
    "RolloutCriteriaError",
    "RolloutEvent",
    "RolloutFormatError",
    "RolloutOutcomeError",
    "RolloutPlanError",
    "RolloutScope",
    "RolloutStateError",
    "Scope",
    "State",
    "Threshold",
    "Verdict",
    "any_open",
    "device_position",
    "next_opening",
    "parse_action",
    "parse_outcome",
    "windows_for",
]
