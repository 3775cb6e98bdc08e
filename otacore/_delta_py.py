"""Pure-Python twin of ext/delta.pyx (same functions, same results, slower).

``otacore._select.load_kernel("delta")`` loads this module when the extension is not built
(or ``OTA_PURE_PYTHON=1``); it exposes exactly the kernel's API. The work is in three
private modules, one per part of the C code:

* otacore/_delta_search_py.py: ``suffix_array`` (ext/delta_sais.h) and the search in it
  (ota_search, ext/delta_match.h);
* otacore/_delta_match_py.py: ``find_matches``, ``cover_gaps``, ``literal_costs``
  (ext/delta_match.h);
* otacore/_delta_filter_py.py: ``normalize``, ``predict``, ``observe``, ``diff_spans``,
  ``add_bytes`` (ext/delta_filter.h).

They compute what the C code computes, not always the way the C code does, because CPython's
per-step cost decides; spans, predictions and difference bytes are identical
(tests/test_delta.py and tests/test_delta_twin_speed.py compare them with the kernel).
"""

from __future__ import annotations

from otacore._delta_filter_py import (
    _POSITION_LIMIT,
    FILTER_THUMB,
    FILTER_WORDS,
    FILTER_X86,
    LOOKAHEAD,
    MapPair,
    Model,
    _check_filters,
    add_bytes,
    diff_spans,
    normalize,
    observe,
    predict,
)
from otacore._delta_match_py import (
    MAX_COSTED,
    REPEAT_GRAM,
    cover_gaps,
    find_matches,
    literal_costs,
)
from otacore._delta_search_py import MAX_INDEXED, suffix_array

__all__ = [
    "FILTER_THUMB",
    "FILTER_WORDS",
    "FILTER_X86",
    "LOOKAHEAD",
    "MAX_COSTED",
    "MAX_INDEXED",
    "REPEAT_GRAM",
    "_POSITION_LIMIT",
    "MapPair",
    "Model",
    "_check_filters",
    "add_bytes",
    "cover_gaps",
    "diff_spans",
    "find_matches",
    "literal_costs",
    "normalize",
    "observe",
    "predict",
    "suffix_array",
]

# The kernel's functions belong to this module, as the native ones belong to otacore._delta
# (numpy's set_module does the same for functions defined in private modules): help() and
# tests/test_delta.py's API comparison then see one module, wherever the code lives.
for _function in (
    add_bytes,
    cover_gaps,
    diff_spans,
    find_matches,
    literal_costs,
    normalize,
    observe,
    predict,
    suffix_array,
):
    _function.__module__ = __name__
del _function
