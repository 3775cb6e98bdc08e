"""Request plumbing shared by the REST endpoints: auth, bounded bodies, errors, coercion.

Errors leave as ``{"ok": false, "error": "..."}`` with the status their class implies. Request
bodies are read with a hard byte limit checked against Content-Length before anything is read
and again while streaming (for chunked bodies), so an oversized upload gets 413 without the
server keeping it (the rest of a refused body up to 16 MiB is read and dropped, so that HTTP/1.1
clients, which send the whole body before reading the answer, see the 413).

Text enters as valid Unicode or not at all: a JSON string or key holding a lone UTF-16
surrogate, urlencoded or multipart text that is not UTF-8, and a URL whose percent-decoded
path or query is not UTF-8 are answered 400 before an endpoint sees them (no store, event
stream or log then meets text it cannot encode).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_to_bytes

import trio
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otacore.errors import (
    AuthError,
    ConflictError,
    ModuleFormatError,
    NotFoundError,
    OtaError,
    PermissionDeniedError,
    StoreError,
    ValidationError,
)
from server.events import TooManySubscribersError
from server.fleet import Actor, Fleet
from server.fleet.auth import DEFAULT_REFRESH_TOKEN_SECONDS, CredentialCheckBusyError
from server.store import ProductRecord, StoreUnavailableError

log = logging.getLogger("ota.api")


class PayloadTooLargeError(ValidationError):
    """The request body is larger than this endpoint accepts."""


class BodyTimeoutError(ValidationError):
    """The client took too long to send its request body."""


@dataclass(frozen=True)
class ApiSettings:
    """Limits and timings of the REST API."""

    max_upload_bytes: int = 2 * 1024 * 1024 + 64 * 1024  # largest app module + form overhead
    max_json_bytes: int = 64 * 1024
    #: A request body must arrive within this time (slow senders hold no slot forever).
    body_timeout_seconds: float = 120.0
    sse_keepalive_seconds: float = 15.0
    sse_send_timeout_seconds: float = 30.0
    sse_buffer: int = 256
    #: Threads that check passwords and client secrets (scrypt), apart from the store's.
    password_hash_threads: int = 2
    #: Checks that may wait for one of those threads; more are answered 503 at once.
    password_hash_queue: int = 64
    #: Failed ``/oauth/token`` attempts from one client address group before it is locked
    #: out (Particle: 10 consecutive failures block an address for 30 minutes).
    login_max_failures_per_address: int = 10
    #: Failed attempts against one user name (or OAuth client id) from address groups it
    #: has not signed in from before, before it is locked for those (progressively).
    login_max_failures_per_user: int = 20
    #: An address group's lockout, the longest account lockout, and how long a key must
    #: stay quiet before its failures are forgotten.
    login_lockout_seconds: float = 1800.0
    #: An account's first lockout; each further failure doubles it (up to the above).
    login_first_account_lockout_seconds: float = 1.0
    #: Sign-ins of one address group checked at once (its share of the hashing queue).
    login_max_checks_per_address: int = 4
    #: Address groups remembered per account as familiar (exempt from its limit).
    login_familiar_addresses: int = 8
    #: Addresses and accounts the failure counters remember (each kind); bounded memory.
    login_tracked_keys: int = 10_000
    #: Sign-in failures and lockouts are logged as one line, then a summary per interval.
    login_log_interval: float = 10.0
    #: IPv6 clients are grouped by this prefix, as the device listeners group them
    #: (``ota server --device-limit ipv6_prefix_length=N`` sets both).
    ipv6_prefix_length: int = 64
    #: Lifetime of refresh tokens issued from now on.
    refresh_token_seconds: int = DEFAULT_REFRESH_TOKEN_SECONDS
    #: Serve /metrics to anyone who reaches the API port, without a token: for a private
    #: network only (the metrics tell fleet sizes and traffic).
    metrics_public: bool = False
    #: A file holding the token Prometheus scrapes /metrics with (its ``authorization:
    #: credentials_file``; at least 16 characters, read again when the file changes);
    #: without it only owner and administrator tokens may scrape.
    metrics_token_file: str | None = None
    #: Lifetime of the access token a console password sign-in issues (the console's
    #: session; "Sign out" revokes it earlier).
    console_session_seconds: int = 12 * 3600

    def __post_init__(self) -> None:
        least: dict[str, float] = {
            "max_upload_bytes": 1024, "max_json_bytes": 1024, "sse_buffer": 1,
            "password_hash_threads": 1, "password_hash_queue": 0,
            "login_max_failures_per_address": 1, "login_max_failures_per_user": 1,
            "login_lockout_seconds": 1, "login_first_account_lockout_seconds": 0.001,
            "login_max_checks_per_address": 1, "login_familiar_addresses": 0,
            "login_tracked_keys": 1, "login_log_interval": 0.001,
            "refresh_token_seconds": 60, "console_session_seconds": 60,
            "body_timeout_seconds": 0.001,
            "sse_keepalive_seconds": 0.001, "sse_send_timeout_seconds": 0.001,
        }
        for name, minimum in least.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= minimum):
                raise ValidationError(f"{name} must be at least {minimum:g}, not {value!r}")
        if self.password_hash_threads > 256:  # threads, each running scrypt
            raise ValidationError(f"password_hash_threads must be at most 256, not "
                                  f"{self.password_hash_threads}")
        if self.console_session_seconds > 10 * 365 * 86400:  # the longest token lifetime
            raise ValidationError("console_session_seconds must be at most ten years")
        if not 1 <= self.ipv6_prefix_length <= 128:
            raise ValidationError("ipv6_prefix_length must be between 1 and 128")


def fleet_of(request: Request) -> Fleet:
    """The fleet service the app was built with."""
    fleet: Fleet = request.app.state.fleet
    return fleet


def settings_of(request: Request) -> ApiSettings:
    """The API settings the app was built with."""
    settings: ApiSettings = request.app.state.settings
    return settings


# --- errors -------------------------------------------------------------------------------------


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    """``{"ok": false, "error": message}`` with ``status``."""
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": 'Bearer realm="ota"'}
    elif status in (408, 413):
        headers = {"Connection": "close"}  # the rest of the body was not (all) read
    elif status == 503:
        headers = {"Retry-After": "2"}
    return JSONResponse({"ok": False, "error": message, **extra}, status, headers=headers)


def status_for(exc: OtaError) -> int:
    """The HTTP status an error class maps to."""
    if isinstance(exc, PayloadTooLargeError):
        return 413
    if isinstance(exc, BodyTimeoutError):
        return 408
    if isinstance(exc, StoreUnavailableError | TooManySubscribersError
                  | CredentialCheckBusyError):
        return 503
    if isinstance(exc, PermissionDeniedError):
        return 403
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, ConflictError):
        return 409
    if isinstance(exc, ValidationError | ModuleFormatError):
        return 400
    return 500


async def ota_error_handler(request: Request, exc: Exception) -> Response:
    """Map OtaError subclasses to their status; internal errors are logged, not leaked."""
    assert isinstance(exc, OtaError)
    status = status_for(exc)
    if status == 500:
        log.error("internal error: %s", exc, exc_info=exc,
                  extra={"event": "store_error" if isinstance(exc, StoreError)
                         else "internal_error", "method": request.method,
                         "path": request.url.path})
        response = error_response(500, "internal error; see the server log")
    else:
        response = error_response(status, str(exc))
    if body_unread(request):
        # Refused before its body was read (e.g. a 403 on an upload): the server drops the
        # connection, so say so (RFC 9112 9.6) and clients do not reuse it.
        response.headers["Connection"] = "close"
    return response


def body_unread(request: Request) -> bool:
    """True when the request has a body no handler read (refused before reading it)."""
    has_body = request.headers.get("content-length", "0") not in ("", "0") or (
        "transfer-encoding" in request.headers
    )
    return has_body and not getattr(request, "_stream_consumed", False)


async def http_error_handler(_request: Request, exc: Exception) -> Response:
    """Starlette's HTTP errors (unknown route, wrong method, bad multipart) as JSON."""
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, str(exc.detail))


async def internal_error_handler(_request: Request, exc: Exception) -> Response:
    """Anything unexpected: 500 with a generic message; details go to the log."""
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal error; see the server log")


# --- auth ---------------------------------------------------------------------------------------


def token_from(request: Request) -> str | None:
    """The access token from ``Authorization: Bearer`` or the ``access_token`` query."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        raise AuthError("the Authorization header must be 'Bearer TOKEN'")
    return request.query_params.get("access_token") or None


def actor_of(request: Request) -> Actor:
    """The identity ``server.api.access`` checked for this request (bound to its product)."""
    actor: Actor = request.state.actor
    return actor


def product_of(request: Request) -> ProductRecord:
    """The product of a product route, resolved and access-checked by ``server.api.access``."""
    product: ProductRecord = request.state.product
    return product


# --- text -----------------------------------------------------------------------------------


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone UTF-16 surrogate (what a JSON ``"\\ud800"`` escape
    decodes to): not Unicode text, so no UTF-8 encoder (SQLite, the event stream, a log
    file) can take it."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _invalid_text(where: str) -> ValidationError:
    return ValidationError(
        f"{where} is not valid Unicode text: it holds a lone UTF-16 surrogate (such as "
        "\\ud800 without its pair); send UTF-8 text"
    )


def refuse_invalid_text(value: object, where: str = "the body") -> None:
    """ValidationError naming the first string in ``value`` (a JSON value: object keys
    included) that holds a lone surrogate."""
    pending: list[tuple[object, str]] = [(value, where)]
    while pending:
        item, path = pending.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                raise _invalid_text(path)
        elif isinstance(item, dict):
            for key, inner in item.items():
                if isinstance(key, str) and has_lone_surrogate(key):
                    raise _invalid_text(f"a field name in {path}")
                pending.append((inner, f"field {key!a}" if path == where
                                else f"{path}[{key!a}]"))
        elif isinstance(item, list):
            pending.extend((inner, f"{path}[{n}]") for n, inner in enumerate(item))


def _url_problem(scope: Scope) -> str | None:
    """Why the request's URL cannot be read as text, or None. Percent-decoded, the path and
    the query must be UTF-8 (RFC 3986 section 2.5); servers otherwise hand the app U+FFFD
    in place of the bytes, or lone surrogates."""
    raw_path = scope.get("raw_path")
    if isinstance(raw_path, bytes):
        if not _utf8_once_decoded(raw_path):
            return "the URL path is not UTF-8 once percent-decoded; percent-encode UTF-8 text"
    elif has_lone_surrogate(scope.get("path", "")):
        return "the URL path is not valid Unicode text; percent-encode UTF-8 text"
    if not _utf8_once_decoded(scope.get("query_string", b"")):
        return "the query string is not UTF-8 once percent-decoded; percent-encode UTF-8 text"
    return None


def _utf8_once_decoded(raw: bytes) -> bool:
    try:
        unquote_to_bytes(raw.decode("latin-1")).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class Utf8UrlMiddleware:
    """Answers 400 to a request whose URL path or query is not UTF-8 text once
    percent-decoded, before any route sees it (path and query parameters are then valid
    Unicode everywhere)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse or pass on one request."""
        if scope["type"] == "http" and (problem := _url_problem(scope)) is not None:
            response = error_response(400, problem)
            response.headers["Connection"] = "close"  # its body, if any, is not read
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


# --- bodies ---------------------------------------------------------------------------------


#: An oversized body up to this size is read and discarded after the refusal, so that the
#: client (which sends its whole body before reading the answer, as HTTP/1.1 clients without
#: "Expect: 100-continue" do) sees the 413 instead of a reset; larger ones are cut off.
DRAIN_LIMIT = 16 * 1024 * 1024
DRAIN_SECONDS = 10.0


async def _discard(chunks: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop the rest of a refused body, within a byte and time budget."""
    with trio.move_on_after(DRAIN_SECONDS):
        async for chunk in chunks:
            budget -= len(chunk)
            if budget < 0:
                return


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing with 413 once it exceeds ``limit`` bytes.

    A declared Content-Length over the limit is refused before any of the body is kept;
    a body without one is counted while it streams in. Nothing beyond ``limit`` is kept.
    """
    declared = request.headers.get("content-length")
    too_large = PayloadTooLargeError(f"the request body exceeds the {limit}-byte limit")
    stream = request.stream()
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):
            raise ValidationError("the Content-Length header is not a number")
        if int(declared) > limit:
            if int(declared) <= DRAIN_LIMIT:
                await _discard(stream, DRAIN_LIMIT)
            raise too_large
    chunks, size = [], 0
    with trio.move_on_after(settings_of(request).body_timeout_seconds) as timer:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await _discard(stream, DRAIN_LIMIT)
                raise too_large
            chunks.append(chunk)
    if timer.cancelled_caught:
        raise BodyTimeoutError("the request body did not arrive in time")
    return b"".join(chunks)


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_multipart(request: Request) -> bool:
    """True when the body is multipart/form-data."""
    return _media_type(request) == "multipart/form-data"


async def body_fields(request: Request, *, limit: int | None = None) -> dict[str, Any]:
    """A JSON object or urlencoded form body as a dict (repeated form keys become lists).

    An empty body is an empty dict. ``access_token`` (Particle clients may send it in the
    body) is dropped.
    """
    raw = await read_body(request, limit or settings_of(request).max_json_bytes)
    media = _media_type(request)
    if not raw.strip():
        fields: dict[str, Any] = {}
    elif media == "application/json" or (media == "" and raw.lstrip()[:1] in (b"{", b"[")):
        try:
            parsed = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise ValidationError(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise ValidationError("the JSON body must be an object")
        refuse_invalid_text(parsed)  # "\ud800" escapes decode to lone surrogates
        fields = parsed
    elif media in ("application/x-www-form-urlencoded", ""):
        try:
            # errors="strict": percent-encoded bytes that are not UTF-8 (%ff, or %ED%A0%80,
            # a surrogate) are refused, not turned into U+FFFD and stored so.
            pairs = parse_qsl(raw.decode(), keep_blank_values=True, strict_parsing=True,
                              errors="strict")
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValidationError("the form body is not valid urlencoded UTF-8") from exc
        fields = {}
        for key, value in pairs:
            if key.endswith("[]"):
                key = key[:-2]
                fields.setdefault(key, [])
            if key in fields:
                existing = fields[key]
                fields[key] = (
                    [*existing, value] if isinstance(existing, list) else [existing, value]
                )
            else:
                fields[key] = value
    else:
        raise ValidationError(
            f"unsupported content type {media!r}; send application/json or a urlencoded form"
        )
    fields.pop("access_token", None)
    return fields


@asynccontextmanager
async def multipart_form(request: Request, limit: int) -> AsyncIterator[FormData]:
    """Parse a multipart body read under ``limit`` (413 beyond it); files close on exit."""
    raw = await read_body(request, limit)
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return {"type": "http.disconnect"}
        replayed = True
        return {"type": "http.request", "body": raw, "more_body": False}

    buffered = Request(request.scope, replay)
    form = await buffered.form(max_files=4, max_fields=32, max_part_size=limit)
    try:
        yield form
    finally:
        await form.close()


async def upload_of(form: FormData, names: tuple[str, ...]) -> tuple[bytes, str] | None:
    """(content, filename) of the first file field among ``names``, or None."""
    for name in names:
        item = form.get(name)
        if isinstance(item, UploadFile):
            refuse_invalid_text(item.filename or "", "the file name")
            return await item.read(), item.filename or "firmware.bin"
        if item is not None:
            raise ValidationError(f"form field {name!r} must be a file upload")
    return None


def form_text(form: FormData) -> dict[str, Any]:
    """The non-file fields of a multipart form (ValidationError for text that is not valid
    Unicode)."""
    fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k != "access_token"}
    refuse_invalid_text(fields)
    return fields


# --- value coercion (JSON values or form strings) ----------------------------------------------


def as_bool(fields: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """A boolean field: JSON true/false or the strings "true"/"false"/"1"/"0"."""
    if name not in fields:
        return default
    value = fields[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "false", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValidationError(f"{name} must be true or false")


def as_name_list(fields: Mapping[str, Any], name: str) -> list[str]:
    """A list of names: a JSON array of strings or a comma-separated string."""
    value = fields.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ValidationError(f"{name} must be a list of names")


def query_int(request: Request, name: str, default: int) -> int:
    """An integer query parameter."""
    found = optional_query_int(request, name)
    return default if found is None else found


def optional_query_int(request: Request, name: str) -> int | None:
    """An integer query parameter of at most 9 digits, or None when absent."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise ValidationError(
            f"query parameter {name} must be a non-negative integer of at most 9 digits"
        )
    return int(raw)


def int_field(value: object, what: str, *, max_digits: int = 9) -> object:
    """A form string of digits as an int (JSON numbers pass through unchanged); a longer
    string of digits is refused here, before ``int()`` (Python refuses over 4,300 digits with
    ValueError, and SQLite integers stop at 2**63 - 1)."""
    if isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit():
            if len(text) > max_digits:
                raise ValidationError(f"{what} must be an integer of at most {max_digits} digits")
            return int(text)
    return value


# --- downloads ----------------------------------------------------------------------------


#: RFC 8187 attr-char, besides letters and digits (kept as-is in ``filename*``).
_ATTR_CHARS = "!#$&+-.^_`|~"


def content_disposition(filename: str) -> str:
    """``attachment`` with the file name, safe for any stored name (RFC 6266 section 4.3):
    an ASCII ``filename`` fallback (quotes, backslashes, control and non-ASCII characters and
    path separators replaced by '_') and the UTF-8 name in ``filename*`` (RFC 8187), with
    path separators replaced as well and control characters dropped."""
    name = "".join(
        "_" if ch in "/\\" else ch for ch in filename if ch.isprintable()
    ).strip() or "firmware.bin"
    fallback = "".join(
        ch if ch.isascii() and ch.isprintable() and ch not in '"\\%' else "_" for ch in name
    )
    encoded = quote(name, safe=_ATTR_CHARS)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def ok(payload: Mapping[str, Any] | None = None, status: int = 200) -> JSONResponse:
    """A success response ``{"ok": true, ...}``."""
    return JSONResponse({"ok": True, **(payload or {})}, status)
