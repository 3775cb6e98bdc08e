"""Which form of a strategy's records the maker keeps: the layout of the control entries, and
the regular or the dense form of the exact copies.

Each strategy's candidate (otacore.delta_planner) can be laid out several ways, and which is
smallest depends on the pair, so the maker (otacore.delta_maker) builds the forms that may
win and lets the zstd patch decide (:func:`laid_out`, :func:`with_dense`); the codec step
later gets the loser too when another codec may rank the two the other way round
(:class:`Made`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from otacore import delta as fmt
from otacore import delta_codec, delta_planner
from otacore.delta import CODEC_ZSTD_OLD
from otacore.delta_planner import Planner

#: Payloads up to this many bytes are also made with their control entries in entry order
#: and the smaller zstd patch kept (version 4's columns are smaller on most payloads: on the
#: public corpus they took 3.5 KB off the total and lost on 5 pairs, by 4-169 bytes, all of
#: them with payloads under 64 KiB; there the second payload costs little).
LAYOUT_CHOICE_MAX = 64 * 1024


def laid_out(
    plan: Planner,
    encoder: delta_codec.PatchEncoder,
    level: int | None,
    prelude: bytes,
    diff: bytes,
    literal: int,
    run: int | None = None,
) -> tuple[bytes, bytes]:
    """(payload, its ranking zstd patch) of the records with exact copies of ``run`` (None:
    EXACT_RUN_MIN): control entries in columns where the format allows; in sparse columns
    (version 5) when that makes the zstd patch smaller; in entry order when the payload is
    at most LAYOUT_CHOICE_MAX bytes and that makes it smaller still (the regular form only;
    the dense form's many short entries are what columns are for). Ties keep the earlier,
    older layout. Sparse columns win where most seeks and extras are 0 and lose by a few
    bytes elsewhere (the bitmaps), so zstd decides, for one payload build and zstd pass more
    per form."""
    payload = plan.payload(prelude, diff, literal, run)
    patch = encoder.ranking_patch(payload, level)
    if plan.format_version < fmt.COLUMNS_FORMAT_VERSION:
        return payload, patch
    layouts: list[dict[str, bool]] = []
    if plan.format_version >= fmt.SPARSE_FORMAT_VERSION:
        layouts.append({"sparse": True})
    if run is None and len(payload) <= LAYOUT_CHOICE_MAX:
        layouts.append({"columns": False})
    for layout in layouts:
        other = plan.payload(prelude, diff, literal, run, **layout)
        other_patch = encoder.ranking_patch(other, level)
        if len(other_patch) < len(patch):
            payload, patch = other, other_patch
    return payload, patch


@dataclass(frozen=True)
class Made:
    """A strategy's zstd patch, and the other form of its records (exact copies down to
    EXACT_RUN_DENSE, or not) when that one was made too (for the codec step)."""

    patch: bytes
    other: bytes | None = None


#: The shorter zero runs the dense form of a payload cuts out as exact copies.
EXACT_RUN_DENSE = 2
#: ... and only when the zero runs it cuts are this long on average: LZMA2 codes a short run
#: of zeros in a few bits, an exact copy costs a control entry of about 4 bytes (on the
#: public corpus the pairs whose runs averaged 11-23 bytes never gained, 51-80 did).
DENSE_MEAN_RUN = 32
#: Whichever form loses with zstd goes through the codec step too when its zstd patch is at
#: most this much larger than the other's: LZMA2 may still rank them the other way round
#: (iwlwifi-9260: the regular form 9.6% larger with zstd in version 4, 11.1% in version 5
#: where sparse columns shrink the dense form, and 4% smaller with LZMA2 in both; on the
#: public corpus raising the margin from 0.10 to 0.15 changed that pair alone) ...
DENSE_MARGIN = 0.15
#: ... or when its payload is at most this many bytes, whatever the margin.
DENSE_ALWAYS = 128 * 1024


def with_dense(
    plan: Planner,
    encoder: delta_codec.PatchEncoder,
    level: int | None,
    prelude: bytes,
    diff: bytes,
    literal: int,
    payload: bytes,
    patch: bytes,
) -> Made:
    """``patch``, or the dense form of the same records when its zstd patch is smaller:
    every zero run of EXACT_RUN_DENSE or more difference bytes an exact copy too.

    Which run length is best depends on the pair: where changes are sparse (a container of
    similar sub-images changed alike, a table of shifted pointers), cutting every zero run
    brings the repeats within the window and leaves the coder runs of entries (the public
    corpus's wifi-rtw89, rtw88); where changes are dense the extra entries cost more than
    they save (iwlwifi-9260: 26.1 -> 30.7 KB at 8). The dense form is made only when the
    zero runs it would cut average DENSE_MEAN_RUN bytes or more; the strategies then compete
    on the smaller zstd patch, and the codec step gets both forms unless one lost by more
    than DENSE_MARGIN. (Until version 4 it was made only when the regular payload was larger
    than the window and the dense one would fit it; with control entries in columns its
    entries cost less: rtw88 969 -> 847 bytes, bt-rtl8852cu -89, dos-argon -78, for about
    0.1 s more make CPU on the public corpus.)
    """
    if plan.format_version < 3 or not _dense_pays(diff):
        return Made(patch)
    dense, dense_patch = laid_out(plan, encoder, level, prelude, diff, literal, EXACT_RUN_DENSE)
    if len(dense_patch) < len(patch):
        worth = _loser_worth_coding(payload, patch, dense_patch)
        return Made(dense_patch, payload if worth else None)
    return Made(patch, dense if _loser_worth_coding(dense, dense_patch, patch) else None)


def _loser_worth_coding(payload: bytes, patch: bytes, winner: bytes) -> bool:
    """Whether the form that lost with zstd (``payload``, its zstd patch ``patch``) goes
    through the codec step too: LZMA2 may rank the two forms the other way round. Always
    when the payload is at most DENSE_ALWAYS bytes (sparse random changes in a 64 KB image:
    the dense form 16% smaller with zstd, the regular one 4% smaller with LZMA2), else only
    within DENSE_MARGIN: the codec step of a regular payload of 0.5 MB costs about 0.17 s of
    CPU, and on the public corpus the two that lost by more (3.8-72%) lost with LZMA2 too."""
    return len(payload) <= DENSE_ALWAYS or len(patch) <= (1 + DENSE_MARGIN) * len(winner)


def _dense_pays(diff: bytes) -> bool:
    """Whether the zero runs of difference bytes ``diff`` that only the dense form cuts (of
    EXACT_RUN_DENSE bytes or more, shorter than EXACT_RUN_MIN) average DENSE_MEAN_RUN bytes
    or more: each costs a control entry of about 4 bytes where LZMA2 codes a short run in a
    few bits."""
    values = np.frombuffer(diff, dtype=np.uint8)
    edges = np.diff(np.concatenate(([0], (values == 0).view(np.int8), [0])))
    lengths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    # (runs of EXACT_RUN_MIN or more are exact copies in the payload already)
    cut = lengths[(lengths >= EXACT_RUN_DENSE) & (lengths < delta_planner.EXACT_RUN_MIN)]
    return bool(len(cut)) and float(cut.mean()) >= DENSE_MEAN_RUN


def ranking_size(
    encoder: delta_codec.PatchEncoder, payload: bytes, patch: bytes, level: int | None
) -> int:
    """The size of ``patch`` (``payload`` with zstd) or, when the old image and the payload
    fit the window, of ``payload`` with the old image as dictionary (codec 2) if smaller."""
    if not encoder.dictionary_fits(payload):
        return len(patch)
    return min(len(patch), len(encoder.encode(payload, CODEC_ZSTD_OLD, level=level)))

