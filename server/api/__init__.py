"""The REST API: Particle's product firmware, device, group, event and token endpoints."""

from __future__ import annotations

from server.api.app import ROUTES, create_app
from server.api.common import ApiSettings

__all__ = ["ROUTES", "ApiSettings", "create_app"]
