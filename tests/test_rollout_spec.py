"""Parsing a rollout request named as the CLI's options into a validated policy."""

from __future__ import annotations

import pytest

from otacore.errors import ValidationError
from otacore.rollout import (
    Action,
    RolloutCriteriaError,
    RolloutPlanError,
    Scope,
)
from otacore.rollout.phases import PlanKind
from otacore.rollout.policy import MINUTE_MS
from otacore.rollout.spec import rollout_spec


def test_the_cli_contract_maps_onto_the_policy() -> None:
    spec = rollout_spec({
        "version": "7", "groups": "b, a,a", "phases": "10,50,100", "phase_wait": 30,
        "max_failure_percent": 20, "min_sample": 5, "on_failure": "abort",
        "max_per_minute": 10, "rate_increment_factor": 2, "rate_increase_after": 4,
        "force": True,
    })
    assert spec.version == 7 and spec.groups == ("a", "b") and spec.force
    policy = spec.policy
    assert policy.plan.kind is PlanKind.PERCENT
    assert [p.size for p in policy.plan.phases] == [10, 50, 100]
    assert policy.phase_wait_ms == 30 * MINUTE_MS
    (threshold,) = policy.thresholds
    assert (threshold.percent, threshold.min_sample, threshold.action, threshold.scope) == (
        20, 5, Action.ABORT, Scope.PHASE
    )
    assert policy.rate is not None and policy.rate.base_per_minute == 10
    assert policy.rate.increase_after_succeeded == 4


def test_defaults_are_a_particle_like_single_phase() -> None:
    spec = rollout_spec({"version": 3})
    assert len(spec.policy.plan.phases) == 1 and spec.policy.thresholds == ()
    assert spec.policy.rate is None and not spec.force and spec.groups == ()


def test_both_scopes_and_explicit_thresholds() -> None:
    spec = rollout_spec({
        "version": 3, "max_failure_percent": 10, "failure_scope": "both",
        "thresholds": [{"percent": 5, "kinds": ["rolled_back"], "action": "abort",
                        "scope": "rollout", "min_sample": 20}],
    })
    scopes = [(t.scope, t.action) for t in spec.policy.thresholds]
    assert scopes == [(Scope.PHASE, Action.PAUSE), (Scope.ROLLOUT, Action.PAUSE),
                      (Scope.ROLLOUT, Action.ABORT)]


def test_phase_start_times() -> None:
    spec = rollout_spec({"version": 3, "phases": "10,100", "phase_starts": [None, 5000]})
    assert [p.start_at for p in spec.policy.plan.phases] == [None, 5000]


@pytest.mark.parametrize(
    ("fields", "error", "message"),
    [
        ({}, ValidationError, "give the firmware version"),
        ({"version": 70000}, ValidationError, "outside 0..65535"),
        ({"version": True}, ValidationError, "whole number"),
        ({"version": 1, "colour": "red"}, ValidationError, "unknown rollout field"),
        ({"version": 1, "phases": "5,1,100"}, RolloutPlanError, "must increase"),
        ({"version": 1, "max_failure_percent": 100}, RolloutCriteriaError, "outside"),
        ({"version": 1, "max_failure_percent": "x"}, ValidationError, "a number"),
        ({"version": 1, "max_failure_percent": 5, "on_failure": "panic"},
         RolloutCriteriaError, "use pause or abort"),
        ({"version": 1, "max_failure_percent": 5, "failure_scope": "x"}, ValidationError,
         "phase, rollout or both"),
        ({"version": 1, "on_failure": "abort"}, ValidationError, "need max_failure_percent"),
        ({"version": 1, "max_per_minute": 0}, ValidationError, ">= 1"),
        ({"version": 1, "max_per_minute": 5, "rate_increment_factor": 2}, RolloutPlanError,
         "needs a criterion"),
        ({"version": 1, "phase_wait": -1}, ValidationError, ">= 0"),
        ({"version": 1, "groups": 5}, ValidationError, "list of group names"),
        ({"version": 1, "force": "yes"}, ValidationError, "true or false"),
        ({"version": 1, "thresholds": [{"percent": 5, "oops": 1}]}, RolloutCriteriaError,
         "malformed threshold"),
        ({"version": 1, "thresholds": "5"}, ValidationError, "must be a list"),
        ({"version": 1, "success_percent": 0}, ValidationError, ">= 0.001"),
        ({"version": 1, "phases": "10,100", "phase_starts": [1]}, ValidationError,
         "1 times for 2 phases"),
        ({"version": 1, "phases": "10,100", "phase_starts": [5, 1]}, RolloutPlanError,
         "starts before phase 1"),
        ({"version": 1, "phase_starts": "soon"}, ValidationError, "a list of epoch ms"),
    ],
)
def test_bad_requests_get_specific_errors(
    fields: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        rollout_spec(fields)
