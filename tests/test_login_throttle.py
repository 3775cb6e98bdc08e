"""The sign-in throttle's rules, sans-IO with explicit times (issue 13, finding 3 and its
review: findings B, C, E), and the burst log that aggregates its log lines (F)."""

from __future__ import annotations

import pytest

from server.api.throttle import Attempt, LoginThrottle, ThrottleLimits, TooManyAttemptsError
from server.burst_log import BurstLog
from tests.server_cli_capture import capture_server_configs

DAVE = ("user", "dave")


def _throttle(**limits: object) -> LoginThrottle:
    defaults: dict[str, object] = dict(max_failures_per_address=3, max_failures_per_user=5,
                                       lockout_seconds=1800, first_account_lockout_seconds=1,
                                       max_checks_per_address=2)
    return LoginThrottle(ThrottleLimits(**{**defaults, **limits}))  # type: ignore[arg-type]


def _fail(throttle: LoginThrottle, host: str, account: tuple[str, str] | None,
          now: float) -> Attempt:
    attempt = throttle.begin(host, account, now)
    throttle.failed(attempt, now)
    return attempt


def test_ipv6_addresses_of_one_64_share_one_address_limit() -> None:
    throttle = _throttle()
    for n in range(3):  # three addresses of one /64, one failure each
        _fail(throttle, f"2001:db8:100:1::{0x1001 + n:x}", None, 0.0)
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.begin("2001:db8:100:1:ffff::1", None, 1.0)  # any other address of it
    assert refused.value.kind == "address" and refused.value.key == "2001:db8:100:1::/64"
    throttle.begin("2001:db8:100:2::1", None, 1.0)  # the next /64 is another group
    throttle.begin("::ffff:192.0.2.1", None, 1.0)  # IPv4-mapped counts as its IPv4 address
    assert throttle.group_of("::ffff:192.0.2.1") == "192.0.2.1"


def test_one_address_group_holds_at_most_its_share_of_the_checks() -> None:
    throttle = _throttle(max_failures_per_address=10, max_checks_per_address=2)
    for n in range(2):
        throttle.begin(f"2001:db8::{n + 1}", ("user", f"u{n}"), 0.0)
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.begin("2001:db8::99", ("user", "u9"), 0.0)
    assert not refused.value.locked and refused.value.retry_after == 1


def test_the_account_limit_locks_progressively_and_only_unfamiliar_addresses() -> None:
    throttle = _throttle()
    owner = throttle.begin("192.0.2.1", DAVE, 0.0)
    throttle.succeeded(owner, 0.0)  # 192.0.2.1 is now familiar to dave
    now = 10.0
    for n in range(5):  # five failures from five addresses (each under its own limit)
        _fail(throttle, f"198.51.100.{n}", DAVE, now)
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.begin("203.0.113.9", DAVE, now)
    assert refused.value.locked and refused.value.kind == "user"
    assert refused.value.retry_after == 1  # the first lockout: 1 second
    # The owner's familiar address is not refused, and its success does not unlock others.
    throttle.succeeded(throttle.begin("192.0.2.1", DAVE, now), now)
    with pytest.raises(TooManyAttemptsError):
        throttle.begin("203.0.113.9", DAVE, now + 0.5)
    # Each further failure doubles the lockout: 2, 4, 8 ... up to lockout_seconds.
    expected = 2
    for _ in range(14):
        now += 1800  # the lockout has ended (it never lasts longer than this)
        attempt = throttle.begin("203.0.113.9", DAVE, now)
        locks = throttle.failed(attempt, now)
        assert [lock.kind for lock in locks if lock.kind == "user"] == ["user"]
        user_lock = next(lock for lock in locks if lock.kind == "user")
        assert user_lock.seconds == min(expected, 1800) and not user_lock.first
        expected *= 2
        throttle.clear("address", "203.0.113.9", now)  # keep the address out of the way
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.begin("203.0.113.10", DAVE, now + 1799)
    assert refused.value.retry_after == 1


def test_without_familiar_addresses_the_account_limit_applies_everywhere() -> None:
    throttle = _throttle(familiar_addresses=0)
    throttle.succeeded(throttle.begin("192.0.2.1", DAVE, 0.0), 0.0)
    for n in range(5):
        _fail(throttle, f"198.51.100.{n}", DAVE, 1.0)
    with pytest.raises(TooManyAttemptsError):
        throttle.begin("192.0.2.1", DAVE, 1.0)


def test_familiar_groups_are_bounded_per_account_and_in_accounts() -> None:
    throttle = _throttle(familiar_addresses=2, max_keys=3, first_account_lockout_seconds=600)
    for n in range(3):  # three places; only the last two stay familiar
        throttle.succeeded(throttle.begin(f"192.0.2.{n}", DAVE, 0.0), 0.0)
    for n in range(5):
        _fail(throttle, f"198.51.100.{n}", DAVE, 1.0)
    with pytest.raises(TooManyAttemptsError):
        throttle.begin("192.0.2.0", DAVE, 1.0)
    throttle.abandoned(throttle.begin("192.0.2.2", DAVE, 1.0), 1.0)
    for n in range(10):  # other accounts signing in push dave's memory out
        throttle.succeeded(throttle.begin("203.0.113.1", ("user", f"u{n}"), 2.0), 2.0)
    with pytest.raises(TooManyAttemptsError):
        throttle.begin("192.0.2.2", DAVE, 2.0)
    assert throttle.tracked() <= 3 * 3 + 3 * 2


def test_between_account_lockouts_one_attempt_at_a_time() -> None:
    throttle = _throttle()
    for n in range(5):
        _fail(throttle, f"198.51.100.{n}", DAVE, 0.0)
    throttle.begin("203.0.113.1", DAVE, 2.0)  # the 1 s lockout is over: one probe
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.begin("203.0.113.2", DAVE, 2.0)
    assert not refused.value.locked


def test_failures_are_forgotten_after_a_quiet_window_not_before() -> None:
    throttle = _throttle()
    for n in range(4):
        _fail(throttle, f"198.51.100.{n}", DAVE, 100.0 * n)  # one every 100 s
    # 1799 s after the last failure the count stands: one more locks.
    assert throttle.failed(throttle.begin("203.0.113.1", DAVE, 2099.0), 2099.0)
    throttle.clear("user", "dave", 2099.0)
    for n in range(4):
        _fail(throttle, f"198.51.100.{n}", DAVE, 3000.0)
    assert throttle.held("user", "dave", 4799.0) is not None
    assert throttle.held("user", "dave", 4800.0) is None  # quiet for a whole window


def test_an_address_lockout_and_a_success_clearing_its_failures() -> None:
    throttle = _throttle()
    for _ in range(2):
        _fail(throttle, "192.0.2.7", ("user", "x"), 0.0)
    throttle.succeeded(throttle.begin("192.0.2.7", ("user", "y"), 1.0), 1.0)
    assert throttle.held("address", "192.0.2.7", 1.0) is None  # consecutive failures only
    for _ in range(3):
        _fail(throttle, "192.0.2.7", ("user", f"z{_}"), 2.0)
    with pytest.raises(TooManyAttemptsError) as refused:
        throttle.begin("192.0.2.7", ("user", "y"), 3.0)  # even with the right password
    assert refused.value.retry_after == 1799 and refused.value.kind == "address"


def test_a_nearly_locked_account_outlives_any_spray_of_other_names() -> None:
    """Finding E: 10,000 failures against other names used to flush dave's count."""
    throttle = _throttle(max_failures_per_address=10, max_failures_per_user=20,
                         max_keys=1000, max_checks_per_address=4)
    for n in range(19):
        _fail(throttle, f"10.0.0.{n}", DAVE, 0.0)
    for n in range(10_000):  # one failure each against 10,000 names, 10 per address
        _fail(throttle, f"10.{1 + n // 2500}.{n // 10 % 250}.{n % 10}", ("user", f"s{n}"),
              1.0 + n / 100)
    held = throttle.held("user", "dave", 200.0)
    assert held is not None and held.failures == 19
    # The 20th failure locks dave for unfamiliar addresses.
    locks = throttle.failed(throttle.begin("10.9.9.9", DAVE, 200.0), 200.0)
    assert any(lock.kind == "user" and lock.first for lock in locks)
    assert throttle.tracked() <= 3 * 1000


def test_memory_stays_bounded_and_the_least_failed_go_first() -> None:
    throttle = _throttle(max_keys=100)
    for n in range(10_000):  # an attacker cycling addresses and user names
        _fail(throttle, f"10.0.{n // 256}.{n % 256}", ("user", f"user{n}"), float(n))
    assert throttle.tracked() <= 200
    for n in range(2):  # two failures each: more than any of the sprayed names
        _fail(throttle, f"192.0.2.{n}", ("user", "victim"), 20_000.0)
    for n in range(1000):
        _fail(throttle, f"10.1.{n // 256}.{n % 256}", ("user", f"other{n}"), 20_001.0)
    held = throttle.held("user", "victim", 20_002.0)
    assert held is not None and held.failures == 2


def test_an_administrator_clears_a_key_and_sees_what_is_held() -> None:
    throttle = _throttle(first_account_lockout_seconds=600)
    for n in range(5):
        _fail(throttle, f"2001:db8:0:{n}::1", DAVE, 0.0)
    states = throttle.snapshot(1.0)
    assert (states[0].kind, states[0].key, states[0].failures) == ("user", "dave", 5)
    assert states[0].locked_for == 599
    cleared = throttle.clear("user", "dave", 1.0)
    assert cleared is not None and cleared.failures == 5
    throttle.begin("203.0.113.1", DAVE, 1.0)  # admitted again
    assert throttle.clear("user", "dave", 1.0) is None  # nothing left to clear
    _fail(throttle, "2001:db8:0:7::1", None, 2.0)
    # An address clears its group; the network's own spelling works too.
    assert throttle.clear("address", "2001:db8:0:7::abcd", 2.0) is not None
    _fail(throttle, "2001:db8:0:7::1", None, 3.0)
    assert throttle.clear("address", "2001:db8:0:7::/64", 3.0) is not None
    with pytest.raises(ValueError):
        throttle.clear("device", "x", 3.0)


def test_limits_are_checked() -> None:
    for bad in ({"max_failures_per_user": 0}, {"lockout_seconds": 0},
                {"familiar_addresses": -1}, {"ipv6_prefix_length": 129}):
        with pytest.raises(ValueError):
            ThrottleLimits(**bad)  # type: ignore[arg-type]


def test_a_burst_log_reports_a_burst_in_two_lines() -> None:
    burst = BurstLog(interval=10.0)
    assert burst.note(0.0, "address lockouts", "192.0.2.1") is True
    assert burst.deadline == 10.0
    for n in range(1000):
        assert burst.note(0.001 * n, "refused (address locked)", f"192.0.2.{n % 2}") is False
    assert burst.flush(9.9) is None
    summary = burst.flush(10.0)
    assert summary is not None and summary.count == 1000
    assert summary.reasons() == "1000 refused (address locked)"
    assert summary.sources() == "192.0.2.0 (500), 192.0.2.1 (500)"
    assert burst.flush(20.0) is None and burst.deadline is None  # a quiet interval ends it
    assert burst.note(30.0, "x", "192.0.2.9") is True and burst.total == 1002
    with pytest.raises(ValueError):
        BurstLog(interval=0)


def test_the_sign_in_limits_reach_the_api_through_ota_server_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from typer.testing import CliRunner

    from server.cli import server_cmd

    captured = capture_server_configs(monkeypatch)
    result = CliRunner().invoke(server_cmd.app, [
        "server", "--data", "unused", "--login-max-failures-per-address", "7",
        "--login-max-failures-per-user", "9", "--login-lockout", "600",
        "--login-first-account-lockout", "2", "--login-max-checks-per-address", "3",
        "--login-familiar-addresses", "0", "--login-tracked-keys", "500",
        "--login-log-interval", "30", "--device-limit", "ipv6_prefix_length=56"])
    assert result.exit_code == 0, result.output
    api = captured[0].api
    assert (api.login_max_failures_per_address, api.login_max_failures_per_user,
            api.login_lockout_seconds, api.login_first_account_lockout_seconds,
            api.login_max_checks_per_address, api.login_familiar_addresses,
            api.login_tracked_keys, api.login_log_interval, api.ipv6_prefix_length) == (
        7, 9, 600, 2, 3, 0, 500, 30, 56)
    # The device listeners and the sign-in limits group IPv6 clients alike.
    assert captured[0].device_limits.ipv6_prefix_length == 56
