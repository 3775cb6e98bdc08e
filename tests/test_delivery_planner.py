"""The sans-IO delivery planner (otacore.transfer.planner), without sockets: each rule it
holds, fed plain facts, and properties over random fleets of modules."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.errors import ValidationError
from otacore.module import ModuleDependency, ModuleInfo, build_module, parse_module
from otacore.platforms import ModuleFunction
from otacore.precedence import DeviceTargeting, ProductReleases, Release, target_firmware_for
from otacore.transfer import TransferStatus
from otacore.transfer.module_plan import (
    CannotPlan,
    CatalogEntry,
    DeliveryPlanInputError,
    InstalledModule,
    ModulePlan,
    NeedCatalog,
    NeedModule,
    installed_modules,
    plan_modules,
)
from otacore.transfer.planner import (
    UNNAMED_DELTA_FORMAT,
    AnnouncePending,
    CancelTransfer,
    Delivery,
    DeliveryPlanner,
    DeliveryPlanStateError,
    DeliveryPolicy,
    DowngradePolicy,
    Encoding,
    FileChoice,
    Idle,
    IdleReason,
    Offer,
    OfferAnswer,
    PlanModules,
    TargetFacts,
    TellForced,
    Verdict,
    delta_format_for,
    downgrade_needs_authorization,
)

PLATFORM = 32
BOOTLOADER, SYSTEM, USER = (ModuleFunction.BOOTLOADER, ModuleFunction.SYSTEM_PART,
                            ModuleFunction.USER_PART)


def digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def info(function: int, version: int, *deps: tuple[int, int, int], index: int = 1) -> ModuleInfo:
    """A real module header (built and parsed) with these dependencies."""
    image = build_module(
        b"\0" * 64, platform_id=PLATFORM, function=function, version=version, index=index,
        dependencies=[ModuleDependency(f, i, v) for f, i, v in deps],
        product_id=7 if function == USER else None,
        product_version=version if function == USER else None,
    )
    return parse_module(image)


def running(*modules: tuple[int, int, int, str]) -> tuple[InstalledModule, ...]:
    return tuple(InstalledModule(f, i, v, s) for f, i, v, s in modules)


def facts(**changes: object) -> TargetFacts:
    base: dict[str, object] = {
        "update_needed": True, "updates_allowed": True, "updates_forced": False,
        "reset_pending": False, "target_sha256": digest("app 2"),
        "modules": running((SYSTEM, 1, 3000, digest("system 3000")),
                           (USER, 1, 1, digest("app 1"))),
    }
    base.update(changes)
    return TargetFacts(**base)  # type: ignore[arg-type]


def planner(**policy: object) -> DeliveryPlanner:
    return DeliveryPlanner(DeliveryPolicy(**policy), session_serial=5)  # type: ignore[arg-type]


def resolve(app_sha: str, app: ModuleInfo, installed: tuple[InstalledModule, ...],
            catalog: list[CatalogEntry], parsed: dict[str, ModuleInfo]) -> object:
    """Answer the planner's requests the way the engine's shell does."""
    known: dict[str, ModuleInfo] = {}
    seen_catalog: list[CatalogEntry] | None = None
    for _ in range(100):
        answer = plan_modules(app_sha, app, installed, catalog=seen_catalog, parsed=known)
        if isinstance(answer, NeedCatalog):
            seen_catalog = catalog
        elif isinstance(answer, NeedModule):
            known[answer.sha256] = parsed[answer.sha256]
        else:
            return answer
    raise AssertionError("the planner kept asking")


# -- module planning: Device OS parts first, never a downgrade ---------------------------------


def test_an_application_whose_dependencies_run_needs_nothing_more() -> None:
    app = info(USER, 2, (SYSTEM, 1, 3000))
    installed = running((SYSTEM, 1, 3000, digest("s3000")))
    # The catalog is not even asked for.
    assert plan_modules("a2", app, installed, catalog=None, parsed={}) == ModulePlan(("a2",))


def test_unmet_dependencies_go_first_deepest_first_each_the_oldest_that_will_do() -> None:
    # The app needs system part 1 >= 5000; 5000 needs bootloader >= 3; the device runs
    # system 3000 and bootloader 1. Newer parts exist (6000, bootloader 4): not chosen.
    app = info(USER, 2, (SYSTEM, 1, 5000))
    parsed = {
        "s5000": info(SYSTEM, 5000, (BOOTLOADER, 1, 3)),
        "s6000": info(SYSTEM, 6000, (BOOTLOADER, 1, 4)),
        "b3": info(BOOTLOADER, 3), "b4": info(BOOTLOADER, 4),
    }
    catalog = [CatalogEntry(SYSTEM, 1, 6000, "s6000"), CatalogEntry(SYSTEM, 1, 5000, "s5000"),
               CatalogEntry(BOOTLOADER, 1, 4, "b4"), CatalogEntry(BOOTLOADER, 1, 3, "b3")]
    installed = running((SYSTEM, 1, 3000, "s3000"), (BOOTLOADER, 1, 1, "b1"))
    # Sans-IO: it asks for the catalog, then for the chosen part's header, then plans.
    assert plan_modules("a2", app, installed, catalog=None, parsed={}) == NeedCatalog()
    assert plan_modules("a2", app, installed, catalog=catalog, parsed={}) == NeedModule("s5000")
    plan = resolve("a2", app, installed, catalog, parsed)
    assert plan == ModulePlan(("b3", "s5000", "a2"))
    assert isinstance(plan, ModulePlan) and plan.update_sha256 == "a2"


def test_no_stored_part_newer_than_what_runs_means_no_plan() -> None:
    app = info(USER, 2, (SYSTEM, 1, 5000))
    # Only an older part (a downgrade) and one too old for the dependency are stored.
    catalog = [CatalogEntry(SYSTEM, 1, 2000, "s2000"), CatalogEntry(SYSTEM, 1, 4000, "s4000")]
    installed = running((SYSTEM, 1, 3000, "s3000"))
    answer = plan_modules("a2", app, installed, catalog=catalog, parsed={})
    assert answer == CannotPlan(
        "needs system_part 1 version >= 5000, which no stored Device OS module provides")


def test_two_needs_of_one_slot_get_the_part_that_satisfies_both() -> None:
    """The application needs system part 1 >= 5 and part 2 >= 1; part 2 needs part 1 >= 2.
    The part 1 planned is 5 (it once was 2, found first, and the application failed its
    dependency check on the device)."""
    app = info(USER, 2, (SYSTEM, 1, 5), (SYSTEM, 2, 1))
    parsed = {"x2": info(SYSTEM, 2), "x5": info(SYSTEM, 5),
              "y1": info(SYSTEM, 1, (SYSTEM, 1, 2), index=2)}
    catalog = [CatalogEntry(SYSTEM, 1, 2, "x2"), CatalogEntry(SYSTEM, 1, 5, "x5"),
               CatalogEntry(SYSTEM, 2, 1, "y1")]
    assert resolve("app", app, (), catalog, parsed) == ModulePlan(("x5", "y1", "app"))


def test_a_part_comes_after_the_parts_it_depends_on() -> None:
    """The application needs system part 1 and system part 2; part 1 needs part 2 (found
    after it): part 2 goes first, or the device refuses part 1's unmet dependency."""
    app = info(USER, 2, (SYSTEM, 1, 1), (SYSTEM, 2, 1))
    parsed = {"x1": info(SYSTEM, 1, (SYSTEM, 2, 1)), "y1": info(SYSTEM, 1, index=2)}
    catalog = [CatalogEntry(SYSTEM, 1, 1, "x1"), CatalogEntry(SYSTEM, 2, 1, "y1")]
    assert resolve("app", app, (), catalog, parsed) == ModulePlan(("y1", "x1", "app"))


def test_malformed_records_are_named() -> None:
    with pytest.raises(DeliveryPlanInputError, match="function, index and version"):
        installed_modules([{"function": 4, "index": 1}])
    with pytest.raises(DeliveryPlanInputError, match="module_version"):
        CatalogEntry.from_record({"module_function": 4, "module_index": 1, "sha256": "x"})
    assert installed_modules(None) == ()
    (module,) = installed_modules([{"function": "4", "index": 1, "version": 3000,
                                    "sha256": "AB" * 32}])
    assert module == InstalledModule(4, 1, 3000, "ab" * 32)


# -- one check of the target: the precedence outcomes it consumes ------------------------------


@pytest.mark.parametrize(("changes", "staged", "expected"), [
    ({"update_needed": False}, False, Idle(IdleReason.UP_TO_DATE)),
    ({}, True, Idle(IdleReason.STAGED)),
    ({"modules": ()}, False, Idle(IdleReason.MODULES_UNKNOWN)),
    ({"reset_pending": True}, False, Idle(IdleReason.RESET_PENDING)),
    ({"updates_allowed": False}, False, AnnouncePending()),
    ({"target_sha256": None}, False, CannotPlan("the target firmware is missing")),
    ({}, False, PlanModules(digest("app 2"))),
])
def test_a_check_of_the_target(changes: dict[str, object], staged: bool,
                               expected: object) -> None:
    session = planner()
    session.staged = staged
    assert session.check(facts(**changes)) == expected


@pytest.mark.parametrize(("targeting", "runs", "expected"), [
    (DeviceTargeting(development=True, locked_version=3), 1, None),  # rule 1 beats a lock
    (DeviceTargeting(locked_version=3, groups={"beta"}), 1, 3),  # rule 2 beats the group
    (DeviceTargeting(groups={"beta"}), 1, 4),  # rule 3
    (DeviceTargeting(), 1, 2),  # rule 4
    (DeviceTargeting(), 2, None),  # runs its target already
])
def test_the_planner_offers_what_precedence_decided(targeting: DeviceTargeting, runs: int,
                                                    expected: int | None) -> None:
    releases = ProductReleases(Release(2), {"beta": Release(4, immediate=True)})
    target = target_firmware_for(targeting, releases)
    # What the store's view makes of the target (server.fleet.DeviceTarget.update_needed).
    needed = target.version is not None and target.version != runs
    target_sha = digest(f"app {target.version}") if target.version is not None else None
    session = planner()
    step = session.check(facts(update_needed=needed, target_sha256=target_sha,
                               modules=running((USER, 1, runs, digest(f"app {runs}")))))
    if expected is None:
        assert step == Idle(IdleReason.UP_TO_DATE)
        return
    assert step == PlanModules(digest(f"app {expected}"))
    plan = ModulePlan((digest(f"app {expected}"),))
    offer = session.next_offer(plan, {plan.update_sha256: info(USER, expected)}, facts(), set())
    assert offer == Offer(digest(f"app {expected}"), USER, 1, digest(f"app {expected}"))


def test_forced_updates_are_told_once_per_change() -> None:
    session = planner()
    assert session.forced_notice(False) is None  # a device boots not forced
    assert session.told_forced is False
    notice = session.forced_notice(True)
    assert notice == TellForced(True)
    assert session.forced_notice(True) == TellForced(True)  # not told yet: ask again
    session.told(TellForced(True))
    assert session.forced_notice(True) is None
    assert session.forced_notice(False) == TellForced(False)
    fresh = planner()
    assert fresh.forced_notice(True) == TellForced(True)  # forced at the first check


# -- one offer per check, system parts before the application -----------------------------------


def test_one_offer_per_check_skipping_what_runs_and_stopping_at_a_refusal() -> None:
    system, app = digest("system 5000"), digest("app 2")
    parts = {system: info(SYSTEM, 5000), app: info(USER, 2, (SYSTEM, 1, 5000))}
    plan = ModulePlan((system, app))
    session = planner()
    first = session.next_offer(plan, parts, facts(), refused=set())
    assert first == Offer(system, SYSTEM, 1, app) and not first.final
    # The device reset into the system part: its next session offers the application.
    now_runs = facts(modules=running((SYSTEM, 1, 5000, system), (USER, 1, 1, digest("app 1"))))
    second = session.next_offer(plan, parts, now_runs, refused=set())
    assert second == Offer(app, USER, 1, app) and second.final
    # It refused (or rolled back from) the system part: nothing after it is offered.
    assert session.next_offer(plan, parts, facts(), refused={system}) == Idle(IdleReason.REFUSED)
    done = facts(modules=running((SYSTEM, 1, 5000, system), (USER, 1, 2, app)))
    assert session.next_offer(plan, parts, done, refused=set()) == Idle(IdleReason.ALREADY_RUNS)


# -- the file that travels: delta, zstd, full, as the updater chose before ---------------------


def test_file_choices_delta_then_zstd_then_full() -> None:
    session = planner()
    app1, app2 = digest("app 1"), digest("app 2")
    offer = Offer(app2, USER, 1, app2)
    delta, zstd, full = (FileChoice(Encoding.DELTA, app1), FileChoice(Encoding.ZSTD),
                         FileChoice(Encoding.FULL))
    assert session.file_choices(offer, facts(), compressed_ota=True, delta_refused=set(),
                                zstd_refused=set()) == (delta, zstd, full)
    assert session.file_choices(offer, facts(), compressed_ota=False, delta_refused=set(),
                                zstd_refused=set()) == (delta, full)
    # A patch or frame the device refused is not offered again.
    assert session.file_choices(offer, facts(), compressed_ota=True,
                                delta_refused={(app1, app2)},
                                zstd_refused={app2}) == (full,)
    # No delta without a known base, or against the target itself.
    unknown = facts(modules=running((USER, 1, 1, "")))
    same = facts(modules=running((USER, 1, 2, app2)))
    for device in (unknown, same):
        assert session.file_choices(offer, device, compressed_ota=False, delta_refused=set(),
                                    zstd_refused=set()) == (full,)


def test_a_delta_only_for_a_device_that_reads_a_format_the_server_makes() -> None:
    session = planner()
    app1, app2 = digest("app 1"), digest("app 2")
    offer = Offer(app2, USER, 1, app2)
    delta, full = FileChoice(Encoding.DELTA, app1), FileChoice(Encoding.FULL)
    for readable, choices in ((5, (delta, full)), (2, (delta, full)), (1, (full,))):
        assert session.file_choices(offer, facts(), compressed_ota=False, delta_refused=set(),
                                    zstd_refused=set(), delta_format=readable) == choices
    # The newest of both: the server's setting and what the device's Hello names (a device
    # that names none is older firmware, taken as version 4).
    assert delta_format_for(None, 5) == UNNAMED_DELTA_FORMAT == 4
    assert delta_format_for(3, 5) == 3 and delta_format_for(5, 3) == 3
    assert delta_format_for(9, 5) == 5 and delta_format_for(None, 2) == 2


def test_chunk_size_per_transport() -> None:
    session = planner(tcp_chunk_size=8192, udp_chunk_size=1024)
    assert session.chunk_size("tcp", 512) == 8192
    assert session.chunk_size("udp", 512) == 512  # what the device asked for
    assert session.chunk_size("udp", None) == 1024


# -- outcomes: answers, failures, retries ----------------------------------------------------------


def test_offer_answers() -> None:
    session = planner()
    assert session.on_offer_answer(OfferAnswer.ACCEPTED, Encoding.DELTA) is Verdict.STREAM
    assert (session.on_offer_answer(OfferAnswer.UNAVAILABLE, Encoding.FULL)
            is Verdict.DISABLE_UPDATES)
    for encoded in (Encoding.DELTA, Encoding.ZSTD):
        assert session.on_offer_answer(OfferAnswer.REFUSED, encoded) is Verdict.FALL_BACK
    assert session.on_offer_answer(OfferAnswer.REFUSED, Encoding.FULL) is Verdict.REFUSE_IMAGE


def test_failed_transfers_fall_back_retry_or_fail() -> None:
    session = planner(transfer_attempts=3)
    for status in (TransferStatus.BAD_BASE, TransferStatus.REJECTED):
        assert session.on_transfer_failed(status, Encoding.DELTA, attempt=0) is Verdict.FALL_BACK
        assert session.on_transfer_failed(status, Encoding.FULL, attempt=0) is Verdict.FAILED
    timeout = TransferStatus.TIMEOUT
    assert session.on_transfer_failed(timeout, Encoding.FULL, attempt=1) is Verdict.RETRY
    assert session.on_transfer_failed(timeout, Encoding.FULL, attempt=2) is Verdict.FAILED
    assert (session.on_transfer_failed(TransferStatus.CANCELLED, Encoding.FULL, attempt=0)
            is Verdict.FAILED)


def test_a_retried_transfer_offers_the_same_file_so_the_device_resumes() -> None:
    """The device holds the chunks of the first attempt (its receiver keeps a partial
    download of the same file): a retry after a timeout, and a later check with the same
    facts, offer exactly the same file, so the device resumes instead of starting over."""
    session = planner(transfer_attempts=3)
    app2 = digest("app 2")
    offer = Offer(app2, USER, 1, app2)
    before = session.file_choices(offer, facts(), compressed_ota=True, delta_refused=set(),
                                  zstd_refused=set())
    session.transfer_started(offer, before[0].encoding, now=0.0)
    assert (session.on_transfer_failed(TransferStatus.TIMEOUT, before[0].encoding, attempt=0)
            is Verdict.RETRY)
    session.transfer_ended(staged=False)
    plan = ModulePlan((app2,))
    assert session.next_offer(plan, {app2: info(USER, 2)}, facts(), set()) == offer
    assert session.file_choices(offer, facts(), compressed_ota=True, delta_refused=set(),
                                zstd_refused=set()) == before


def test_progress_is_recorded_at_most_once_per_interval_and_never_the_end() -> None:
    session = planner(progress_interval=1.0)
    assert session.record_progress(4096, 48_000, now=10.0)
    assert not session.record_progress(8192, 48_000, now=10.5)
    assert session.record_progress(12_288, 48_000, now=11.0)
    assert not session.record_progress(48_000, 48_000, now=20.0)  # "applying" records it


def test_a_carried_view_is_used_only_when_it_follows_the_describe_and_every_change() -> None:
    session = planner()
    # A release's read that began after this session's Describe was recorded: usable.
    assert session.carried_view_usable(5.0, described_at=4.0, describe=False)
    # ...but not one that may predate the Describe, or with no Describe recorded yet.
    assert not session.carried_view_usable(3.0, described_at=4.0, describe=False)
    assert not session.carried_view_usable(5.0, described_at=None, describe=False)
    # The Describe's own view is its modules.
    assert session.carried_view_usable(3.0, described_at=None, describe=True)
    # A change after the read (a flash, a lock) asks for a new read.
    session.invalidate(6.0)
    assert not session.carried_view_usable(5.0, described_at=4.0, describe=False)
    assert session.carried_view_usable(6.5, described_at=4.0, describe=False)


def test_retry_delays_double() -> None:
    session = planner(retry_pause=2.0, retry_later=30.0, retry_later_max=100.0)
    assert [session.retry_pause(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]
    delays = [session.after_check(TransferStatus.TIMEOUT) for _ in range(4)]
    assert delays == [30.0, 60.0, 100.0, 100.0]
    assert session.after_check(None) is None  # a check that did not time out: start over
    assert session.after_check(TransferStatus.TIMEOUT) == 30.0


def test_a_check_ended_by_a_store_error_is_retried_backing_off() -> None:
    session = planner(retry_pause=2.0, retry_later=30.0, retry_later_max=20.0 + 10.0)
    assert [session.after_store_error() for _ in range(6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert session.after_check(None) is None  # a check that ended well: start over
    assert session.after_store_error() == 2.0


def test_the_first_later_session_waits_once_for_the_result() -> None:
    session = planner()  # serial 5
    earlier = Delivery(digest("app 2"), final=True, session=4)
    assert session.must_await_result(earlier, reset_pending=False)
    assert not session.must_await_result(earlier, reset_pending=True)  # still staged
    assert not session.must_await_result(Delivery("x", True, 4, awaited=True),
                                         reset_pending=False)
    assert not session.must_await_result(Delivery("x", True, 5), reset_pending=False)
    assert not session.must_await_result(None, reset_pending=False)


# -- the transfer in flight: one at a time, stale ones cancelled -------------------------------


def test_one_transfer_at_a_time() -> None:
    session = planner()
    app2 = digest("app 2")
    offer = Offer(app2, USER, 1, app2)
    session.transfer_started(offer, Encoding.FULL, now=10.0)
    with pytest.raises(DeliveryPlanStateError, match="in flight"):
        session.transfer_started(offer, Encoding.DELTA, now=11.0)
    session.transfer_ended(staged=True)
    assert session.staged and session.in_flight is None
    with pytest.raises(DeliveryPlanStateError, match="no transfer"):
        session.transfer_ended(staged=False)


def test_a_release_arriving_mid_transfer_cancels_it() -> None:
    session = planner()
    app2, app3 = digest("app 2"), digest("app 3")
    session.transfer_started(Offer(app2, USER, 1, app2), Encoding.FULL, now=0.0)
    assert session.stale(facts(target_sha256=app2)) is None  # the same target: go on
    stale = session.stale(facts(target_sha256=app3))
    assert isinstance(stale, CancelTransfer) and app3[:12] in stale.reason


def test_a_lock_to_what_runs_or_development_mid_transfer_cancels_it() -> None:
    session = planner()
    app2 = digest("app 2")
    session.transfer_started(Offer(app2, USER, 1, app2), Encoding.DELTA, now=0.0)
    # Locked to the version it runs, marked development, or the release withdrawn: the
    # store's view says no update is needed any more.
    stale = session.stale(facts(update_needed=False, target_sha256=None))
    assert isinstance(stale, CancelTransfer) and "no longer needs" in stale.reason


def test_a_device_os_part_in_flight_goes_on_whatever_the_new_target() -> None:
    session = planner()
    system, app2 = digest("system 5000"), digest("app 2")
    session.transfer_started(Offer(system, SYSTEM, 1, app2), Encoding.FULL, now=0.0)
    assert session.stale(facts(target_sha256=digest("app 3"))) is None
    assert planner().stale(facts(update_needed=False)) is None  # nothing in flight


def test_a_revoked_device_gets_nothing_planned() -> None:
    """A revoke closes the device's session (server.devices.plane): its planner is gone with
    it, and the next session never starts (the handshake is refused). What the planner
    holds until then is only the one transfer the session closing ends (over real
    sockets: tests/test_ota_e2e_stale.py)."""
    session = planner()
    app2 = digest("app 2")
    session.transfer_started(Offer(app2, USER, 1, app2), Encoding.FULL, now=0.0)
    session.transfer_ended(staged=False)  # the session closed under the transfer
    assert session.in_flight is None and not session.staged
    assert session.check(facts()) == PlanModules(app2)  # a live session would offer again


# -- downgrades and settings -------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "per_device", "expected"), [
    (DowngradePolicy.TARGETED, False, True),
    (DowngradePolicy.DEVICE, False, False),
    (DowngradePolicy.DEVICE, True, True),
    (DowngradePolicy.NEVER, True, False),
])
def test_downgrade_authorisations(policy: DowngradePolicy, per_device: bool,
                                  expected: bool) -> None:
    def ask(**changes: object) -> bool:
        args: dict[str, object] = {"application": True, "per_device": per_device,
                                   "target_version": 2, "device_version": 3}
        args.update(changes)
        return downgrade_needs_authorization(policy, **args)  # type: ignore[arg-type]

    assert ask() is expected
    assert ask(target_version=3) is False  # not older: the manifest alone will do
    assert ask(application=False) is False  # Device OS is never downgraded


def test_policy_bounds_are_named() -> None:
    with pytest.raises(DeliveryPlanInputError, match="transfer_attempts"):
        DeliveryPolicy(transfer_attempts=0)
    with pytest.raises(DeliveryPlanInputError, match="retry_pause"):
        DeliveryPolicy(retry_pause=float("nan"))
    with pytest.raises(DeliveryPlanInputError, match="retry_later_max"):
        DeliveryPolicy(retry_later=10.0, retry_later_max=5.0)
    with pytest.raises(ValidationError, match="choose one of targeted, device, never"):
        DeliveryPolicy(downgrades="sometimes")  # type: ignore[arg-type]
    assert DeliveryPolicy(downgrades="device").downgrades is DowngradePolicy.DEVICE  # type: ignore[arg-type]


# -- properties ----------------------------------------------------------------------------------

SLOTS = [(BOOTLOADER, 1), (SYSTEM, 1), (SYSTEM, 2)]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[ModuleInfo, tuple[InstalledModule, ...],
                                     list[CatalogEntry], dict[str, ModuleInfo]]:
    """A random application, what a device runs, and a random catalog of Device OS parts,
    each with random dependencies on the slots before its own (Device OS: a system part
    needs a bootloader, the second system part the first, never the reverse)."""
    versions = st.integers(min_value=1, max_value=8)
    installed = tuple(InstalledModule(f, i, draw(versions), f"run {f}/{i}") for f, i in SLOTS
                      if draw(st.booleans()))
    catalog: list[CatalogEntry] = []
    parsed: dict[str, ModuleInfo] = {}
    for f, i in SLOTS:
        for version in sorted(draw(st.sets(versions, max_size=4))):
            deps = [(df, di, draw(versions)) for df, di in SLOTS[:SLOTS.index((f, i))]
                    if draw(st.integers(0, 2)) == 0]
            name = f"part {f}/{i}/{version}"
            catalog.append(CatalogEntry(f, i, version, name))
            parsed[name] = info(f, version, *deps, index=i)
    # A module prefix holds at most two dependencies.
    needs = draw(st.lists(st.sampled_from(SLOTS), unique=True, max_size=2))
    app_deps = [(f, i, draw(versions)) for f, i in needs]
    return info(USER, 2, *app_deps), installed, catalog, parsed


@settings(max_examples=400)
@given(fleets())
def test_property_a_plan_never_downgrades_and_ends_with_the_application(
    case: tuple[ModuleInfo, tuple[InstalledModule, ...], list[CatalogEntry],
                dict[str, ModuleInfo]],
) -> None:
    app, installed, catalog, parsed = case
    plan = resolve("app", app, installed, catalog, parsed)
    if isinstance(plan, CannotPlan):
        assert "no stored Device OS module provides" in plan.reason
        return
    assert isinstance(plan, ModulePlan)
    assert plan.sha256s[-1] == "app" and plan.sha256s.count("app") == 1
    runs = {m.slot: m.version for m in installed}
    slots = [(parsed[s].module_function, parsed[s].module_index) for s in plan.sha256s[:-1]]
    assert len(slots) == len(set(slots))  # one part per slot
    for sha256, slot in zip(plan.sha256s, slots, strict=False):
        assert parsed[sha256].module_version > runs.get(slot, -1)  # never a downgrade
    # Each module's needs are met by what runs or by a part planned before it.
    for position, sha256 in enumerate(plan.sha256s):
        header = app if sha256 == "app" else parsed[sha256]
        before = {**runs, **{(parsed[s].module_function, parsed[s].module_index):
                             parsed[s].module_version for s in plan.sha256s[:position]}}
        for dep in header.dependencies:
            assert before.get((dep.function, dep.index), -1) >= dep.version, (dep, plan)


@given(st.lists(st.tuples(st.sampled_from(["start", "end", "check"]), st.integers(0, 3)),
                max_size=40))
def test_property_never_two_transfers_to_one_device_at_once(
    operations: list[tuple[str, int]],
) -> None:
    """A shell that starts a transfer only when the planner offers one, and asks the
    planner first, never gets two in flight; the planner refuses a second one."""
    session = planner()
    apps = [digest(f"app {n}") for n in range(4)]
    in_flight = 0
    for operation, n in operations:
        if operation == "start":
            offer = Offer(apps[n], USER, 1, apps[n])
            if session.in_flight is None:
                session.transfer_started(offer, Encoding.FULL, now=float(n))
                in_flight += 1
            else:
                with pytest.raises(DeliveryPlanStateError):
                    session.transfer_started(offer, Encoding.FULL, now=float(n))
        elif operation == "end" and session.in_flight is not None:
            session.transfer_ended(staged=False)
            in_flight -= 1
        elif operation == "check" and session.in_flight is not None:
            # A new target mid-transfer cancels it only when it changes what is sent.
            stale = session.stale(facts(target_sha256=apps[n]))
            assert (stale is None) == (apps[n] == session.in_flight.offer.sha256)
        assert in_flight in (0, 1) and (in_flight == 1) == (session.in_flight is not None)


@given(st.lists(st.tuples(st.sampled_from(SLOTS), st.integers(1, 5)), min_size=1, max_size=3,
                unique_by=lambda slot_version: slot_version[0]),
       st.sets(st.integers(0, 2)), st.sets(st.integers(0, 2)))
def test_property_an_offer_is_never_of_what_runs_nor_past_a_refusal(
    parts: list[tuple[tuple[int, int], int]], runs_index: set[int], refused_index: set[int],
) -> None:
    named = [(f"part {n}", slot, version) for n, (slot, version) in enumerate(parts)]
    plan = ModulePlan((*(name for name, _, _ in named), "app"))
    headers = {name: info(f, version, index=i) for name, (f, i), version in named}
    headers["app"] = info(USER, 2)
    modules = running(*((f, i, version, name) for n, (name, (f, i), version) in enumerate(named)
                        if n in runs_index))
    refused = {named[n][0] for n in refused_index if n < len(named)}
    offer = planner().next_offer(plan, headers, facts(modules=modules), refused)
    if isinstance(offer, Offer):
        position = plan.sha256s.index(offer.sha256)
        assert not refused & set(plan.sha256s[:position + 1])
        assert offer.sha256 not in {m.sha256 for m in modules}
        assert all(sha in {m.sha256 for m in modules} for sha in plan.sha256s[:position])
    else:
        assert offer == Idle(IdleReason.REFUSED)
        assert refused
