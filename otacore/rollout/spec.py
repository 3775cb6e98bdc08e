"""A rollout request as operators give it (the CLI's options, the REST body), parsed into
a validated :class:`~otacore.rollout.policy.Policy`; every bad value gets a specific error."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from otacore.errors import ValidationError
from otacore.precedence import MAX_VERSION
from otacore.rollout.criteria import Scope, Threshold, parse_action
from otacore.rollout.phases import PhasePlan
from otacore.rollout.policy import MINUTE_MS, Backoff, Policy, RateLimit

ROLLOUT_FIELDS = frozenset({
    "version", "groups", "phases", "phase_wait", "success_percent", "max_failure_percent",
    "min_sample", "on_failure", "failure_scope", "thresholds", "max_per_minute",
    "rate_increment_factor", "rate_increase_after", "backoff_failures", "backoff_minutes",
    "reboot_timeout", "start_at", "phase_starts", "immediate", "force",
})


@dataclass(frozen=True)
class RolloutSpec:
    """A validated request to create a rollout (group names as given: the store checks
    that they exist)."""

    version: int
    groups: tuple[str, ...]
    policy: Policy
    immediate: bool = False
    force: bool = False


def _flag(fields: Mapping[str, object], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise ValidationError(f"{name} must be true or false")
    return value


def _number(fields: Mapping[str, object], name: str, default: Any, *, whole: bool = True,
            minimum: float = 0) -> Any:
    value = fields.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.strip():
        with contextlib.suppress(ValueError):  # left as is: the check below names it
            value = int(value) if whole else float(value)
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value < minimum:
        unit = "a whole number" if whole else "a number"
        raise ValidationError(f"{name} must be {unit} >= {minimum:g}, not {value!r}")
    return value


def _groups(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(isinstance(n, str) for n in value):
        raise ValidationError("groups must be a list of group names (or 'a,b')")
    return tuple(sorted({name.strip() for name in value}))


def rollout_spec(fields: Mapping[str, object]) -> RolloutSpec:
    """Parse a rollout request, named as the CLI's options (``phases "10,50,100"``,
    ``phase_wait`` minutes, ``max_failure_percent``, ``min_sample``, ``on_failure``,
    ``max_per_minute``...); each bad value gets a specific error."""
    unknown = sorted(set(fields) - ROLLOUT_FIELDS)
    if unknown:
        raise ValidationError(
            f"unknown rollout field(s) {', '.join(unknown)}; known: "
            f"{', '.join(sorted(ROLLOUT_FIELDS))}"
        )
    version = _number(fields, "version", None)
    if version is None:  # absent, or JSON null
        raise ValidationError("give the firmware version to roll out")
    if version > MAX_VERSION:
        raise ValidationError(f"version {version} is outside 0..{MAX_VERSION}")
    phases = fields.get("phases", "100")
    if isinstance(phases, list | tuple):
        phases = ",".join(str(p) for p in phases)
    plan = PhasePlan.parse(str(phases))
    starts = fields.get("phase_starts")
    if starts is not None:  # each phase at a time (epoch ms) or, for null, on success
        if not isinstance(starts, list | tuple):
            raise ValidationError("phase_starts must be a list of epoch ms (or null) per phase")
        plan = PhasePlan(plan.kind, tuple(
            dataclasses.replace(phase, start_at=start)
            for phase, start in _paired(plan.phases, starts)
        ))
    thresholds: list[Threshold] = []
    percent = fields.get("max_failure_percent")
    if percent is not None:
        percent = _number(fields, "max_failure_percent", None, whole=False)
        action = parse_action(fields.get("on_failure", "pause"))
        sample = _number(fields, "min_sample", 1, minimum=1)
        scope_name = str(fields.get("failure_scope", "phase"))
        if scope_name not in ("phase", "rollout", "both"):
            raise ValidationError(f"failure_scope {scope_name!r}: use phase, rollout or both")
        scopes = [Scope.PHASE, Scope.ROLLOUT] if scope_name == "both" else [Scope(scope_name)]
        thresholds += [Threshold(percent, sample, action, scope) for scope in scopes]
    elif any(fields.get(n) is not None for n in ("on_failure", "min_sample", "failure_scope")):
        raise ValidationError(
            "on_failure, min_sample and failure_scope need max_failure_percent"
        )
    extra = fields.get("thresholds") or []
    if not isinstance(extra, list):
        raise ValidationError("thresholds must be a list of {percent, min_sample, action, scope}")
    for item in extra:
        if not isinstance(item, Mapping):
            raise ValidationError("each threshold must be an object")
        thresholds.append(Threshold.from_dict({
            "min_sample": 1, "action": "pause", "scope": "phase",
            "kinds": ["download_failed", "image_refused", "rolled_back", "timed_out"],
            **item,
        }))
    rate = None
    per_minute = fields.get("max_per_minute")
    if per_minute is not None:
        factor = _number(fields, "rate_increment_factor", 1.0, whole=False, minimum=1)
        after = _number(fields, "rate_increase_after", None, minimum=1)
        rate = RateLimit(_number(fields, "max_per_minute", None, minimum=1), factor,
                         increase_after_succeeded=after)
    backoff = Backoff(
        _number(fields, "backoff_failures", 3, minimum=1),
        _number(fields, "backoff_minutes", 60, minimum=1) * MINUTE_MS,
    )
    policy = Policy(
        plan,
        tuple(thresholds),
        success_percent=_number(fields, "success_percent", 100.0, whole=False, minimum=0.001),
        phase_wait_ms=_number(fields, "phase_wait", 0) * MINUTE_MS,
        rate=rate,
        backoff=backoff,
        reboot_timeout_ms=_number(fields, "reboot_timeout", 15, minimum=1) * MINUTE_MS,
        start_at=_number(fields, "start_at", None),
    )
    return RolloutSpec(version, _groups(fields.get("groups")), policy,
                       _flag(fields, "immediate"), _flag(fields, "force"))


def _paired(phases: tuple[Any, ...], starts: list[Any] | tuple[Any, ...]) -> list[tuple[Any, Any]]:
    if len(starts) != len(phases):
        raise ValidationError(
            f"phase_starts gives {len(starts)} times for {len(phases)} phases"
        )
    return list(zip(phases, starts, strict=True))
