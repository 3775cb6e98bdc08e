"""The schema of ``ota server --config FILE``: every TOML section and key, the dataclass
field each sets, the CLI option that sets it too, and what each means.

One table (:data:`SETTINGS`) drives the loader (:mod:`server.config_file`), ``ota server
--print-config`` and the README's settings table, so none of them can miss a setting. A
setting's description is its field's ``#:`` comment in the dataclass that owns it (or the
trailing comment), unless the table gives one.

:data:`DERIVED` names the fields of the reachable configuration dataclasses that are not
settings of their own, and where their value comes from; a test checks that every field of
every dataclass reachable from :class:`ServerConfig`, :class:`DevicePlaneConfig` and
:class:`DeviceServerConfig` is a setting, a nested section, or derived.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import MISSING, dataclass, fields
from typing import Any

from otacore.transfer import RetransmitPolicy
from server.api import ApiSettings
from server.app import ServerConfig
from server.devices.delivery import OtaConfig
from server.devices.plane import DevicePlaneConfig
from server.devices.tuning import DeviceTuning
from server.event_history import HistorySettings
from server.gc_tuning import CollectorSettings
from server.relay import RelaySettings
from server.transport import SessionLimits
from server.transport.server import DeviceServerConfig

#: The dataclasses settings go to, by the name :class:`Setting` uses for them.
TARGETS: dict[str, type] = {
    "server": ServerConfig,
    "api": ApiSettings,
    "sessions": SessionLimits,
    "ota": OtaConfig,
    "retransmit": RetransmitPolicy,
    "devices": DeviceTuning,
    "relay": RelaySettings,
    "collector": CollectorSettings,
    "history": HistorySettings,
}


@dataclass(frozen=True)
class Setting:
    """One key of the configuration file."""

    section: str
    key: str
    #: Which dataclass (a key of TARGETS) and which of its fields the key sets.
    target: str
    field: str
    #: The dedicated ``ota server`` option that sets it too (``--set SECTION.KEY=VALUE``
    #: sets every setting).
    flag: str | None = None
    #: Description, for a field without a comment of its own.
    doc: str | None = None
    #: For a field that may be None: the file value that means None (None: leave the key
    #: out), and what None means.
    none_value: int | None = None
    none_means: str | None = None
    #: True when the built-in default is None (``none_means``), whatever the field's own.
    unset_by_default: bool = False

    @property
    def name(self) -> str:
        """``section.key``, as ``--set`` and error messages spell it."""
        return f"{self.section}.{self.key}"


def _same_names(section: str, target: str, names: str, **flags: str) -> list[Setting]:
    """Settings whose keys are their fields' names (``flags``: key -> option)."""
    return [Setting(section, name, target, name, flag=flags.get(name)) for name in names.split()]


def _sessions() -> list[Setting]:
    dedicated = {"idle_timeout": "--idle-timeout", "handshake_timeout": "--handshake-timeout",
                 "max_sessions": "--max-sessions"}
    docs = {
        "message_burst": "DTLS: datagrams a device may send at once above its rate.",
        "byte_burst": "TLS: bytes a device may send at once above its rate.",
        "ipv6_prefix_length": "IPv6 sources are counted per prefix of this length (a host "
        "usually owns a whole /64, RFC 4291 section 2.5.4); the API's sign-in limits group "
        "client addresses the same way.",
        "ipv6_network_prefix_length": "IPv6 sources are also counted, together, per network "
        "of this length (a site gets a /48 or /56, RFC 6177): one site cannot pass for "
        "thousands of addresses. Set it to ipv6_prefix_length to count per prefix only.",
    }
    return [Setting("sessions", item.name, "sessions", item.name,
                    flag=dedicated.get(item.name, f"--device-limit {item.name}=N"),
                    doc=docs.get(item.name))
            for item in fields(SessionLimits)]


#: Every setting, in the order ``--print-config`` and the README list them.
SETTINGS: tuple[Setting, ...] = (
    Setting("server", "data_dir", "server", "data_dir", flag="--data",
            doc="Data directory: the embedded store, its firmware blobs (PostgreSQL keeps them "
            "in the database), keys and the device CA "
            "(created on first use; a relative path is taken from the working directory)."),
    Setting("server", "db_url", "server", "db_url", flag="--db-url",
            doc="SQLAlchemy database URL instead of the embedded SQLite file (--db-url, "
            "else the environment variable OTA_DB_URL; every ota command that takes --data "
            "reads them too).",
            none_means="the embedded SQLite file ota.db in data_dir"),
    Setting("server", "workers", "server", "workers", flag="--workers",
            doc="Server processes serving devices on the shared ports and store (0: one per "
            "CPU when device listeners are on, else 1).", none_value=0,
            none_means="one per CPU with device listeners, else 1", unset_by_default=True),
    Setting("server", "store_threads", "server", "store_threads"),
    Setting("server", "blob_cache_mb", "server", "blob_cache_mb"),
    Setting("server", "blob_sweep_grace", "server", "blob_sweep_grace"),
    Setting("server", "event_buffer", "server", "event_buffer",
            doc="Events queued per subscriber of the in-process event bus; a subscriber that "
            "falls further behind is dropped (and resubscribes)."),
    Setting("server", "max_event_subscribers", "server", "max_event_subscribers",
            doc="Subscribers of the event bus at once (event streams of the API among them); "
            "more are refused (503)."),
    Setting("server", "worker_stop_grace", "server", "worker_stop_grace"),
    Setting("api", "host", "server", "host", flag="--host",
            doc="Address the REST API listens on (and the device listeners, unless "
            "devices.host is set)."),
    Setting("api", "port", "server", "api_port", flag="--api-port",
            doc="REST API port (0 picks a free one)."),
    Setting("api", "graceful_timeout", "server", "graceful_timeout",
            doc="Seconds a graceful shutdown lets API requests in progress finish."),
    Setting("api", "keep_alive_timeout", "server", "http_keep_alive_timeout"),
    Setting("api", "cert", "server", "api_cert", flag="--api-cert",
            doc="PEM file of the certificate chain the API port serves HTTPS with (the "
            "server's certificate first, then any intermediate CA certificates; `ota admin "
            "api-cert` issues one from the installation CA). Needs api.key.",
            none_means="plain HTTP"),
    Setting("api", "key", "server", "api_key", flag="--api-key",
            doc="PEM file of the certificate's private key (unencrypted; refused when every "
            "user may read it).", none_means="plain HTTP"),
    Setting("api", "tls_handshake_timeout", "server", "tls_handshake_timeout"),
    Setting("api", "forwarded_allow_ips", "server", "forwarded_allow_ips",
            flag="--forwarded-allow-ips",
            doc="Addresses or networks of reverse proxies whose X-Forwarded-For and "
            "X-Forwarded-Proto headers name the client (for the sign-in limits); \"*\" trusts "
            "every peer. Empty: the TCP peer is the client, and those headers are ignored."),
    *_same_names("api", "api", "max_upload_bytes max_json_bytes body_timeout_seconds "
                 "sse_keepalive_seconds sse_send_timeout_seconds sse_buffer"),
    Setting("api", "max_upload_bytes", "api", "max_upload_bytes",
            doc="Largest request body of a firmware upload, bytes (the largest application "
            "module plus the form's overhead)."),
    Setting("api", "max_json_bytes", "api", "max_json_bytes",
            doc="Largest JSON or form request body, bytes."),
    Setting("api", "sse_keepalive_seconds", "api", "sse_keepalive_seconds",
            doc="Seconds between keep-alive comments on an idle event stream (SSE)."),
    Setting("api", "sse_send_timeout_seconds", "api", "sse_send_timeout_seconds",
            doc="An event stream whose client takes longer than this to accept an event is "
            "closed."),
    Setting("api", "sse_buffer", "api", "sse_buffer",
            doc="Events queued per event stream for a slow client before it is closed."),
    Setting("sign_in", "password_hash_threads", "api", "password_hash_threads",
            flag="--password-hash-threads"),
    Setting("sign_in", "password_hash_queue", "api", "password_hash_queue",
            flag="--password-hash-queue"),
    Setting("sign_in", "max_failures_per_address", "api", "login_max_failures_per_address",
            flag="--login-max-failures-per-address"),
    Setting("sign_in", "max_failures_per_user", "api", "login_max_failures_per_user",
            flag="--login-max-failures-per-user"),
    Setting("sign_in", "lockout_seconds", "api", "login_lockout_seconds",
            flag="--login-lockout"),
    Setting("sign_in", "first_account_lockout_seconds", "api",
            "login_first_account_lockout_seconds", flag="--login-first-account-lockout"),
    Setting("sign_in", "max_checks_per_address", "api", "login_max_checks_per_address",
            flag="--login-max-checks-per-address"),
    Setting("sign_in", "familiar_addresses", "api", "login_familiar_addresses",
            flag="--login-familiar-addresses"),
    Setting("sign_in", "tracked_keys", "api", "login_tracked_keys",
            flag="--login-tracked-keys"),
    Setting("sign_in", "log_interval", "api", "login_log_interval", flag="--login-log-interval"),
    Setting("sign_in", "refresh_token_seconds", "api", "refresh_token_seconds",
            flag="--refresh-token-lifetime"),
    Setting("sign_in", "console_session_seconds", "api", "console_session_seconds"),
    Setting("devices", "port", "server", "device_port", flag="--device-port",
            doc="TCP (TLS 1.3) and UDP (DTLS 1.2) port for devices (0 picks free ones; -1 "
            "turns the device listeners off).", none_value=-1, none_means="no device listeners"),
    Setting("devices", "host", "server", "device_host", flag="--device-host",
            doc="Address the device listeners bind.", none_means="api.host"),
    *(Setting("devices", item.name, "devices", item.name,
              none_value=0 if item.name == "udp_buffer_bytes" else None,
              none_means="the system default" if item.name == "udp_buffer_bytes" else None)
      for item in fields(DeviceTuning)),
    *_sessions(),
    *_same_names("delivery", "ota", "max_concurrent_transfers offer_timeout describe_wait "
                 "result_wait record_timeout prepared_cache image_cache delta_max_ratio "
                 "delta_threads delta_threads_per_patch delta_effort delta_codec "
                 "delta_format_version "
                 "compressed_max_ratio downgrades downgrade_lifetime",
                 max_concurrent_transfers="--max-concurrent-transfers",
                 delta_effort="--delta-effort", delta_codec="--delta-codec",
                 delta_threads_per_patch="--delta-threads-per-patch",
                 delta_format_version="--delta-format-version",
                 downgrades="--downgrades", downgrade_lifetime="--downgrade-lifetime"),
    *_same_names("transfer", "ota", "udp_chunk_size tcp_chunk_size window_limit",
                 window_limit="--window-limit"),
    Setting("transfer", "attempts", "ota", "transfer_attempts", flag="--transfer-attempts"),
    *_same_names("transfer", "ota", "retry_pause retry_later retry_later_max progress_step "
                 "progress_interval"),
    Setting("transfer", "progress_interval", "ota", "progress_interval",
            doc="Persist transfer progress at most once per this many seconds per transfer "
            "(the final bytes are recorded with the \"applying\" state, not as progress)."),
    Setting("transfer", "retry_later_max", "ota", "retry_later_max",
            doc="Longest pause between those later offers (the pause doubles up to it)."),
    *_same_names("transfer", "retransmit", "congestion_control initial_cwnd initial_rto "
                 "min_rto max_rto max_rounds max_ack_delay",
                 congestion_control="--congestion-control / --no-congestion-control"),
    *_same_names("relay", "relay", " ".join(item.name for item in fields(RelaySettings))),
    *_same_names("events", "history", " ".join(item.name for item in fields(HistorySettings))),
    *_same_names("garbage_collector", "collector",
                 " ".join(item.name for item in fields(CollectorSettings))),
    Setting("rollouts", "tick_interval", "server", "rollout_tick_interval",
            doc="Seconds between ticks of the active rollouts: scheduled rollouts and phases "
            "start, phase waits end and devices that did not come back from their reboot "
            "time out by time alone (the main server process ticks them)."),
    Setting("cluster", "node_id", "server", "node_id", flag="--node-id",
            doc="This node's name among the server nodes sharing one store (--db-url): part "
            "of every process's origin in the event log and in device sessions, and its "
            "devices' session leases say it; at start the node frees only the leases its "
            "previous run held (the other nodes' devices stay online). Never give two live "
            "nodes one id (1 to 32 letters, digits, '.', '_' or '-').",
            none_means="the host name and the API port (with API port 0: the process id)"),
    Setting("cluster", "session_lease", "server", "session_lease", flag="--session-lease"),
    Setting("cluster", "lease_renew_interval", "server", "lease_renew_interval",
            flag="--lease-renew-interval"),
    Setting("metrics", "public", "api", "metrics_public",
            flag="--metrics-public / --no-metrics-public",
            doc="Serve /metrics on the API port to anyone who reaches it, without a token: "
            "for a private network only (the metrics tell fleet sizes and traffic). Off: a "
            "scrape needs the token of metrics.token_file, or an owner's or administrator's "
            "token."),
    Setting("metrics", "token_file", "api", "metrics_token_file", flag="--metrics-token-file",
            doc="A file holding the token Prometheus scrapes /metrics with (its "
            "authorization credentials_file holds the same token): one line of at least 16 "
            "characters, e.g. from openssl rand -hex 32; read again whenever it changes, so "
            "it can be rotated without a restart.",
            none_means="only owner and administrator tokens may scrape"),
    Setting("logging", "level", "server", "log_level", flag="--log-level",
            doc="Least severe log records written to stderr, in every server process: debug, "
            "info, warning or error."),
    Setting("logging", "format", "server", "log_format", flag="--log-format",
            doc="Log line format of every server process: text, or json (one JSON object "
            "per line with ts, level, logger, message, origin and the event's fields)."),
)


def _dedupe(settings: tuple[Setting, ...]) -> tuple[Setting, ...]:
    """Later entries of the same key replace earlier ones in place (a doc override)."""
    by_name: dict[str, Setting] = {}
    for setting in settings:
        by_name[setting.name] = setting
    return tuple(by_name.values())


SETTINGS = _dedupe(SETTINGS)

#: Sections in file order.
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(setting.section for setting in SETTINGS))

#: Settings by section, then key.
BY_SECTION: dict[str, dict[str, Setting]] = {
    section: {s.key: s for s in SETTINGS if s.section == section} for section in SECTIONS
}

#: Fields of nested configuration dataclasses: their settings are a section of their own.
NESTED: dict[tuple[type, str], str] = {
    (ServerConfig, "api"): "[api] and [sign_in]",
    (ServerConfig, "device_limits"): "[sessions]",
    (ServerConfig, "ota"): "[delivery] and [transfer]",
    (ServerConfig, "device_tuning"): "[devices]",
    (ServerConfig, "relay"): "[relay]",
    (ServerConfig, "collector"): "[garbage_collector]",
    (ServerConfig, "history"): "[events]",
    (OtaConfig, "transfer_policy"): "[transfer]",
    (DevicePlaneConfig, "limits"): "[sessions]",
    (DevicePlaneConfig, "tuning"): "[devices]",
    (DeviceServerConfig, "limits"): "[sessions]",
}

#: Fields that are not settings of their own, and where their value comes from.
DERIVED: dict[tuple[type, str], str] = {
    (ApiSettings, "ipv6_prefix_length"): "sessions.ipv6_prefix_length (the API groups "
    "client addresses as the device listeners do)",
    (DevicePlaneConfig, "data_dir"): "server.data_dir",
    (DevicePlaneConfig, "host"): "devices.host, else api.host",
    (DevicePlaneConfig, "port"): "devices.port",
    (DevicePlaneConfig, "udp_port"): "the port the main process bound (workers)",
    (DevicePlaneConfig, "reuse_port"): "on when server.workers > 1",
    (DevicePlaneConfig, "origin"): "each process's role and pid",
    (DeviceServerConfig, "pki_dir"): "<server.data_dir>/pki",
    (DeviceServerConfig, "host"): "devices.host, else api.host",
    (DeviceServerConfig, "tcp_port"): "devices.port",
    (DeviceServerConfig, "udp_port"): "devices.port",
    (DeviceServerConfig, "reuse_port"): "on when server.workers > 1",
    (DeviceServerConfig, "server_dns_names"): "devices.server_dns_names",
    (DeviceServerConfig, "server_ip_addresses"): "devices.server_ip_addresses",
    (DeviceServerConfig, "dtls_queue_size"): "devices.dtls_queue_size",
    (DeviceServerConfig, "udp_buffer_bytes"): "devices.udp_buffer_bytes",
    (DeviceServerConfig, "save_dtls_sessions"): "devices.save_dtls_sessions",
    (DeviceServerConfig, "saved_session_max_age"): "devices.saved_session_max_age",
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the ``#:`` lines above it, else the comment
    after it on its line ({} when the source cannot be read)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        comment = re.fullmatch(r"\s+#:\s?(.*)", line)
        if comment:
            pending.append(comment.group(1).strip())
            continue
        declared = re.fullmatch(r"    (\w+): [^=#]+(?:=[^#]*)?(?:#\s*(.*))?", line)
        if declared:
            text = " ".join(pending) or (declared.group(2) or "").strip()
            if text:
                docs[declared.group(1)] = text
        pending = []
    return docs


def describe(setting: Setting) -> str:
    """The setting's description (one paragraph)."""
    if setting.doc:
        return setting.doc
    return field_docs(TARGETS[setting.target]).get(setting.field, "")


def field_default(setting: Setting) -> Any:
    """The built-in default of the setting's field (MISSING when it has none)."""
    if setting.unset_by_default:
        return None
    for item in fields(TARGETS[setting.target]):
        if item.name == setting.field:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
    return MISSING
