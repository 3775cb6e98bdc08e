/* Approximate matching of a new image against an old one (bsdiff-style).
 *
 * Colin Percival, "Naive differences of executable code" (2003) describes the idea: find
 * exact matches through a suffix array of the old image, then extend them both ways while
 * at least half of the bytes agree, so that relinked code (same instructions, shifted
 * addresses) becomes one long "copy with add" whose difference bytes are mostly zero.
 * ota_cover_gaps (below) then covers what the scan left literal by estimated cost.
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

/* --- Cost-based covers in the literal gaps (issue 18: "choose covers by the real cost after
 * the entropy coder, not by match length") ----------------------------------------------------
 *
 * The scan above only leaves an alignment for a match `threshold` bytes longer than what the
 * alignment already gives, so short matches into the old image stay literal, and literal bytes
 * are most of a patch where much is new. This pass walks every gap between the scan's spans and
 * takes a match when it is cheaper as a copy than as literal bytes, in the manner of
 * HDiffPatch's search_cover/select_cover: estimated compressed cost, in sixteenths of a byte,
 *   literal byte:          `literal_costs[i]` for new[i], the caller's estimate (the maker
 *                          knows which literal bytes zstd codes cheaply: runs, repeats);
 *   byte under a copy:     OTA_COVER_EQUAL when old and new agree (a zero difference byte),
 *                          OTA_COVER_WRONG when not;
 *   a new control entry:   16 per byte of its three varints (seek, copy, extra; otacore.delta);
 *                          a match on the previous span's diagonal at most OTA_COVER_LINK bytes
 *                          after it extends that span instead and pays for the bytes bridged
 *                          as copy rather than as literal (HDiffPatch's kMaxLinkSpaceLength; the
 *                          bound keeps each candidate's price O(1)).
 * A taken match is extended both ways while that lowers the estimate (approximate agreement,
 * like bsdiff's and HDiffPatch's extend_cover), giving up after OTA_COVER_PATIENCE bytes that do
 * not improve it. Rejected matches longer than OTA_SKIP_LEN skip half their length, so the pass
 * stays O(n log n) whatever the input. */
#define OTA_COVER_EQUAL 1
#define OTA_COVER_WRONG 16
#define OTA_COVER_MIN 4
#define OTA_COVER_PATIENCE 64
#define OTA_COVER_LINK 511
#if OTA_COVER_MIN != 4
#error "ota_cover_gaps's 4-byte string table assumes OTA_COVER_MIN is 4"
#endif

static inline int64_t ota_varint_len(uint64_t v) {
    int64_t n = 1;
    while (v >= 128) {
        v >>= 7;
        n++;
    }
    return n;
}

static inline int64_t ota_entry_cost(int64_t seek, int64_t length) {
    uint64_t zz = seek >= 0 ? (uint64_t)seek * 2 : (uint64_t)(-(seek + 1)) * 2 + 1; /* zigzag */
    return 16 * (ota_varint_len(zz) + ota_varint_len((uint64_t)length) + 1);
}


static inline int64_t ota_copy_cost(const uint8_t *old, const uint8_t *nw, int64_t o, int64_t p) {
    return old[o] == nw[p] ? OTA_COVER_EQUAL : OTA_COVER_WRONG;
}

/* Bit of a 4-byte string in a table of 2^bits bits (Knuth's multiplicative hash). */
static inline uint64_t ota_gram_bit(const uint8_t *at, int bits) {
    uint32_t gram;
    memcpy(&gram, at, 4);
    return (uint64_t)((gram * 2654435761u) >> (32 - bits));
}

/* `spans` (count rows, in new order, not overlapping) with cost-paying matches added in the
 * gaps between them (and before the first and after the last), into `out`.
 * A hashed table of old's 4-byte strings skips the searches that cannot find OTA_COVER_MIN
 * bytes (most of a literal gap); it has no false negatives, so it changes no result.
 * Returns 0, or -1 when memory runs out. */
static int ota_cover_gaps(const uint8_t *old, int64_t old_n, const uint8_t *nw, int64_t new_n,
                          const int32_t *sa, const ota_span *spans, int64_t count,
                          const uint8_t *literal_costs, ota_span_list *out) {
    int64_t at = 0, cursor = 0; /* new and old end of the last span out */
    int bits = 10;
    uint8_t *grams;
    while (bits < 24 && ((int64_t)1 << bits) < old_n * 8) bits++;
    grams = (uint8_t *)calloc((size_t)1 << (bits - 3), 1);
    if (grams == NULL) return -1;
    for (int64_t i = 0; i + 4 <= old_n; i++) {
        uint64_t bit = ota_gram_bit(old + i, bits);
        grams[bit >> 3] |= (uint8_t)(1u << (bit & 7));
    }
    for (int64_t s = 0; s <= count; s++) {
        int64_t gap_end = s < count ? spans[s].new_pos : new_n;
        int64_t p = at;
        while (gap_end - p >= OTA_COVER_MIN) {
            int64_t pos, need, gain = 0, k, i, score, best, back = 0, fwd = 0;
            int64_t len;
            int collinear;
            uint64_t bit = ota_gram_bit(nw + p, bits);
            if (!(grams[bit >> 3] >> (bit & 7) & 1)) { /* no 4 bytes of old match here */
                p++;
                continue;
            }
            len = ota_search(old, old_n, sa, nw + p, gap_end - p, &pos);
            if (len < OTA_COVER_MIN) {
                p++;
                continue;
            }
            collinear = out->count > 0 && pos - p == cursor - at && p - at <= OTA_COVER_LINK;
            if (collinear) {
                need = 0;
                for (k = 0; k < p - at; k++)
                    need += ota_copy_cost(old, nw, cursor + k, at + k) -
                            literal_costs[at + k];
            } else {
                need = ota_entry_cost(pos - cursor, len);
            }
            /* Each exactly matched byte saves its literal cost less a zero difference byte. */
            for (k = 0; k < len && gain <= need; k++)
                gain += literal_costs[p + k] - OTA_COVER_EQUAL;
            if (gain <= need) {
                p += len > OTA_SKIP_LEN ? len / 2 : 1;
                continue;
            }
            if (!collinear) {
                score = best = 0;
                for (i = 0; p - 1 - i >= at && pos - 1 - i >= 0 && i - back < OTA_COVER_PATIENCE;) {
                    score += literal_costs[p - 1 - i] -
                             ota_copy_cost(old, nw, pos - 1 - i, p - 1 - i);
                    i++;
                    if (score > best) {
                        best = score;
                        back = i;
                    }
                }
            }
            score = best = 0;
            for (i = 0; p + len + i < gap_end && pos + len + i < old_n && i - fwd < OTA_COVER_PATIENCE;) {
                score += literal_costs[p + len + i] -
                         ota_copy_cost(old, nw, pos + len + i, p + len + i);
                i++;
                if (score > best) {
                    best = score;
                    fwd = i;
                }
            }
            if (collinear) {
                ota_span *last = &out->items[out->count - 1];
                last->length = p + len + fwd - last->new_pos;
            } else if (ota_span_push(out, p - back, pos - back, back + len + fwd) != 0) {
                free(grams);
                return -1;
            }
            at = p = out->items[out->count - 1].new_pos + out->items[out->count - 1].length;
            cursor = out->items[out->count - 1].old_pos + out->items[out->count - 1].length;
        }
        if (s < count && spans[s].length > 0) {
            if (ota_span_push(out, spans[s].new_pos, spans[s].old_pos, spans[s].length) != 0) {
                free(grams);
                return -1;
            }
            at = spans[s].new_pos + spans[s].length;
            cursor = spans[s].old_pos + spans[s].length;
        }
    }
    free(grams);
    return 0;
}

/* ota_literal_costs: per byte of nw, its estimated compressed size as a literal byte, in
 * sixteenths of a byte (what ota_cover_gaps weighs a copy against; otacore.delta_maker says
 * where the figures come from):
 *   `run`     when it equals the byte before it (the coder repeats the previous byte);
 *   else `repeat` when it lies inside an OTA_REPEAT_GRAM-byte string that starts at most
 *             OTA_REPEAT_GRAM - 1 bytes before it (or at it) and occurred whole earlier in nw
 *             (the coder codes it as a match within the literals);
 *   else `literal`.
 * Earlier occurrences are found exactly with an open-addressing table of start positions;
 * the hash is keyed by `seed` (the caller passes random bytes), so crafted images cannot make
 * the probes long; the result does not depend on it. O(n) expected time, 8 bytes of table per
 * byte of nw at most. Returns -1 when out of memory, else 0. */
#define OTA_REPEAT_GRAM 8

static inline uint64_t ota_mix64(uint64_t x) {
    /* splitmix64's finaliser (Steele, Lea, Flood: "Fast splittable pseudorandom number
     * generators", 2014) */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

static int ota_literal_costs(const uint8_t *nw, int64_t n, uint8_t literal, uint8_t run,
                             uint8_t repeat, uint64_t seed, uint8_t *out) {
    int64_t starts = n - OTA_REPEAT_GRAM + 1, last_repeat = -OTA_REPEAT_GRAM, b;
    uint32_t *table = NULL;
    uint64_t mask = 0;
    int bits = 4;
    if (starts > 0) {
        /* positions + 1 (0: empty); n < 2^32, so they fit; load factor at most 1/2 */
        while (((int64_t)1 << bits) < 2 * starts)
            bits++;
        table = (uint32_t *)calloc((size_t)1 << bits, sizeof(uint32_t));
        if (table == NULL)
            return -1;
        mask = ((uint64_t)1 << bits) - 1;
    }
    for (b = 0; b < n; b++) {
        if (b < starts) {
            uint64_t gram, slot;
            memcpy(&gram, nw + b, OTA_REPEAT_GRAM);
            slot = ota_mix64(gram ^ seed) & mask;
            for (;;) {
                uint32_t held = table[slot];
                if (held == 0) {
                    table[slot] = (uint32_t)(b + 1);
                    break;
                }
                if (memcmp(nw + held - 1, nw + b, OTA_REPEAT_GRAM) == 0) {
                    last_repeat = b; /* the string starting at b occurred before */
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }
        if (b > 0 && nw[b] == nw[b - 1])
            out[b] = run;
        else if (b - last_repeat < OTA_REPEAT_GRAM)
            out[b] = repeat;
        else
            out[b] = literal;
    }
    free(table);
    return 0;
}

#endif /* OTA_DELTA_MATCH_H */
