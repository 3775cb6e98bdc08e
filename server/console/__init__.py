"""The operators' console: server-rendered pages (Jinja2 + htmx) at ``/console``.

Served by the API process (``server.api.app`` mounts :func:`create_console`). Each page
module exports ``ROUTES``; :mod:`server.console.app` joins them. Sign-in, the session
cookie, CSRF and the product access rules live in :mod:`server.console.session`.
"""

from server.console.app import create_console

__all__ = ["create_console"]
