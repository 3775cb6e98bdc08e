"""Tables of the control-plane store, in portable SQLAlchemy Core types.

A CHANGE HERE NEEDS A NEW ALEMBIC REVISION (server/store/migrations/versions/): run
``python -m server.store.migrate revision -m "what changed"``, review what it wrote (batch
mode, so SQLite can ALTER; data moves and renames are yours to add), and keep
tests/test_migrations.py green (it fails while this file and the revisions disagree). A
revision that servers older than Alembic (schema version 8) must not open also raises
``SCHEMA_VERSION`` and the ``meta`` row (those servers refuse a higher one).

Only types every SQLAlchemy backend maps (Integer, BigInteger, String, Text, Boolean, JSON)
and no backend-specific defaults, so the same metadata creates the SQLite file today and a
PostgreSQL schema later. Times are integer milliseconds since the Unix epoch (UTC): no
time-zone handling differs between backends.
"""

from __future__ import annotations

import sqlalchemy as sa

#: The ``meta`` table's ``schema_version``: what pre-Alembic servers check (they refuse a
#: higher one). Alembic revisions track every change since version 8; see above.
SCHEMA_VERSION = 8

metadata = sa.MetaData()


def _ms(name: str, *, nullable: bool = False) -> sa.Column[int]:
    """An epoch-milliseconds column."""
    return sa.Column(name, sa.BigInteger, nullable=nullable)


def _log_id() -> sa.Column[int]:
    """The id of an append-only log (events, audit): 64 bits on PostgreSQL, where a 32-bit
    serial runs out after 2**31 rows (about 25 days at 1,000 events/s); SQLite's INTEGER
    PRIMARY KEY is its 64-bit rowid already (and only that exact type is the rowid)."""
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                     primary_key=True, autoincrement=True)


meta = sa.Table(
    "meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(256), nullable=False),
)

products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("slug", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("platform_id", sa.Integer, nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    # Product-level "force updates" (the next issues use it; devices also have their own flag).
    sa.Column("firmware_updates_forced", sa.Boolean, nullable=False, default=False),
    _ms("created_at"),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("id", sa.String(24), primary_key=True),  # 24 lowercase hex digits
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(200), nullable=True),
    sa.Column("notes", sa.Text, nullable=False, default=""),
    sa.Column("development", sa.Boolean, nullable=False, default=False),
    sa.Column("desired_firmware_version", sa.Integer, nullable=True),  # lock; NULL = unlocked
    sa.Column("flash_requested", sa.Boolean, nullable=False, default=False),  # "flash now"
    sa.Column("firmware_updates_forced", sa.Boolean, nullable=False, default=False),
    sa.Column("firmware_updates_enabled", sa.Boolean, nullable=False, default=True),
    sa.Column("updates_pending", sa.Boolean, nullable=False, default=False),
    sa.Column("reset_pending", sa.Boolean, nullable=False, default=False),
    sa.Column("online", sa.Boolean, nullable=False, default=False),
    # The live session that set ``online`` ("<process origin>/<serial>"): only that session
    # may clear it, so an old session ending after the device reconnected (maybe to another
    # server process) does not mark a live device offline. Ordered by bytes (collation "C"
    # on PostgreSQL, revision 0010; SQLite's default BINARY is that already): a process
    # finds its sessions as the owner range ["<origin>/", "<origin>0") of the index below,
    # which a language collation would break (it may ignore the "/").
    sa.Column("session_owner",
              sa.String(96).with_variant(sa.String(96, collation="C"), "postgresql"),
              nullable=True),
    # The node whose process holds that session (``--node-id``), and until when (epoch ms):
    # the session's lease. Each process of the node renews the leases of its sessions in one
    # UPDATE per period, by node and owner range (hence their index); a lease past its time
    # is free, and the installation's sweeper marks its device offline (server.leases).
    sa.Column("session_node", sa.String(64), nullable=True),
    _ms("session_lease_until", nullable=True),
    sa.Column("certs_revoked", sa.Boolean, nullable=False, default=False),
    sa.Column("last_ip_address", sa.String(64), nullable=True),
    _ms("last_handshake_at", nullable=True),
    _ms("last_heard_at", nullable=True),
    sa.Column("platform_id", sa.Integer, nullable=True),  # as reported in the hello
    sa.Column("firmware_version", sa.Integer, nullable=True),  # product version it runs
    sa.Column("system_version", sa.Integer, nullable=True),  # Device OS version it runs
    sa.Column("modules", sa.JSON, nullable=True),  # last describe: list of module dicts
    _ms("created_at"),
    _ms("updated_at"),
    # How the device's last update ended (revision 0005): "started", "succeeded" or
    # "failed" with the device's reason, and when; the console's "update status" reads it
    # (server.store.device_status).
    sa.Column("last_update_status", sa.String(16), nullable=True),
    sa.Column("last_update_error", sa.Text, nullable=True),
    _ms("last_update_at", nullable=True),
)
sa.Index("ix_devices_product", devices.c.product_id, devices.c.id)
# The device list's version filter (revision 0005).
sa.Index("ix_devices_product_version", devices.c.product_id, devices.c.firmware_version)
# A process's session leases (revision 0010; before, ``ix_devices_session_node`` alone made
# each of a node's K processes read all the node's rows to renew its own, K times the node
# per period): node, then owner, so one process reads its owner range only. It serves the
# node-only lookups too (a node's start releasing its previous incarnation's leases).
sa.Index("ix_devices_session_node_owner", devices.c.session_node, devices.c.session_owner)

groups = sa.Table(
    "groups",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(100), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("color", sa.String(16), nullable=False, default=""),
    _ms("created_at"),
    sa.UniqueConstraint("product_id", "name", name="uq_groups_product_name"),
)

device_groups = sa.Table(
    "device_groups",
    metadata,
    sa.Column(
        "device_id",
        sa.String(24),
        sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "group_id", sa.Integer, sa.ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    ),
)
sa.Index("ix_device_groups_group", device_groups.c.group_id)

firmware = sa.Table(
    "firmware",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("title", sa.String(200), nullable=False),
    sa.Column("description", sa.Text, nullable=False, default=""),
    sa.Column("filename", sa.String(200), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),  # names the blob
    sa.Column("platform_id", sa.Integer, nullable=False),
    sa.Column("module_function", sa.Integer, nullable=False),
    sa.Column("module_index", sa.Integer, nullable=False),
    sa.Column("module_version", sa.Integer, nullable=False),
    sa.Column("module_info", sa.JSON, nullable=False),
    sa.Column("uploaded_by", sa.String(200), nullable=False),
    _ms("uploaded_at"),
    # First time a device's Describe reported running exactly this image (its SHA-256).
    _ms("running_seen_at", nullable=True),
    sa.UniqueConstraint("product_id", "version", name="uq_firmware_product_version"),
)
# A product's firmware by image (schema version 7): a Describe's reported SHA-256 and a
# device's download of ``fw/<sha256>`` each look one up.
sa.Index("ix_firmware_product_sha256", firmware.c.product_id, firmware.c.sha256)

# Device OS modules (system parts, bootloaders, radio stacks...) the server can send ahead of
# an application that depends on them. Shared by every product of the platform.
system_modules = sa.Table(
    "system_modules",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("platform_id", sa.Integer, nullable=False),
    sa.Column("module_function", sa.Integer, nullable=False),
    sa.Column("module_index", sa.Integer, nullable=False),
    sa.Column("module_version", sa.Integer, nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),  # names the blob
    sa.Column("module_info", sa.JSON, nullable=False),
    sa.Column("uploaded_by", sa.String(200), nullable=False),
    _ms("uploaded_at"),
    sa.UniqueConstraint(
        "platform_id", "module_function", "module_index", "module_version",
        name="uq_system_module",
    ),
)
sa.Index("ix_system_modules_platform_sha256", system_modules.c.platform_id,
         system_modules.c.sha256)  # schema version 7: fw/<sha256> downloads

# One row per release scope: "product" (the product default) or "group:<group id>".
releases = sa.Table(
    "releases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("scope", sa.String(64), nullable=False),
    sa.Column(
        "group_id", sa.Integer, sa.ForeignKey("groups.id", ondelete="CASCADE"), nullable=True
    ),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("intelligent", sa.Boolean, nullable=False, default=False),
    _ms("released_at"),
    sa.Column("released_by", sa.String(200), nullable=False),
    # Counters the OTA issues fill in.
    sa.Column("devices_started", sa.Integer, nullable=False, default=0),
    sa.Column("devices_succeeded", sa.Integer, nullable=False, default=0),
    sa.Column("devices_failed", sa.Integer, nullable=False, default=0),
    sa.UniqueConstraint("product_id", "scope", name="uq_releases_product_scope"),
)

# A pending or finished per-device flash: product firmware ("flash now" after a lock) or a
# binary uploaded for one development device.
device_flashes = sa.Table(
    "device_flashes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "device_id", sa.String(24), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("kind", sa.String(16), nullable=False),  # "binary" or "product"
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size", sa.Integer, nullable=False),
    sa.Column("filename", sa.String(200), nullable=False, default=""),
    sa.Column("module_info", sa.JSON, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),  # pending/started/succeeded/failed
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("requested_by", sa.String(200), nullable=False),
    _ms("requested_at"),
    _ms("finished_at", nullable=True),
)
sa.Index("ix_device_flashes_device", device_flashes.c.device_id, device_flashes.c.status)

# The update in flight to a device (one at a time), for progress reporting and resume.
device_updates = sa.Table(
    "device_updates",
    metadata,
    sa.Column(
        "device_id",
        sa.String(24),
        sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),
    sa.Column("transfer", sa.String(8), nullable=False),  # "full", "zstd" or "delta"
    sa.Column("bytes_done", sa.BigInteger, nullable=False, default=0),
    sa.Column("bytes_total", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    _ms("started_at"),
    _ms("updated_at"),
)

# How each update of a device ended (issue 17): one row per success or failure the server
# recorded (``UpdateReportService.flash_status_work``), so a release's progress shows its
# failures with their reasons and its update-latency curve (time from the release to each
# device's success). Append-only; a device's removal removes its rows.
device_update_results = sa.Table(
    "device_update_results",
    metadata,
    _log_id(),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column(
        "device_id", sa.String(24), sa.ForeignKey("devices.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("version", sa.Integer, nullable=True),  # product firmware; NULL: a binary flash
    sa.Column("sha256", sa.String(64), nullable=True),  # the application image, when known
    sa.Column("kind", sa.String(16), nullable=False),  # release, lock, flash or other
    sa.Column("result", sa.String(8), nullable=False),  # success or failed
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("transfer", sa.String(8), nullable=True),  # full, zstd or delta, when known
    _ms("started_at", nullable=True),  # the transfer's start, when known
    _ms("finished_at"),
)
sa.Index("ix_device_update_results_version", device_update_results.c.product_id,
         device_update_results.c.version, device_update_results.c.device_id)
sa.Index("ix_device_update_results_device", device_update_results.c.device_id,
         device_update_results.c.id)

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("username", sa.String(200), nullable=False, unique=True),
    sa.Column("password_hash", sa.String(300), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("disabled", sa.Boolean, nullable=False, default=False),
    _ms("created_at"),
)

oauth_clients = sa.Table(
    "oauth_clients",
    metadata,
    sa.Column("client_id", sa.String(100), primary_key=True),
    sa.Column("secret_hash", sa.String(300), nullable=False),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    _ms("created_at"),
)

# Only SHA-256 hashes of tokens are stored; the token itself is shown once.
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # "access" or "refresh"
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("subject", sa.String(200), nullable=False),  # who: user name, client id, label
    sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=True),
    sa.Column("client_id", sa.String(100), nullable=True),
    sa.Column("pair_hash", sa.String(64), nullable=True),  # refresh <-> access partner
    _ms("created_at"),
    _ms("expires_at", nullable=True),
    _ms("revoked_at", nullable=True),
)

# Product teams (Particle's "team"): a user's role on one product, on top of the user's
# installation role (``users.role``; "none" grants nothing by itself).
product_members = sa.Table(
    "product_members",
    metadata,
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column("role", sa.String(32), nullable=False),  # administrator/developer/support/viewer
    sa.Column("invited_by", sa.String(200), nullable=False),
    _ms("created_at"),
)
sa.Index("ix_product_members_user", product_members.c.user_id)

# API users (Particle's programmatic users): a ``users`` row without a usable password, bound
# to one product with an explicit list of scopes; one live access token at a time.
api_users = sa.Table(
    "api_users",
    metadata,
    sa.Column(
        "user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    ),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("friendly_name", sa.String(200), nullable=False),
    sa.Column("scopes", sa.JSON, nullable=False),  # sorted list of scope names
    sa.Column("created_by", sa.String(200), nullable=False),
    _ms("created_at"),
)
sa.Index("ix_api_users_product", api_users.c.product_id)

audit_log = sa.Table(
    "audit_log",
    metadata,
    _log_id(),
    _ms("at"),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("product_id", sa.Integer, nullable=True),
    sa.Column("target", sa.String(200), nullable=False, default=""),
    sa.Column("details", sa.JSON, nullable=False),
)
sa.Index("ix_audit_product", audit_log.c.product_id, audit_log.c.id)
# One device's (or group's...) entries, newest first: the console's device history
# (revision 0005).
sa.Index("ix_audit_target", audit_log.c.target, audit_log.c.id)

# Binary delta patches between two images, computed once per (base, target) pair and format
# version (the newest the maker was held to: what the devices' appliers read, revision 0008)
# and reused for every device on that base; the patch bytes are the blob ``patch_sha256``.
deltas = sa.Table(
    "deltas",
    metadata,
    sa.Column("base_sha256", sa.String(64), primary_key=True),
    sa.Column("target_sha256", sa.String(64), primary_key=True),
    sa.Column("format_version", sa.Integer, primary_key=True, server_default="4"),
    sa.Column("patch_sha256", sa.String(64), nullable=False),  # names the blob
    sa.Column("patch_size", sa.Integer, nullable=False),
    sa.Column("target_size", sa.Integer, nullable=False),
    _ms("created_at"),
)

# Blobs kept in the database (PostgreSQL: server.store.db_blobs; SQLite keeps them in the
# blob directory and leaves these empty): one row per blob, its bytes in chunk rows, each
# chunk with its own SHA-256 so a block read is verified without reading the whole blob.
blobs = sa.Table(
    "blobs",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),  # of the whole blob: its name
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("chunk_size", sa.Integer, nullable=False),
    _ms("stored_at"),  # the last put: the sweep's grace period counts from it
)

blob_chunks = sa.Table(
    "blob_chunks",
    metadata,
    sa.Column("sha256", sa.String(64), sa.ForeignKey("blobs.sha256"), primary_key=True),
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),  # bytes n*chunk_size..
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Column("digest", sa.String(64), nullable=False),  # SHA-256 of ``data``
)

# Bytes sent per firmware version against the bytes full images would have taken: the data a
# release saved by sending deltas. Updated when a transfer completes.
firmware_transfer_bytes = sa.Table(
    "firmware_transfer_bytes",
    metadata,
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("bytes_sent", sa.BigInteger, nullable=False, default=0),
    sa.Column("bytes_full", sa.BigInteger, nullable=False, default=0),
    sa.Column("delta_transfers", sa.Integer, nullable=False, default=0),
    sa.Column("full_transfers", sa.Integer, nullable=False, default=0),
    # Full images sent zstd-compressed (schema version 2; counted apart from full_transfers).
    sa.Column("compressed_transfers", sa.Integer, nullable=False, default=0),
)

# Events every server process publishes, so the processes sharing one store see each other's
# (a release or flash command reaches the process holding the device; devices' events reach
# every API's subscribers). Append-only, read by id > last seen, pruned by age.
event_log = sa.Table(
    "event_log",
    metadata,
    _log_id(),
    sa.Column("origin", sa.String(64), nullable=False),  # the publishing process
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("data", sa.Text, nullable=True),
    sa.Column("product_id", sa.Integer, nullable=True),
    sa.Column("device_id", sa.String(24), nullable=True),
    sa.Column("coreid", sa.String(64), nullable=False),
    sa.Column("ttl", sa.Integer, nullable=False),
    sa.Column("public", sa.Boolean, nullable=False, default=False),
    _ms("published_at"),
    # Who published it (server.events.EventSource: cloud, device or api; schema version 7):
    # the other processes' listeners act on the cloud's own events only.
    sa.Column("source", sa.String(16), nullable=False, default="device"),
    # Ids never come back after pruning (readers page by id > last seen).
    sqlite_autoincrement=True,
)

# The stored event history (issue 17: the console's device page and events page show it):
# every event about a device or a product, recorded once per installation by the process
# where it was published (server.event_history), bounded by age and rows per device.
event_history = sa.Table(
    "event_history",
    metadata,
    _log_id(),
    sa.Column("name", sa.String(200), nullable=False),
    # At most Particle's 1,024 bytes of event data (longer cloud data is cut: data_cut).
    sa.Column("data", sa.Text, nullable=True),
    sa.Column("data_cut", sa.Boolean, nullable=False, default=False),
    # No foreign keys: a device or product deleted meanwhile must not fail a whole batch;
    # its rows go with the retention.
    sa.Column("product_id", sa.Integer, nullable=True),
    sa.Column("device_id", sa.String(24), nullable=True),
    sa.Column("coreid", sa.String(64), nullable=False),
    sa.Column("ttl", sa.Integer, nullable=False),
    sa.Column("public", sa.Boolean, nullable=False, default=False),
    _ms("published_at"),
    sa.Column("source", sa.String(16), nullable=False, default="device"),
    # "a device's events newest first" and "a product's events newest first".
    sa.Index("ix_event_history_device", "device_id", "product_id", "id"),
    sa.Index("ix_event_history_product", "product_id", "id"),
    sa.Index("ix_event_history_published", "published_at"),
)

# What the OTA engine remembers per device between sessions, so it survives a restart and
# follows the device to whichever server process holds its next session.
device_ota_memory = sa.Table(
    "device_ota_memory",
    metadata,
    sa.Column(
        "device_id",
        sa.String(24),
        sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # The application the update in progress ends with ("started" is reported once).
    sa.Column("updating_sha256", sa.String(64), nullable=True),
    # The image last staged on the device, whose boot result is still to come.
    sa.Column("delivered_sha256", sa.String(64), nullable=True),
    sa.Column("delivered_final", sa.Boolean, nullable=False, default=False),
    sa.Column("delivered_awaited", sa.Boolean, nullable=False, default=False),
    # Images the device refused or rolled back from: not offered to it again until an
    # operator flashes or locks it anew. A JSON list of SHA-256 hex strings, newest last.
    sa.Column("refused", sa.JSON, nullable=False),
    _ms("updated_at"),
)

# Every device certificate the server knows: issued by the installation CA (``ota device
# provision``) or presented at a handshake. A revocation revokes certificates, not device
# rows: no foreign key to ``devices``, so removing a device and importing it again keeps
# its certificates and their revocation (issue 13).
device_certificates = sa.Table(
    "device_certificates",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),  # of the DER certificate
    sa.Column("serial", sa.String(40), nullable=False),  # hex; RFC 5280 allows 20 octets
    sa.Column("device_id", sa.String(24), nullable=False),
    _ms("not_after"),
    _ms("issued_at", nullable=True),  # NULL: not issued through this server
    _ms("first_seen_at", nullable=True),  # first handshake presenting it
    _ms("revoked_at", nullable=True),
    sa.Column("revoked_by", sa.String(200), nullable=True),
)
sa.Index("ix_device_certificates_device", device_certificates.c.device_id)
sa.Index("ix_device_certificates_serial", device_certificates.c.serial)

# Devices whose certificates were revoked: from then on only certificates issued *after* the
# revocation (re-provisioning) are accepted for the device, so a certificate the server had
# never recorded cannot bring it back either. Removed only by an explicit reinstate.
device_revocations = sa.Table(
    "device_revocations",
    metadata,
    sa.Column("device_id", sa.String(24), primary_key=True),
    _ms("revoked_at"),
    sa.Column("revoked_by", sa.String(200), nullable=False),
)

# --- safe rollouts (issue 15): new tables only (part of revision 0001).

# A rollout of one firmware version to a product's default target set (``groups`` empty) or
# to groups. ``plan``/``criteria`` are the policy's phase plan and thresholds as data (for
# listings); ``state_data`` is the whole sans-IO state machine (otacore.rollout.Rollout
# .to_dict), from which a restart resumes exactly.
rollouts = sa.Table(
    "rollouts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("groups", sa.JSON, nullable=False),  # sorted group names; [] = product default
    sa.Column("immediate", sa.Boolean, nullable=False, default=False),
    sa.Column("plan", sa.JSON, nullable=False),
    sa.Column("criteria", sa.JSON, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),  # scheduled|running|paused|...
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("state_data", sa.JSON, nullable=False),
    sa.Column("forced", sa.Boolean, nullable=False, default=False),
    sa.Column("created_by", sa.String(200), nullable=False),
    _ms("created_at"),
    _ms("updated_at"),
)
sa.Index("ix_rollouts_product_version", rollouts.c.product_id, rollouts.c.version)

# Each device's latest outcome in a rollout (mirrors the state machine's per-device state,
# queryable per device: "which rollout is this device in, and how did it go").
rollout_device_outcomes = sa.Table(
    "rollout_device_outcomes",
    metadata,
    sa.Column(
        "rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column(
        "device_id", sa.String(24), sa.ForeignKey("devices.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("phase", sa.Integer, nullable=False),  # 0-based
    sa.Column("outcome", sa.String(24), nullable=True),  # None: placed, nothing yet
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    _ms("held_until"),  # 0: not held
    _ms("updated_at"),
)
sa.Index("ix_rollout_device_outcomes_device", rollout_device_outcomes.c.device_id)

# What happened to a rollout (phase started/advanced, paused, resumed, aborted, threshold
# crossed...), with who and why: what ``rollout show`` lists.
rollout_events = sa.Table(
    "rollout_events",
    metadata,
    _log_id(),
    sa.Column(
        "rollout_id", sa.Integer, sa.ForeignKey("rollouts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    _ms("at"),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("phase", sa.Integer, nullable=True),
    sa.Column("actor", sa.String(200), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("data", sa.JSON, nullable=False),
)
sa.Index("ix_rollout_events_rollout", rollout_events.c.rollout_id, rollout_events.c.id)

# Maintenance windows of a product ("product") or of one group ("group:<group id>"), like
# the releases' scopes (a unique scope: SQLite lets NULL group ids repeat in a unique key).
maintenance_windows = sa.Table(
    "maintenance_windows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("scope", sa.String(64), nullable=False),
    sa.Column(
        "group_id", sa.Integer, sa.ForeignKey("groups.id", ondelete="CASCADE"), nullable=True
    ),
    sa.Column("cron", sa.String(200), nullable=False),
    sa.Column("duration_minutes", sa.Integer, nullable=False),
    sa.Column("timezone", sa.String(64), nullable=False),
    sa.Column("updated_by", sa.String(200), nullable=False),
    _ms("updated_at"),
    sa.UniqueConstraint("product_id", "scope", name="uq_maintenance_windows_product_scope"),
)

#: Named leases of once-per-installation jobs (the rollout ticker, the event log pruning,
#: the sweeper of expired session leases): only the node holding a job's lease runs it; a
#: lease not renewed by ``expires_at`` (epoch ms) may be taken by another node.
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(96), nullable=False),
    _ms("expires_at"),
    _ms("taken_at"),
)


# --- products' firmware signing keys (revision 0009): in the store, so that every node of
# an installation signs with the same key and sees a rotation or withdrawal at once.

#: Each key a product ever had: the private key sealed (AES-256-GCM) under the key-encryption
#: key of the data directory (server.devices.key_vault), never in clear. ``is_current`` is
#: True on the key the product signs with and NULL on every other: the UNIQUE constraint
#: over (product_id, is_current) then admits one current key per product (NULLs never
#: collide, on SQLite and PostgreSQL alike) without a partial index.
product_signing_keys = sa.Table(
    "product_signing_keys",
    metadata,
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("key_id", sa.String(16), primary_key=True),
    sa.Column("public_key", sa.LargeBinary, nullable=False),
    # nonce (12 bytes) + AES-256-GCM(kek, nonce, private key, aad = product id + key id).
    sa.Column("sealed_private_key", sa.LargeBinary, nullable=False),
    # Which key-encryption key sealed it (a fingerprint, never the key): a node holding
    # another one says so instead of failing to decrypt.
    sa.Column("kek_id", sa.String(16), nullable=False),
    sa.Column("is_current", sa.Boolean, nullable=True),
    # The statement that withdrew the key (NULL while devices trust it).
    sa.Column("withdrawn_sequence", sa.Integer, nullable=True),
    _ms("created_at"),
    sa.UniqueConstraint("product_id", "is_current", name="uq_product_signing_keys_current"),
)

#: The product's key rotation statements (otacore.signing), statement N at sequence N: the
#: primary key makes two rotations that read the same statements conflict in the database
#: (one commits, the other gets a conflict and reads again), whichever nodes run them.
product_key_statements = sa.Table(
    "product_key_statements",
    metadata,
    sa.Column(
        "product_id", sa.Integer, sa.ForeignKey("products.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("sequence", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("statement", sa.LargeBinary, nullable=False),
    _ms("created_at"),
)
