"""The patch maker: matching, relocation models, candidate choice (format: otacore.delta).

1. Guess the instruction set from the old image (``detect_family``): Thumb-2 BL/B.W or x86
   CALL/JMP whose targets land inside the image on a spot other branches also hit, or neither.
2. Pass 1: normalise both images so that every branch holds its absolute target, build the
   suffix array of the old one and match coarsely (bsdiff-style, ext/delta_match.h); then
   cover the literal gaps with every match that is cheaper as a copy than as literal bytes
   by an estimate of the compressed cost (``cover_gaps``, ``literal_costs``; HDiffPatch's
   cover selection). Models are fitted to the scan's spans, the covers only carry bytes.
3. Fit the relocation model to what those copies show: how branch targets and pointers moved
   (``fit_map``), the load address (``detect_base``).
4. Pass 2: rewrite the new image's targets and pointers back into old coordinates (the
   inverse model) and match it again against the same suffix array: relocated code and
   pointer tables now compare equal, so the copies line up exactly; cover the gaps again.
5. Fit the model on the final copies, pick the filter set whose difference bytes compress
   best, and zstd the payload with an explicit window; if a branch conversion of the
   literal bytes (otacore.delta_literal, format version 3) passes a cheap screen and makes
   the payload smaller, keep that one.
6. Repeat 2-5 for other strategies (a filter set forced: its own normalisation and matches)
   as far as the ``effort`` budget allows and keep the smallest patch (otacore.delta_strategy);
   strategies with the same branch family share pass 1.
7. Compress the winner's payload with the other codecs too (LZMA2), and the target as all
   literal bytes, and keep the smallest patch (otacore.delta_codec).

Where each step lives: the family detector in otacore.delta_family, the relocation model in
otacore.delta_relocation, the entries and candidate payloads in otacore.delta_planner, the
choice among a candidate's layouts and forms in otacore.delta_forms, the strategy order in
otacore.delta_strategy, the codecs in otacore.delta_codec; this module runs the passes and the
search.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
from numpy.typing import NDArray

from otacore import delta as fmt
from otacore import delta_codec, delta_literal, delta_strategy
from otacore._types import Buffer
from otacore.delta import (
    AUTO_FILTERS,
    DEFAULT_BLOCK_LIMIT,
    DEFAULT_WINDOW_LOG,
    FILTER_THUMB,
    FILTER_WORDS,
    FILTER_X86,
    MAX_BLOCK_LIMIT,
    MAX_IMAGE_SIZE,
    MAX_MAP_ENTRIES,
    MAX_WINDOW_LOG,
    MIN_BLOCK_LIMIT,
    PatchInputError,
)
from otacore.delta_family import branch_scores, family_of
from otacore.delta_forms import Made, laid_out, ranking_size, with_dense
from otacore.delta_planner import Planner
from otacore.delta_relocation import EMPTY_MAP

#: Scan step of the first matching pass, which only has to show how things moved.
FIRST_PASS_STEP = 4
#: Scan step of the second pass: every other position, at no measurable cost in size.
SECOND_PASS_STEP = 2
#: Switching thresholds of the second matching pass: little new code, much new code.
SECOND_PASS_THRESHOLDS = (8, 16)
#: Estimated compressed size of a literal byte, in sixteenths of a byte, for the cost-based
#: covers added in the gaps both passes leave (ext/delta_match.h, ota_cover_gaps). Literal
#: bytes compress to 0.6-0.75 byte each on the public corpus (bench/delta/results/
#: public-anatomy.md: "literal z" / "literal"); 10/16 is the low end, so a short match is only
#: taken where it clearly pays (8-13 gave within 1.5% of each other on the corpus).
LITERAL_COST = 10
#: ... of a literal byte zstd codes as part of a run (it repeats the byte before it).
RUN_COST = 1
#: ... of a literal byte inside a REPEAT_GRAM-byte string that occurred earlier in the new
#: image: zstd codes it as a match within the literals (about 6 bits a byte amortised), so a
#: copy from old gains less there. Generated new code repeats itself: without this rule the
#: covers cost the project's corpus 1.1% (sys-major, app-major); with it, 1.3% less than
#: without covers. (8, 6) beat (6, 3), (8, 2), (8, 5), (8, 7), (12, 5) and (16, 4) on the
#: two corpora together.
REPEAT_COST = 6
#: (the kernel's string length, fixed: ext/delta_match.h, OTA_REPEAT_GRAM)
REPEAT_GRAM: int = fmt._kernel.REPEAT_GRAM


def literal_costs(new: bytes) -> NDArray[np.uint8]:
    """Per byte of ``new``: its estimated compressed size as a literal, in sixteenths of a byte
    (what ``cover_gaps`` weighs a copy against): LITERAL_COST, less in runs and repeats (the
    kernel's ``literal_costs``)."""
    return fmt._kernel.literal_costs(new, LITERAL_COST, RUN_COST, REPEAT_COST)


#: Literal branch conversions the maker screens per branch family (bench/delta/results/
#: literal-branch-probe.md): Thumb-2 where the detector sees Thumb-2, RISC-V where it sees
#: neither Thumb-2 nor x86 (it has no RISC-V score); x86 conversion gained nothing.
LITERAL_KINDS = {
    FILTER_THUMB: (delta_literal.THUMB,),
    0: (delta_literal.RISCV,),
    FILTER_X86: (),
}

def _unexplained(diff: bytes) -> int:
    """How many difference bytes the prediction got wrong."""
    return int(np.count_nonzero(np.frombuffer(diff, dtype=np.uint8)))


def _best_candidate(
    planner: Planner, choices: list[tuple[int, bool]], map_cap: int, window_log: int
) -> tuple[int, bool]:
    """The (filters, find_base) whose prelude and difference bytes compress smallest."""
    if len(choices) == 1:
        return choices[0]
    scores = []
    for filters, find_base in choices:
        prelude, diff = planner.candidate(filters, map_cap, find_base)
        scores.append(len(prelude) + len(_compress(diff, 1, window_log)))
    return choices[min(range(len(choices)), key=scores.__getitem__)]



#: The zstd step (moved to otacore.delta_codec with the other codecs).
_compress = delta_codec.compress_zstd


def _check(
    old: bytes, new: bytes, window_log: int, block_limit: int, map_cap: int, filters: int | None
) -> None:
    if len(old) > min(MAX_IMAGE_SIZE, fmt._kernel.MAX_INDEXED) or len(new) > MAX_IMAGE_SIZE:
        raise PatchInputError("images larger than 2 GiB (base) or 4 GiB (target) are not supported")
    if not 10 <= window_log <= MAX_WINDOW_LOG:
        raise PatchInputError(f"window log must be within 10..{MAX_WINDOW_LOG}")
    if not MIN_BLOCK_LIMIT <= block_limit <= MAX_BLOCK_LIMIT:
        raise PatchInputError(f"block limit must be within {MIN_BLOCK_LIMIT}..{MAX_BLOCK_LIMIT}")
    if not 0 <= map_cap <= MAX_MAP_ENTRIES:
        raise PatchInputError(f"map cap must be within 0..{MAX_MAP_ENTRIES}")
    if filters is not None and filters not in AUTO_FILTERS:
        raise PatchInputError(f"filter set {filters} is not one of {AUTO_FILTERS}")


#: Threads one patch's making uses by default (``ota delta make --workers``, ``ota server
#: --delta-threads-per-patch``): the codec passes overlap each other and the second
#: strategy's making. Two, this machine's cores; on the public corpus 7.4 s -> see
#: bench/delta/README.md. MAX_WORKERS bounds what an operator may ask.
DEFAULT_WORKERS = 2
MAX_WORKERS = 16
#: Format versions the maker can be held to (``format_version``): 2 for appliers that read
#: no version 3, 3 for those that read no version 4, 4 for those that read no version 5,
#: 5 (otacore.delta.NEWEST_VERSION) the default.
MAKEABLE_VERSIONS = (2, 3, 4, 5)


def check_workers(workers: int) -> None:
    """Raise PatchInputError unless ``workers`` is a thread count the maker accepts."""
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= MAX_WORKERS:
        raise PatchInputError(
            f"workers must be a whole number of threads from 1 to {MAX_WORKERS}, not {workers!r}"
        )


class _Matching:
    """Pass 1 of every strategy normalising with one branch family: the normalised images,
    the old one's suffix array and the coarse matches do not depend on the rest of the filter
    set (pass 1 uses no maps), so strategies sharing a family compute them once."""

    def __init__(
        self,
        old: bytes,
        new: bytes,
        block_limit: int,
        threshold: int,
        window_log: int,
        format_version: int = fmt.NEWEST_VERSION,
    ) -> None:
        self.old, self.new, self.block_limit, self.threshold = old, new, block_limit, threshold
        self.format_version = format_version
        self.encoder = delta_codec.PatchEncoder(
            old, new, window_log=window_log, block_limit=block_limit
        )
        self._by_family: dict[int, tuple[bytes, NDArray[np.int64], Planner]] = {}
        self._first_lock = threading.Lock()
        self._literal_costs: NDArray[np.uint8] | Future[NDArray[np.uint8]] | None = None

    def start(self, pool: Executor | None) -> None:
        """Start the estimate of the literal bytes' cost in ``pool`` (it runs beside the
        first suffix array; None: it is made when first needed)."""
        if pool is not None:
            self._literal_costs = pool.submit(literal_costs, self.new)

    @property
    def literal_costs(self) -> NDArray[np.uint8]:
        """:func:`literal_costs` of the new image."""
        if isinstance(self._literal_costs, Future):
            self._literal_costs = self._literal_costs.result()
        elif self._literal_costs is None:
            self._literal_costs = literal_costs(self.new)
        return self._literal_costs

    def first(self, family: int) -> tuple[bytes, NDArray[np.int64], Planner]:
        """(old image normalised, its suffix array, planner of pass 1's matches); made once
        per family even when strategies run in threads (the others wait for it)."""
        with self._first_lock:
            return self._first(family)

    def _first(self, family: int) -> tuple[bytes, NDArray[np.int64], Planner]:
        if family not in self._by_family:
            kernel = fmt._kernel
            # Pass 1: branches hold absolute targets on both sides (unmapped), coarse scan.
            plain = (family, 0, 0, EMPTY_MAP, EMPTY_MAP)
            old_normal = kernel.normalize(self.old, plain) if family else self.old
            new_normal = kernel.normalize(self.new, plain) if family else self.new
            suffixes = kernel.suffix_array(old_normal)
            spans = kernel.find_matches(
                old_normal, new_normal, suffixes, self.threshold, FIRST_PASS_STEP
            )
            covered = kernel.cover_gaps(
                old_normal, new_normal, suffixes, spans, self.literal_costs
            )
            self._by_family[family] = (
                old_normal,
                suffixes,
                Planner(self.old, self.new, covered, self.block_limit, evidence=spans,
                         format_version=self.format_version),
            )
        return self._by_family[family]


def _make_one(
    matching: _Matching,
    filters: int | None,
    family: int,
    *,
    level: int | None,
    window_log: int,
    map_cap: int,
) -> Made:
    """The patch of one strategy: ``filters`` forced, or None for the family's best sets."""
    old_bytes, new_bytes, block_limit = matching.old, matching.new, matching.block_limit
    probe = filters if filters is not None else family | FILTER_WORDS
    old_normal, suffixes, first = matching.first(family)
    model = first.model(probe, map_cap)
    retry = [(filters, True)] if filters is not None else [(probe, True), (probe, False)]
    unexplained = _unexplained(first.candidate(probe, map_cap)[1])
    if model[0] == 0 or unexplained <= max(64, len(new_bytes) >> 12):
        if filters is None:  # nothing left for pass 2 to fix: settle among the candidates
            retry = list(dict.fromkeys([*retry, (family, True), (0, True)]))
        plan, choice = first, _best_candidate(first, retry, map_cap, window_log)
    else:
        # Pass 2: the new image's targets and pointers taken back to old coordinates, matched
        # against the same old normalisation and suffix array. Much new code wants a high
        # switching threshold (no chance matches), little a low one (follow every table).
        kernel = fmt._kernel
        new_normal = kernel.normalize(new_bytes, first.model(probe, map_cap, inverse=True))
        literal = len(new_bytes) - int(first.evidence[:, 2].sum())
        second_threshold = SECOND_PASS_THRESHOLDS[literal * 50 > len(new_bytes)]
        spans = kernel.find_matches(
            old_normal, new_normal, suffixes, second_threshold, SECOND_PASS_STEP
        )
        covered = kernel.cover_gaps(
            old_normal, new_normal, suffixes, spans, matching.literal_costs
        )
        plan = Planner(old_bytes, new_bytes, covered, block_limit, evidence=spans,
                        format_version=matching.format_version)
        choice = _best_candidate(plan, retry, map_cap, window_log)
    prelude, diff = plan.candidate(choice[0], map_cap, choice[1])
    encoder = matching.encoder
    literal, sure = plan.literal_kind(
        LITERAL_KINDS[family] if matching.format_version >= 3 else ()
    )
    converted_payload = converted = b""
    if literal:
        converted_payload, converted = laid_out(plan, encoder, level, prelude, diff, literal)
        if sure and not encoder.dictionary_fits(converted_payload):
            return with_dense(
                plan, encoder, level, prelude, diff, literal, converted_payload, converted
            )
    payload, patch = laid_out(plan, encoder, level, prelude, diff, delta_literal.NONE)
    # A pick the screen is not sure of is kept only if the whole payload gets smaller with
    # zstd, and with the old image as dictionary too when that fits (converted literals no
    # longer match the old image's bytes: bench/delta/results/literal-branch-probe.md).
    if literal and ranking_size(encoder, converted_payload, converted, level) < ranking_size(
        encoder, payload, patch, level
    ):
        return with_dense(
            plan, encoder, level, prelude, diff, literal, converted_payload, converted
        )
    return with_dense(plan, encoder, level, prelude, diff, delta_literal.NONE, payload, patch)



def search_patch(
    old: Buffer,
    new: Buffer,
    *,
    level: int | None = None,
    window_log: int = DEFAULT_WINDOW_LOG,
    block_limit: int = DEFAULT_BLOCK_LIMIT,
    filters: int | None = None,
    threshold: int = 16,
    map_cap: int = MAX_MAP_ENTRIES,
    effort: int = delta_strategy.DEFAULT_EFFORT,
    codecs: Collection[int] = delta_codec.DEFAULT_CODECS,
    lzma_preset: int = delta_codec.DEFAULT_LZMA_PRESET,
    workers: int = DEFAULT_WORKERS,
    format_version: int = fmt.NEWEST_VERSION,
) -> delta_strategy.SearchResult:
    """The smallest of the patches of the first strategies (otacore.delta_strategy) that
    turn ``old`` into ``new``, with what was tried: ``effort`` of them for an image of at least
    EFFORT_UNIT bytes, more for a smaller one (``delta_strategy.strategies_for``).

    ``filters`` forces one filter set (one strategy, whatever ``effort``); ``threshold`` is
    the first pass's switching threshold (ext/delta_match.h). The steps of each strategy are
    in the module docstring. The winner's payload is then compressed with each of ``codecs``
    (``level`` is zstd's, ``lzma_preset`` LZMA2's) and the smallest patch kept, the target as
    all literals included (otacore.delta_codec); ``tried`` holds the strategies' zstd sizes.
    When another strategy than the first won, the first one's payload goes through the
    codec step too when it may still win (_worth_recoding: a zstd patch within RECODE_MARGIN
    of the winner's, or at most RECODE_ALWAYS bytes) and the smaller is kept; so no effort
    gives a larger patch than effort 1 unless the first strategy lost on zstd by more than
    the margin (between two efforts above 1 that is not guaranteed: only winners are
    re-encoded).

    ``workers`` threads (1: none, all in the calling thread) make the strategies beside
    each other and overlap the codec passes; the patch does not depend on it.
    ``format_version`` is the newest format the patch may use: 2 for devices whose applier
    reads no version 3 (no exact copies, no literal branch conversion).
    """
    old_bytes, new_bytes = bytes(old), bytes(new)
    _check(old_bytes, new_bytes, window_log, block_limit, map_cap, filters)
    delta_strategy.check_effort(effort)
    delta_codec.check_codecs(codecs, lzma_preset)
    check_workers(workers)
    if format_version not in MAKEABLE_VERSIONS or isinstance(format_version, bool):
        raise PatchInputError(
            f"format version must be one of {', '.join(map(str, MAKEABLE_VERSIONS))}, "
            f"not {format_version!r}"
        )
    matching = _Matching(
        old_bytes, new_bytes, block_limit, threshold, window_log, format_version
    )
    if filters is not None:
        order: list[delta_strategy.Strategy] = [filters]
        effort, detected = 1, 0
    else:
        scores = branch_scores(old_bytes)
        detected = family_of(scores)
        order = delta_strategy.strategy_order(detected, scores)
        effort = delta_strategy.strategies_for(effort, max(len(old_bytes), len(new_bytes)))

    made: list[Made] = []  # each strategy's zstd patch (and dense payload), in order
    with _pools(workers) as (encoders, background, strategies):
        matching.start(encoders)

        def make_strategy(strategy: delta_strategy.Strategy) -> Made:
            family = detected if strategy is None else strategy & (FILTER_THUMB | FILTER_X86)
            return _make_one(
                matching, strategy, family, level=level, window_log=window_log, map_cap=map_cap
            )

        # The strategies after the first start now, beside it (the search keeps their order).
        ahead = {
            index: strategies.submit(make_strategy, strategy)
            for index, strategy in enumerate(order[1:effort], 1)
        } if strategies is not None else {}

        def finish(one: Made, pool: Executor | None) -> bytes:
            return matching.encoder.finish(
                one.patch, codecs, level=level, preset=lzma_preset, pool=pool,
                alternatives=() if one.other is None else (one.other,),
            )

        def make(strategy: delta_strategy.Strategy) -> bytes:
            index = len(made)
            made.append(ahead[index].result() if index in ahead else make_strategy(strategy))
            return made[-1].patch

        result = delta_strategy.search(order, effort, make)
        winner = next(one for one in made if one.patch is result.patch)
        if winner is made[0] or not _worth_recoding(made[0].patch, winner.patch):
            # The codec step: the winner's payload with every codec, and the all-literal
            # candidate.
            patch = finish(winner, encoders)
            return delta_strategy.SearchResult(patch, result.strategy, result.tried)
        # The strategies compete on zstd; another codec may favour the first one (what
        # effort 1 returns), so its payload goes through the codec step too, beside the
        # winner's, and the smaller is kept (ties: the winner's).
        first_finished = None if background is None else background.submit(
            finish, made[0], encoders
        )
        patch = finish(winner, encoders)
        first = finish(made[0], None) if first_finished is None else first_finished.result()
        if len(first) < len(patch):
            return delta_strategy.SearchResult(first, result.tried[0][0], result.tried)
        return delta_strategy.SearchResult(patch, result.strategy, result.tried)


#: When another strategy than the first wins on zstd, the first one's payload goes through
#: the codec step too (so that it is never larger than effort 1's) when its zstd patch is
#: at most this much larger than the winner's ...
RECODE_MARGIN = 0.01
#: ... or at most this many bytes, whatever the margin (the codec step costs little there).
RECODE_ALWAYS = 16 * 1024


def _worth_recoding(first: bytes, winner: bytes) -> bool:
    """Whether the first strategy's zstd patch ``first`` may still win the codec step against
    the winner's ``winner``. Another codec ranks two payloads of one pair nearly as zstd
    does: on the public corpus, of 18 pairs another strategy won, the first's codec step
    never won and its ratio to the winner's stayed within 3 points of the zstd ratio (0.2-66%
    larger). The codec step of a 1 MB image's payload costs about 0.25 s of CPU."""
    return len(first) <= RECODE_ALWAYS or len(first) <= (1 + RECODE_MARGIN) * len(winner)


@contextmanager
def _pools(workers: int) -> Iterator[tuple[Executor | None, ...]]:
    """(encoders, background, strategies) for a search with ``workers`` threads, or Nones
    for 1.

    The encoders run codec passes (liblzma and zstd release the GIL, as the kernel's matching
    does), and never wait for each other; the one background thread runs the first
    strategy's codec step when it is worth one beside the winner's, and hands its passes to
    the encoders; the strategy threads make
    the strategies after the first, beside it (they wait only for a pass 1 they share). The
    pools are shut down, their work finished, before the search returns: no thread outlives
    it.
    """
    if workers == 1:
        yield None, None, None
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="delta-encode") as encoders, \
            ThreadPoolExecutor(1, thread_name_prefix="delta-first") as background, \
            ThreadPoolExecutor(workers - 1, thread_name_prefix="delta-strategy") as strategies:
        yield encoders, background, strategies


def make_patch(
    old: Buffer,
    new: Buffer,
    *,
    level: int | None = None,
    window_log: int = DEFAULT_WINDOW_LOG,
    block_limit: int = DEFAULT_BLOCK_LIMIT,
    filters: int | None = None,
    threshold: int = 16,
    map_cap: int = MAX_MAP_ENTRIES,
    effort: int = delta_strategy.DEFAULT_EFFORT,
    codecs: Collection[int] = delta_codec.DEFAULT_CODECS,
    lzma_preset: int = delta_codec.DEFAULT_LZMA_PRESET,
    workers: int = DEFAULT_WORKERS,
    format_version: int = fmt.NEWEST_VERSION,
) -> bytes:
    """A patch that turns ``old`` into ``new``: the smallest :func:`search_patch` finds.

    ``filters`` None lets the search try ``effort`` strategies, the detector's first;
    a filter set forces that one.
    """
    return search_patch(
        old,
        new,
        level=level,
        window_log=window_log,
        block_limit=block_limit,
        filters=filters,
        threshold=threshold,
        map_cap=map_cap,
        effort=effort,
        codecs=codecs,
        lzma_preset=lzma_preset,
        workers=workers,
        format_version=format_version,
    ).patch

