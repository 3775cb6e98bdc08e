"""Which modules bring a device to its target application, sans-IO: the Device OS parts it
depends on first, each after the parts it depends on, and never a downgrade; then the
application. Part of the delivery planner (:mod:`otacore.transfer.planner`); fed the
device's reported modules and the platform's stored Device OS modules as plain records.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from otacore.errors import ValidationError
from otacore.module import ModuleDependency, ModuleInfo, dependency_met
from otacore.platforms import ModuleFunction


class DeliveryPlanInputError(ValidationError):
    """The facts given to the delivery planner are malformed (a module record without its
    function, index or version; a policy outside its bounds)."""


@dataclass(frozen=True)
class InstalledModule:
    """One module a device reported in its Describe."""

    function: int
    index: int
    version: int
    #: Lower-case hex SHA-256 of the module as the device reported it ("" when unknown).
    sha256: str = ""

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> InstalledModule:
        """From the store's record of a Describe (``function``, ``index``, ``version``,
        ``sha256``); DeliveryPlanInputError naming what is missing otherwise."""
        try:
            function, index = _as_int(record["function"]), _as_int(record["index"])
            version = _as_int(record["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DeliveryPlanInputError(
                f"a reported module needs integer function, index and version: {record!r} "
                f"({exc})") from None
        return cls(function, index, version, str(record.get("sha256") or "").lower())

    @property
    def slot(self) -> tuple[int, int]:
        """(function, index): where the module lives on the device."""
        return (self.function, self.index)


def installed_modules(
    records: Iterable[Mapping[str, object]] | None,
) -> tuple[InstalledModule, ...]:
    """The device's reported modules (empty when it has not described itself yet)."""
    return tuple(InstalledModule.from_record(record) for record in records or ())


def _as_int(value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not an integer")
    return int(value)  # type: ignore[call-overload]


@dataclass(frozen=True)
class CatalogEntry:
    """A stored Device OS module of the device's platform."""

    function: int
    index: int
    version: int
    sha256: str

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> CatalogEntry:
        """From the store's Device OS listing (``module_function``, ``module_index``,
        ``module_version``, ``sha256``)."""
        try:
            return cls(_as_int(record["module_function"]), _as_int(record["module_index"]),
                       _as_int(record["module_version"]), str(record["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DeliveryPlanInputError(
                f"a stored Device OS module needs module_function, module_index, "
                f"module_version and sha256: {record!r} ({exc})") from None


@dataclass(frozen=True)
class CannotPlan:
    """The update cannot be planned (a missing image or an unmet dependency)."""

    reason: str


@dataclass(frozen=True)
class NeedCatalog:
    """plan_modules needs the platform's stored Device OS modules."""


@dataclass(frozen=True)
class NeedModule:
    """plan_modules needs the parsed header of the stored image ``sha256``."""

    sha256: str


@dataclass(frozen=True)
class ModulePlan:
    """The images to deliver, in order: Device OS parts first, the application last."""

    sha256s: tuple[str, ...]

    @property
    def update_sha256(self) -> str:
        """The application the update ends with."""
        return self.sha256s[-1]


def plan_modules(
    app_sha256: str,
    app: ModuleInfo,
    installed: Sequence[InstalledModule],
    *,
    catalog: Sequence[CatalogEntry] | None,
    parsed: Mapping[str, ModuleInfo],
) -> ModulePlan | CannotPlan | NeedCatalog | NeedModule:
    """The modules that bring the device to the application ``app``: Device OS parts it
    depends on first (deepest dependency first), then the application.

    Each unmet dependency gets the oldest stored module of its slot that satisfies it and
    is newer than what the device runs there (never a Device OS downgrade); when two
    modules need the same slot, the part planned satisfies the higher need. Sans-IO: when
    the catalog of stored Device OS modules is needed and ``catalog`` is None, the answer
    is NeedCatalog; when a chosen part's header is not in ``parsed``, NeedModule; the
    caller fetches it and asks again with the same inputs plus what it fetched.
    """
    versions = {m.slot: m.version for m in installed}
    triples = [(f, i, v) for (f, i), v in versions.items()]
    plan: list[str] = []
    pending: list[ModuleDependency] = list(app.dependencies)
    chosen: dict[tuple[int, int], CatalogEntry] = {}
    while pending:
        dep = pending.pop()
        slot = (dep.function, dep.index)
        already = chosen.get(slot)
        if dependency_met(dep, triples) or (already is not None and already.version >= dep.version):
            continue
        if catalog is None:
            return NeedCatalog()
        candidates = [
            entry for entry in catalog
            if (entry.function, entry.index) == slot and entry.version >= dep.version
            # Never downgrade Device OS: only newer than what runs.
            and entry.version > versions.get(slot, -1)
        ]
        if not candidates:
            return CannotPlan(f"needs {_function_name(dep.function)} {dep.index} version >= "
                              f"{dep.version}, which no stored Device OS module provides")
        pick = min(candidates, key=lambda entry: entry.version)
        info = parsed.get(pick.sha256)
        if info is None:
            return NeedModule(pick.sha256)
        if already is not None:
            # Another module needs a newer part of a slot already planned: the newer one
            # takes its place (what depended on the older one still comes after it).
            plan[plan.index(already.sha256)] = pick.sha256
        else:
            plan.insert(0, pick.sha256)  # deeper dependencies end up first
        chosen[slot] = pick
        pending.extend(info.dependencies)
    return ModulePlan((*_dependencies_first(plan, parsed), app_sha256))


def _dependencies_first(plan: list[str], parsed: Mapping[str, ModuleInfo]) -> list[str]:
    """``plan`` reordered so that each part comes after the planned parts it depends on
    (a device checks a module's dependencies when it validates it), keeping the planned
    order otherwise; a dependency cycle (no such order) keeps the planned order."""
    slot_of = {sha256: (parsed[sha256].module_function, parsed[sha256].module_index)
               for sha256 in plan}
    planned_slots = set(slot_of.values())
    waits_for = {sha256: {(d.function, d.index) for d in parsed[sha256].dependencies}
                 & planned_slots - {slot_of[sha256]} for sha256 in plan}
    ordered: list[str] = []
    placed: set[tuple[int, int]] = set()
    remaining = list(plan)
    while remaining:
        ready = next((s for s in remaining if waits_for[s] <= placed), remaining[0])
        remaining.remove(ready)
        ordered.append(ready)
        placed.add(slot_of[ready])
    return ordered


def _function_name(function: int) -> str:
    try:
        return ModuleFunction(function).name.lower()
    except ValueError:
        return f"module function {function}"
