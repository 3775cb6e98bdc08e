"""The patch maker's last step: compress a payload with each codec, wrap it in its header,
keep the smallest (format: otacore.delta, versions 2 to 4).

The maker's strategies (otacore.delta_strategy) compete with zstd, which is fast enough to
make every one in full. The winner's payload is then also encoded as a raw LZMA2 stream with
the property sets in ``LZMA_PROPS_TRIED`` and, when the old image and the payload fit the
window, as a zstd frame with the old image as dictionary (codec 2); the target image itself
is encoded as an all-literal payload too (so that a patch is never larger than the
compressed image plus a header, nor, when the window covers both images, than ``zstd
--patch-from``'s frame plus a header and the records' framing, a few bytes); the smallest
of these is the patch.
LZMA2 costs make time, not apply memory: its dictionary is the same ``2**window_log``
bytes as zstd's window and its probability tables are at most 28 KiB (otacore.delta_stream,
"Memory bound").
"""

from __future__ import annotations

import hashlib
import lzma
from collections.abc import Callable, Collection
from concurrent.futures import Executor
from functools import partial

import zstandard

from otacore.delta import (
    CODEC_LZMA2,
    CODEC_NAMES,
    CODEC_ZSTD,
    CODEC_ZSTD_OLD,
    MIN_LZMA_WINDOW_LOG,
    PatchHeader,
    PatchInputError,
    lzma_filters,
    lzma_props_byte,
    payload_format_version,
    put_varint,
)

#: Codecs the maker tries unless told otherwise.
DEFAULT_CODECS: tuple[int, ...] = (CODEC_ZSTD, CODEC_LZMA2, CODEC_ZSTD_OLD)
#: The operator's names for codec sets (``ota delta make --codec``, ``ota server
#: --delta-codec``): auto keeps the smallest; zstd (with or without the old image as
#: dictionary) suits devices whose applier has no LZMA2 decoder; zstd-plain also those that
#: cannot hand their decoder the old image; lzma2 forces LZMA2.
CODEC_CHOICES: dict[str, tuple[int, ...]] = {
    "auto": DEFAULT_CODECS,
    "zstd": (CODEC_ZSTD, CODEC_ZSTD_OLD),
    "zstd-plain": (CODEC_ZSTD,),
    "lzma2": (CODEC_LZMA2,),
}


def codecs_named(name: str) -> tuple[int, ...]:
    """The codec set called ``name`` in CODEC_CHOICES; PatchInputError for another name."""
    if name not in CODEC_CHOICES:
        raise PatchInputError(
            f"codec must be one of {', '.join(CODEC_CHOICES)}, not {name!r}"
        )
    return CODEC_CHOICES[name]
#: LZMA2 property sets tried: liblzma's default (lc=3 lp=0 pb=2), best on most payloads,
#: and no literal context (lc=0 lp=0 pb=0), smaller by 0.1-10.5% on 25 of the 35 public
#: pairs' payloads (at preset 9 | EXTREME) but a second LZMA2 pass.
LZMA_PROPS_TRIED = (lzma_props_byte(3, 0, 2), lzma_props_byte(0, 0, 0))
#: Payloads up to this many bytes get every property set; larger ones only the first (the
#: second set gains 0.15% on the public corpus's total and would double the LZMA2 time,
#: which its large pairs dominate).
LZMA_ALL_PROPS_MAX = 256 * 1024
#: liblzma preset of the LZMA2 pass (``ota delta make --lzma-preset N [--lzma-extreme]``).
#: A plain preset gets LZMA_NICE_LEN on top; with PRESET_EXTREME liblzma's own deeper search
#: runs as is. On the public corpus's payloads: 9 alone 1.0% larger than 9 | EXTREME in 40%
#: of its time, 9 with nice_len 128 0.4% larger in 58% (the extreme pass alone would take
#: the make time past issue 18's 2x zstd --patch-from).
DEFAULT_LZMA_PRESET = 9
#: Match length at which the LZMA2 encoder stops looking for a longer one (liblzma: 64 at
#: preset 9, 273 with PRESET_EXTREME); long runs of unchanged (zero) difference bytes gain.
LZMA_NICE_LEN = 128
#: The all-literal candidate is made with every codec only when the best patch so far is
#: larger than this fraction of the literal payload's fast zstd (level 3) size: a patch much
#: smaller than the image compressed fast cannot lose to the image compressed well (LZMA2
#: made the literal payload 0.78-0.98x its fast zstd size on 34 of the 35 public pairs, 0.54x
#: on the 35th, whose patch was 0.03x). The fast candidate itself always competes, so no
#: patch is larger than the image at zstd level 3 plus a header.
LITERAL_SCREEN = 0.75
LITERAL_SCREEN_LEVEL = 3
#: The strategies compete on zstd patches (otacore.delta_strategy). A payload above this
#: many bytes is ranked at QUICK_LEVEL instead of the default profile (level None), and its
#: zstd candidate in the codec step is made at QUICK_LEVEL too when LZMA2 competes: there
#: LZMA2 is 5-15% smaller, and level 9 takes a tenth of the default profile's time. On the
#: public corpus this took 0.4 s off 8 s of make CPU and changed no patch; below 32 KiB the
#: ranking is left exact, where two strategies' patches are often a few bytes apart
#: (level 9 for every payload changed one winner there, 61 bytes larger).
QUICK_ABOVE = 32 * 1024
QUICK_LEVEL = 9
_LZMA_PRESETS = frozenset(range(10)) | {level | lzma.PRESET_EXTREME for level in range(10)}


def check_codecs(codecs: Collection[int], lzma_preset: int) -> None:
    """Raise PatchInputError unless ``codecs`` and ``lzma_preset`` are ones the maker takes."""
    if not codecs or any(codec not in CODEC_NAMES for codec in codecs):
        raise PatchInputError(
            f"codecs must be a non-empty set of {sorted(CODEC_NAMES)} "
            f"({', '.join(f'{n} {name}' for n, name in CODEC_NAMES.items())}), not {codecs!r}"
        )
    if isinstance(lzma_preset, bool) or lzma_preset not in _LZMA_PRESETS:
        raise PatchInputError(
            f"LZMA preset must be 0..9, optionally | lzma.PRESET_EXTREME, not {lzma_preset!r}"
        )


def compress_zstd(
    payload: bytes, level: int | None, window_log: int, dictionary: bytes | None = None
) -> bytes:
    """One zstd frame (RFC 8878) with an explicit window. Level None is the default profile:
    btopt with a 128-byte target length, within 1% of level 19's ratio on the corpus in
    about a quarter of the time. With ``dictionary`` (codec 2: the old image, which with the
    payload fits the window) it is a raw-content dictionary and level None means 19: such
    payloads are small."""
    if dictionary is not None:
        params = zstandard.ZstdCompressionParameters.from_level(
            19 if level is None else level, window_log=window_log, source_size=len(payload)
        )
        dict_data = zstandard.ZstdCompressionDict(
            dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT
        )
        return zstandard.ZstdCompressor(
            dict_data=dict_data, compression_params=params
        ).compress(payload)
    if level is None:
        params = zstandard.ZstdCompressionParameters(
            window_log=window_log,
            chain_log=min(window_log + 1, 24),
            hash_log=min(window_log + 1, 24),
            search_log=7,
            min_match=3,
            target_length=128,
            strategy=zstandard.STRATEGY_BTOPT,
        )
    else:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=window_log, source_size=len(payload)
        )
    return zstandard.ZstdCompressor(compression_params=params).compress(payload)


def compress_lzma2(payload: bytes, window_log: int, props: int, preset: int) -> bytes:
    """One raw LZMA2 stream with a ``2**window_log`` dictionary and properties ``props``
    (``preset`` plus LZMA_NICE_LEN unless it is an extreme preset)."""
    filters = lzma_filters(window_log, props, preset)
    if not preset & lzma.PRESET_EXTREME:
        filters[0]["nice_len"] = LZMA_NICE_LEN
    return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=filters)


class PatchEncoder:
    """Wraps payloads of one (old, new) pair in version 2, 3 or 4 headers (as the payload
    needs), one codec at a time."""

    def __init__(self, old: bytes, new: bytes, *, window_log: int, block_limit: int) -> None:
        self.old, self.new, self.window_log, self.block_limit = old, new, window_log, block_limit
        self._fields = {
            "base_size": len(old),
            "target_size": len(new),
            "base_sha256": hashlib.sha256(old).digest(),
            "target_sha256": hashlib.sha256(new).digest(),
        }

    def encode(
        self,
        payload: bytes,
        codec: int,
        *,
        level: int | None = None,
        props: int = 0,
        preset: int = DEFAULT_LZMA_PRESET,
    ) -> bytes:
        """The patch of ``payload`` (decompressed records) compressed with ``codec``."""
        if codec == CODEC_LZMA2:
            compressed = compress_lzma2(payload, self.window_log, props, preset)
        elif codec == CODEC_ZSTD_OLD:
            compressed = compress_zstd(payload, level, self.window_log, self.old)
            props = 0
        else:
            compressed, props = compress_zstd(payload, level, self.window_log), 0
        header = PatchHeader(
            version=payload_format_version(payload),
            window_log=self.window_log,
            block_limit=self.block_limit,
            payload_size=len(compressed),
            codec=codec,
            lzma_props=props,
            **self._fields,  # type: ignore[arg-type]
        )
        return header.pack() + compressed

    def ranking_patch(self, payload: bytes, level: int | None) -> bytes:
        """The zstd patch (codec 0) of ``payload`` the strategies compete on: at ``level``,
        or QUICK_LEVEL for the default profile and a payload above QUICK_ABOVE bytes."""
        return self.encode(payload, CODEC_ZSTD, level=_quick_level(len(payload), level))

    def encodings(
        self,
        payload: bytes,
        codecs: Collection[int],
        *,
        level: int | None,
        preset: int,
        zstd_patch: bytes | None = None,
    ) -> list[Callable[[], bytes]]:
        """One call per candidate patch of ``payload``, in order: LZMA2 with each of
        LZMA_PROPS_TRIED (the first only for a large payload), codec 2 where it fits, zstd
        (``zstd_patch`` when given: the payload's ranking patch, unless that was made at
        QUICK_LEVEL and LZMA2 does not compete). :func:`_run_all`
        runs them, in a pool's threads or not; the order does not depend on it."""
        calls: list[Callable[[], bytes]] = []
        lzma_competes = CODEC_LZMA2 in codecs and self.window_log >= MIN_LZMA_WINDOW_LOG
        if lzma_competes:
            tried = LZMA_PROPS_TRIED if len(payload) <= LZMA_ALL_PROPS_MAX else LZMA_PROPS_TRIED[:1]
            for props in tried:
                calls.append(partial(self.encode, payload, CODEC_LZMA2, props=props, preset=preset))
        if CODEC_ZSTD_OLD in codecs and self.dictionary_fits(payload):
            calls.append(partial(self.encode, payload, CODEC_ZSTD_OLD, level=level))
        if CODEC_ZSTD in codecs or not calls:
            # (also when the codecs asked for cannot carry this payload: LZMA2 has no window
            # below 4 KiB, codec 2 none smaller than the old image plus the payload)
            # (a ranking patch at QUICK_LEVEL is good enough only when LZMA2 competes)
            zstd_level = _quick_level(len(payload), level) if lzma_competes else level
            if zstd_patch is not None and zstd_level == _quick_level(len(payload), level):
                calls.insert(0, partial(bytes, zstd_patch))
            else:
                calls.insert(0, partial(self.encode, payload, CODEC_ZSTD, level=zstd_level))
        return calls

    def dictionary_fits(self, payload: bytes) -> bool:
        """Whether codec 2 can carry ``payload``: zstd references dictionary bytes only
        within the window, so the old image and the payload must both fit it."""
        return len(self.old) + len(payload) <= 1 << self.window_log

    def literal_payload(self) -> bytes:
        """The payload that sends the target as literal bytes: no filters, one entry per
        block (seek 0, copy 0, extra n), blocks filling the block limit."""
        payload = bytearray()
        put_varint(payload, 1)
        payload.append(0)  # prelude: no filters
        # count 1, seek 0, copy 0: three one-byte varints, then the extra length's varint
        room = self.block_limit - 3 - len(_varint(self.block_limit))
        for start in range(0, len(self.new), room):
            extra = self.new[start : start + room]
            record = bytearray(b"\x01\x00\x00")
            put_varint(record, len(extra))
            put_varint(payload, len(record) + len(extra))
            payload += record
            payload += extra
        put_varint(payload, 0)
        return bytes(payload)

    def finish(
        self,
        zstd_patch: bytes,
        codecs: Collection[int],
        *,
        level: int | None,
        preset: int,
        pool: Executor | None = None,
        alternatives: Collection[bytes] = (),
    ) -> bytes:
        """The patch to ship: ``zstd_patch`` (the strategies' winner, codec 0) or its payload
        re-encoded with another codec in ``codecs``, or one of ``alternatives`` (other
        payloads of the same target, e.g. the maker's dense exact copies) with any codec, or
        the all-literal candidate, whichever is smallest (the earliest of these on a tie).
        With ``pool`` the encodings run in its threads; the result is the same."""
        header = PatchHeader.parse(zstd_patch)
        payload = zstandard.ZstdDecompressor().decompress(zstd_patch[header.size :])
        literal = self.literal_payload()
        calls = self.encodings(payload, codecs, level=level, preset=preset, zstd_patch=zstd_patch)
        for alternative in alternatives:
            calls += self.encodings(alternative, codecs, level=level, preset=preset)
        # The fast literal candidate runs beside the others: it decides whether the literal
        # payload is worth every codec.
        made = _run_all([*calls, partial(self.encode, literal, CODEC_ZSTD,
                                          level=LITERAL_SCREEN_LEVEL)], pool)
        candidates, fast = made[:-1], made[-1]
        if min(map(len, candidates)) > LITERAL_SCREEN * len(fast):
            candidates += _run_all(
                self.encodings(literal, codecs, level=level, preset=preset), pool
            )
        elif CODEC_ZSTD_OLD in codecs and self.dictionary_fits(literal):
            # zstd --patch-from's own patch: small images only, so always worth a try
            candidates.append(self.encode(literal, CODEC_ZSTD_OLD, level=level))
        if CODEC_ZSTD in codecs:
            candidates.append(fast)
        return min(candidates, key=len)


def _run_all(calls: list[Callable[[], bytes]], pool: Executor | None) -> list[bytes]:
    """Every call's result, in order: in ``pool``'s threads when given and worth it."""
    if pool is None or len(calls) < 2:
        return [call() for call in calls]
    return list(pool.map(lambda call: call(), calls))


def _quick_level(size: int, level: int | None) -> int | None:
    """``level``, or QUICK_LEVEL for the default profile (None) and more than QUICK_ABOVE
    bytes."""
    return QUICK_LEVEL if level is None and size > QUICK_ABOVE else level


def _varint(value: int) -> bytes:
    out = bytearray()
    put_varint(out, value)
    return bytes(out)
