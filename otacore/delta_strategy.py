"""Which patch-making strategies to try for a pair, in which order, and keeping the smallest.

Issue 18, item 2: "try more than one strategy per pair within a bounded make time, and keep the
smallest". A strategy is a filter set (``otacore.delta.AUTO_FILTERS``) the maker is forced to
use, or ``AUTO``: the branch family the detector picks (``delta_maker.detect_family``) with the
filter sets the maker settles among on its own. Each strategy changes how the images are
normalised before matching, so it is made in full and its real patch size, after the entropy
coder, decides; no estimate can rank them as well.

The budget is a count, ``effort``: how many strategies are made in full. Each costs about one
make (the matching work of strategies normalising with the same branch family is shared, see
``delta_maker``), so ``effort`` bounds the make time at about ``effort`` times that of the
detector's choice alone, and the result depends only on the images and ``effort``, never on
the machine's speed. The order is the prior: the detector's choice first (effort 1 is the
maker as it was), then the filter sets closest to it, the branch families with less evidence
last.

Make time grows with the image, so ``effort`` is counted in makes of an image of at least
EFFORT_UNIT bytes: a smaller image gets as many strategies as fit into that budget
(:func:`strategies_for`; all six for images up to a third of it at the default effort). That
bounds the make time as before while small images, whose every strategy costs milliseconds,
try more (public corpus: bt-brcm 3,750 -> 3,268 bytes, where the fourth strategy wins;
bench/delta/README.md, "Strategy search"). Effort 1 stays one strategy whatever the size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from otacore.delta import FILTER_THUMB, FILTER_WORDS, FILTER_X86, PatchInputError

#: The detector's family with the filter sets the maker picks by itself.
AUTO: None = None
#: A strategy: AUTO or a filter set forced on the maker.
Strategy = int | None
#: Strategies a search may try: AUTO and the five forced sets it does not already cover.
MAX_EFFORT = 6
#: What ``ota delta make`` and the server use unless told (bench/delta/README.md, "Strategy
#: search": the gain and make time per effort on the public corpus).
DEFAULT_EFFORT = 2
#: The image size (the larger of old and new) one unit of effort pays for: an image this
#: large or larger gets ``effort`` strategies, a smaller one proportionally more.
EFFORT_UNIT = 128 * 1024

_NAMES = {
    None: "auto",
    0: "none",
    FILTER_THUMB: "thumb",
    FILTER_THUMB | FILTER_WORDS: "thumb+words",
    FILTER_WORDS: "words",
    FILTER_X86: "x86",
    FILTER_X86 | FILTER_WORDS: "x86+words",
}


def strategy_name(strategy: Strategy) -> str:
    """A short name for ``strategy`` ("auto", "thumb+words", "none", ...)."""
    return _NAMES[strategy]


def check_effort(effort: int) -> None:
    """Raise PatchInputError unless ``effort`` is a strategy count the search accepts."""
    if isinstance(effort, bool) or not isinstance(effort, int) or not 1 <= effort <= MAX_EFFORT:
        raise PatchInputError(
            f"effort must be a whole number of strategies from 1 to {MAX_EFFORT}, not {effort!r}"
        )


def strategies_for(effort: int, image_size: int) -> int:
    """How many strategies a search with budget ``effort`` makes for an image of
    ``image_size`` bytes (the larger of old and new): ``effort`` makes of an image of at least
    EFFORT_UNIT bytes, at most MAX_EFFORT; effort 1 is one strategy whatever the size."""
    check_effort(effort)
    if effort == 1:
        return 1
    return min(MAX_EFFORT, max(effort, effort * EFFORT_UNIT // max(image_size, 1)))


def strategy_order(family: int, scores: tuple[int, int]) -> list[Strategy]:
    """Every strategy worth trying, most promising first.

    ``family`` is the detector's choice (0, FILTER_THUMB or FILTER_X86) and ``scores`` its
    (Thumb-2, x86) evidence. AUTO comes first and already covers ``family`` with pointers, so
    the family's next set is ``family`` alone; then the plain family (pointers, then nothing),
    which wins on data containers when a guessed family mispredicts; then the other branch
    families by their evidence.
    """
    thumb_score, x86_score = scores
    others = sorted(
        (FILTER_THUMB, FILTER_X86),
        key=lambda branch: -(thumb_score if branch == FILTER_THUMB else x86_score),
    )
    families = [family, *(f for f in (0, *others) if f != family)]
    order: list[Strategy] = [AUTO]
    for rank, branch in enumerate(families):
        sets = [branch | FILTER_WORDS, branch]
        order += sets[1:] if rank == 0 else sets
    return order


@dataclass(frozen=True)
class SearchResult:
    """The smallest patch a search found, its strategy and every strategy's size in order."""

    patch: bytes
    strategy: Strategy
    tried: tuple[tuple[Strategy, int], ...]


def search(order: list[Strategy], effort: int, make: Callable[[Strategy], bytes]) -> SearchResult:
    """Make the first ``effort`` strategies of ``order`` and keep the smallest patch (the
    earliest on a tie, so a larger effort never changes a result it does not improve)."""
    check_effort(effort)
    if not order:
        raise PatchInputError("no strategy to try")
    best: bytes | None = None
    chosen: Strategy = order[0]
    tried: list[tuple[Strategy, int]] = []
    for strategy in order[:effort]:
        patch = make(strategy)
        tried.append((strategy, len(patch)))
        if best is None or len(patch) < len(best):
            best, chosen = patch, strategy
    assert best is not None
    return SearchResult(best, chosen, tuple(tried))
