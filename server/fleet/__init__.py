"""The fleet service: the control plane's business rules over the store and the event bus.

:class:`Fleet` combines the parts (firmware, devices, groups, auth, device-session hooks).
Its async methods run blocking store work in worker threads (bounded by a
``trio.CapacityLimiter``) and publish the resulting events on the bus after the commit.
"""

from __future__ import annotations

from server.fleet.auth import AuthService, TokenGrant
from server.fleet.deltas import DeltaService
from server.fleet.device_history import DeviceHistoryService
from server.fleet.device_os import DeviceOsService
from server.fleet.devices import DevicePage, DeviceService, DeviceView, ImportResult
from server.fleet.event_history import EventHistoryPage, EventHistoryService
from server.fleet.firmware import FirmwareService, FirmwareView, ReleaseOutcome
from server.fleet.groups import GroupService, GroupView
from server.fleet.ota_memory import OtaMemoryService
from server.fleet.presence import PresenceService
from server.fleet.release_progress import AuditPage, ReleaseProgress, ReleaseProgressService
from server.fleet.roles import SYSTEM_ACTOR, Actor, Permission, Role
from server.fleet.rollouts import RolloutService, RolloutView
from server.fleet.sessions import SessionService
from server.fleet.targets import DeviceTarget
from server.fleet.teams import ApiUserGrant, TeamMember, TeamService
from server.fleet.update_reports import UpdateReportService


class Fleet(
    FirmwareService, DeviceService, GroupService, TeamService, AuthService, SessionService,
    UpdateReportService, DeviceOsService,
    DeltaService, OtaMemoryService, PresenceService, RolloutService, DeviceHistoryService,
    ReleaseProgressService, EventHistoryService,
):
    """All control-plane operations; construct with ``Fleet(store, bus, limiter=...)``."""


__all__ = [
    "SYSTEM_ACTOR",
    "Actor",
    "ApiUserGrant",
    "AuditPage",
    "DevicePage",
    "DeviceTarget",
    "DeviceView",
    "EventHistoryPage",
    "FirmwareView",
    "Fleet",
    "GroupView",
    "ImportResult",
    "Permission",
    "ReleaseOutcome",
    "ReleaseProgress",
    "Role",
    "RolloutView",
    "TeamMember",
    "TokenGrant",
]
