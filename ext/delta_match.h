/* Approximate matching of a new image against an old one (bsdiff-style).
 *
 * Colin Percival, "Naive differences of executable code" (2003) describes the idea: find
 * exact matches through a suffix array of the old image, then extend them both ways while
 * at least half of the bytes agree, so that relinked code (same instructions, shifted
 * addresses) becomes one long "copy with add" whose difference bytes are mostly zero.
 *
 * This is an independent implementation; otacore/_delta_py.py mirrors it step by step and
 * must give identical spans (the tests compare them).
 */
#ifndef OTA_DELTA_MATCH_H
#define OTA_DELTA_MATCH_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Longest search key compared at once; longer exact matches continue on the next search. */
#define OTA_MAX_MATCH ((int64_t)1 << 20)
/* A candidate match longer than this that does not win is skipped by half its length, so
 * that adversarial inputs cannot make the scan quadratic. */
#define OTA_SKIP_LEN 256

typedef struct {
    int64_t new_pos, old_pos, length;
} ota_span;

typedef struct {
    ota_span *items;
    int64_t count, capacity;
} ota_span_list;

/* Number of equal leading bytes of a and b, at most limit. */
static inline int64_t ota_common_prefix(const uint8_t *a, const uint8_t *b, int64_t limit) {
    int64_t i = 0;
    while (i + 8 <= limit) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        if (x != y) return i + (__builtin_ctzll(x ^ y) >> 3); /* little-endian: lowest byte first */
        i += 8;
    }
    while (i < limit && a[i] == b[i]) i++;
    return i;
}

/* Longest prefix of new[scan:] (up to OTA_MAX_MATCH) that occurs in old.
 * Binary search over the suffix array; both ends keep their common-prefix length, and the
 * comparison at the midpoint skips the smaller of the two (all suffixes in between share it).
 * Ties go to the lower end. */
static int64_t ota_search(const uint8_t *old, int64_t old_n, const int32_t *sa,
                          const uint8_t *key, int64_t key_n, int64_t *match_pos) {
    int64_t lo = 0, hi = old_n - 1, lcp_lo, lcp_hi;
    if (key_n > OTA_MAX_MATCH) key_n = OTA_MAX_MATCH;
    if (old_n == 0 || key_n == 0) {
        *match_pos = 0;
        return 0;
    }
    lcp_lo = ota_common_prefix(old + sa[lo], key, (old_n - sa[lo] < key_n) ? old_n - sa[lo] : key_n);
    lcp_hi = ota_common_prefix(old + sa[hi], key, (old_n - sa[hi] < key_n) ? old_n - sa[hi] : key_n);
    while (hi - lo > 1) {
        int64_t mid = lo + (hi - lo) / 2;
        int64_t start = lcp_lo < lcp_hi ? lcp_lo : lcp_hi;
        int64_t suffix = sa[mid];
        int64_t room = old_n - suffix;
        int64_t limit = room < key_n ? room : key_n;
        int64_t l = start + ota_common_prefix(old + suffix + start, key + start, limit - start);
        int below; /* the suffix at mid sorts before the key */
        if (l == key_n) below = 0;
        else if (l == room) below = 1;
        else below = old[suffix + l] < key[l];
        if (below) {
            lo = mid;
            lcp_lo = l;
        } else {
            hi = mid;
            lcp_hi = l;
        }
    }
    if (lcp_lo >= lcp_hi) {
        *match_pos = sa[lo];
        return lcp_lo;
    }
    *match_pos = sa[hi];
    return lcp_hi;
}

static int ota_span_push(ota_span_list *list, int64_t new_pos, int64_t old_pos, int64_t length) {
    if (list->count == list->capacity) {
        int64_t cap = list->capacity ? list->capacity * 2 : 256;
        ota_span *grown = (ota_span *)realloc(list->items, (size_t)cap * sizeof(ota_span));
        if (grown == NULL) return -1;
        list->items = grown;
        list->capacity = cap;
    }
    list->items[list->count].new_pos = new_pos;
    list->items[list->count].old_pos = old_pos;
    list->items[list->count].length = length;
    list->count++;
    return 0;
}

static inline int ota_same(const uint8_t *old, int64_t old_n, const uint8_t *nw, int64_t o,
                           int64_t p) {
    return o >= 0 && o < old_n && old[o] == nw[p];
}

/* Cover new[] with copy spans from old[] (the gaps are literal "extra" bytes).
 * `threshold`: how many more exactly matching bytes a fresh match needs than the current
 * alignment before the scan switches to it. `step`: how far the scan moves past a position
 * without a better match (1 searches every position; more is a coarse, faster scan).
 * Returns 0, or -1 when memory runs out. */
static int ota_find_matches(const uint8_t *old, int64_t old_n, const uint8_t *nw, int64_t new_n,
                            const int32_t *sa, int64_t threshold, int64_t step,
                            ota_span_list *out) {
    int64_t scan = 0, match_len = 0, pos = 0;
    int64_t last_scan = 0, last_pos = 0, last_offset = 0;
    while (scan < new_n) {
        int64_t old_score = 0, scored;
        scan += match_len;
        scored = scan;
        while (scan < new_n) {
            match_len = ota_search(old, old_n, sa, nw + scan, new_n - scan, &pos);
            /* old_score counts agreeing bytes of new[scan:scored] at the current alignment. */
            for (; scored < scan + match_len; scored++) {
                if (ota_same(old, old_n, nw, scored + last_offset, scored)) old_score++;
            }
            if ((match_len == old_score && match_len != 0) || match_len > old_score + threshold)
                break;
            if (match_len > OTA_SKIP_LEN) {
                int64_t skip_to = scan + match_len / 2;
                for (; scan < skip_to; scan++) {
                    if (ota_same(old, old_n, nw, scan + last_offset, scan)) old_score--;
                }
                continue;
            }
            for (int64_t moved = 0; moved < step && scan < new_n; moved++, scan++) {
                if (ota_same(old, old_n, nw, scan + last_offset, scan)) old_score--;
            }
        }
        if (match_len != old_score || scan == new_n) {
            int64_t i, agree, best, len_fwd = 0, len_back = 0;
            /* Extend the previous alignment forward while it scores 2*agree - length best. */
            agree = 0;
            best = 0;
            for (i = 0; last_scan + i < scan && last_pos + i < old_n;) {
                if (old[last_pos + i] == nw[last_scan + i]) agree++;
                i++;
                if (agree * 2 - i > best * 2 - len_fwd) {
                    best = agree;
                    len_fwd = i;
                }
            }
            /* Extend the new match backward the same way. */
            if (scan < new_n) {
                agree = 0;
                best = 0;
                for (i = 1; scan >= last_scan + i && pos >= i; i++) {
                    if (old[pos - i] == nw[scan - i]) agree++;
                    if (agree * 2 - i > best * 2 - len_back) {
                        best = agree;
                        len_back = i;
                    }
                }
            }
            /* Where the two extensions overlap, split at the best point. */
            if (last_scan + len_fwd > scan - len_back) {
                int64_t overlap = (last_scan + len_fwd) - (scan - len_back);
                int64_t score = 0, best_score = 0, split = 0;
                for (i = 0; i < overlap; i++) {
                    if (nw[last_scan + len_fwd - overlap + i] == old[last_pos + len_fwd - overlap + i])
                        score++;
                    if (nw[scan - len_back + i] == old[pos - len_back + i]) score--;
                    if (score > best_score) {
                        best_score = score;
                        split = i + 1;
                    }
                }
                len_fwd += split - overlap;
                len_back -= split;
            }
            if (len_fwd > 0 && ota_span_push(out, last_scan, last_pos, len_fwd) != 0) return -1;
            last_scan = scan - len_back;
            last_pos = pos - len_back;
            last_offset = pos - scan;
        }
    }
    return 0;
}

#endif /* OTA_DELTA_MATCH_H */
