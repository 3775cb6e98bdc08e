"""The node id: which server node of an installation a process belongs to.

The nodes of one installation share one database; every process of every node has an
*origin* ``"<node id>:<role>-<pid>"`` (``server.workers.process_origin``), which names it in
the event log (the relay skips its own rows by it) and in the device sessions it holds
(``devices.session_owner`` is ``"<origin>/<serial>"``). The pid alone is unique only on one
host; two nodes in containers are often both pid 1. The node id makes origins unique across
nodes: the operator's ``--node-id`` (``cluster.node_id``), else the host name and the API
port (or the pid when the API port is a free one).
"""

from __future__ import annotations

import os
import re
import socket

from otacore.errors import ValidationError

#: Longest node id: the longest origin, "<node id>:worker1024-<7-digit pid>", fits the
#: event log's origin column (64 characters) with room to spare.
NODE_ID_MAX = 32
_NODE_ID = re.compile(r"[A-Za-z0-9._-]+")


def check_node_id(node_id: str) -> str:
    """``node_id`` if it is a valid node id; ValidationError saying why not."""
    if not 1 <= len(node_id) <= NODE_ID_MAX or not _NODE_ID.fullmatch(node_id):
        raise ValidationError(
            f"node id {node_id!r} must be 1 to {NODE_ID_MAX} letters, digits, '.', '_' or "
            "'-' (e.g. the host name), different on each node of the installation"
        )
    return node_id


def default_node_id(api_port: int = 0, hostname: str | None = None) -> str:
    """The node id when none is configured: the host name (characters a node id cannot hold
    made '-', cut to fit) and the API port, stable across restarts of the node (so a
    restarted node frees its previous incarnation's session leases at once, see
    server.leases) and distinct between nodes (two cannot listen on one host's port). With
    API port 0 (a free one) the process id stands in for it: such a node cannot recognise
    its previous incarnation, whose leases then expire."""
    name = socket.gethostname() if hostname is None else hostname
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "node"
    suffix = f"-{api_port}" if api_port else f"-pid{os.getpid()}"
    return name[: NODE_ID_MAX - len(suffix)] + suffix
