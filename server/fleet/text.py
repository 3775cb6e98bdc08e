"""Checks on free-text fields (titles, names, notes) coming from API clients."""

from __future__ import annotations

import re

from otacore.errors import ValidationError

# Checked with fullmatch: "$" also matches before a trailing newline.
_GROUP_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_COLOR_RE = re.compile(r"(#[0-9A-Fa-f]{6})?")


def clean_text(value: object, what: str, max_len: int, *, required: bool = False) -> str:
    """A string field: trimmed, at most ``max_len`` characters, no control characters."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string")
    value = value.strip()
    if required and not value:
        raise ValidationError(f"{what} is required")
    if len(value) > max_len:
        raise ValidationError(f"{what} is longer than {max_len} characters")
    if any(ord(ch) < 32 and ch not in "\t\n\r" for ch in value) or "\x7f" in value:
        raise ValidationError(f"{what} contains control characters")
    return value


def clean_filename(value: object) -> str:
    """The file name an upload came with (its last path component), or firmware.bin."""
    if not isinstance(value, str) or not value.strip():
        return "firmware.bin"
    name = value.replace("\\", "/").rsplit("/", 1)[-1].strip()
    name = "".join(ch for ch in name if ch.isprintable())[:200]
    return name or "firmware.bin"


def clean_group_name(value: object) -> str:
    """A group name: 1-100 of letters, digits, '_', '.', '-', starting with a letter or digit."""
    if not isinstance(value, str) or not _GROUP_RE.fullmatch(value):
        raise ValidationError(
            f"group name {value!r} must be 1-100 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return value


def clean_color(value: object) -> str:
    """A group color: empty or ``#rrggbb``."""
    if value is None:
        return ""
    if not isinstance(value, str) or not _COLOR_RE.fullmatch(value):
        raise ValidationError(f"color {value!r} must be a #rrggbb hex color")
    return value


def slugify(name: str) -> str:
    """A URL slug from a product name: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:56] or "product"
    if slug.isascii() and slug.isdigit():  # slugs must not look like numeric product ids
        slug = f"product-{slug}"
    return slug
