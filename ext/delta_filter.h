/* Prediction of relocated code inside a copy span (the "filters" of the patch format).
 *
 * A copy span takes old bytes [span_start, span_end) to new position old + shift. Before the
 * difference bytes are added, the old bytes are rewritten the way relinking would change them:
 *
 *  - THUMB: ARMv7-M BL / B.W (encoding T1/T4, ARM ARM A7.7.18 and A7.7.12): at every even
 *    offset, a halfword 11110xxxxxxxxxxx followed by 11x1xxxxxxxxxxxx is a branch; its target
 *    (old offset) is looked up in the branch map, moved by the map's delta and re-encoded
 *    relative to the instruction's new position.
 *  - X86: E8 (CALL rel32) and E9 (JMP rel32) at any offset, the same way.
 *  - WORDS: absolute 32-bit little-endian pointers. A word whose value lies in the old image's
 *    address range [base, base + image_size) points into the image: it moves like the image
 *    offset value - base, looked up in the relocation map (the one branches use). Any other
 *    value is looked up in the value map (RAM addresses and such). With THUMB or alone, every
 *    4-aligned word not overlapping a branch is predicted; with X86, a word at any offset is
 *    predicted when its value points into the image.
 *
 * A map is sorted keys with deltas; a lookup takes the entry with the largest key <= x, and a
 * value below the first key is left as it is. Both sides (maker and applier) run this same
 * walk on the same old bytes, so only the residual differences travel in the patch.
 * otacore/_delta_py.py implements the identical walk.
 */
#ifndef OTA_DELTA_FILTER_H
#define OTA_DELTA_FILTER_H

#include <stdint.h>
#include <string.h>

#define OTA_FILTER_THUMB 1
#define OTA_FILTER_X86 2
#define OTA_FILTER_WORDS 4
/* Bytes past `limit` the walk may read (an instruction or word starting before it). */
#define OTA_LOOKAHEAD 8

typedef struct {
    const int64_t *keys;
    const int64_t *deltas;
    int64_t count;
} ota_map;

/* Everything the walk needs besides the bytes: filters, the image's address range, maps. */
typedef struct {
    int filters;
    int64_t base;       /* load address of the old image */
    int64_t image_size; /* 0: no address range, every word goes to the value map */
    ota_map reloc;      /* old image offset -> delta (branch targets, pointers into the image) */
    ota_map values;     /* word value -> delta (pointers elsewhere) */
} ota_model;

/* Observations collected by the maker to fit the maps: (key, delta) pairs. */
typedef struct {
    int64_t *keys;
    int64_t *deltas;
    int64_t count, capacity;
} ota_obs;

static inline int ota_map_find(const ota_map *map, int64_t x, int64_t *delta) {
    int64_t lo = 0, hi = map->count; /* first key > x is at hi after the search */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (map->keys[mid] <= x) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return 0;
    *delta = map->deltas[lo - 1];
    return 1;
}

static inline uint32_t ota_le16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }
static inline uint32_t ota_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline void ota_put16(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void ota_put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

/* BL (T1) or B.W (T4) in the two halfwords at p. */
static inline int ota_is_thumb_branch(const uint8_t *p) {
    uint32_t h1 = ota_le16(p), h2 = ota_le16(p + 2);
    return (h1 & 0xF800u) == 0xF000u && ((h2 & 0xD000u) == 0xD000u || (h2 & 0xD000u) == 0x9000u);
}

/* Signed byte offset of a BL/B.W: SignExtend(S:I1:I2:imm10:imm11:0), I = NOT(J XOR S). */
static inline int64_t ota_thumb_offset(const uint8_t *p) {
    uint32_t h1 = ota_le16(p), h2 = ota_le16(p + 2);
    uint32_t s = (h1 >> 10) & 1u, j1 = (h2 >> 13) & 1u, j2 = (h2 >> 11) & 1u;
    uint32_t i1 = 1u ^ (j1 ^ s), i2 = 1u ^ (j2 ^ s);
    int64_t off = ((int64_t)i1 << 23) | ((int64_t)i2 << 22) | ((int64_t)(h1 & 0x3FFu) << 12) |
                  ((int64_t)(h2 & 0x7FFu) << 1);
    return s ? off - ((int64_t)1 << 24) : off;
}

/* Re-encode offset `off` into the branch at p (keeping its BL/B.W kind); 0 if it cannot. */
static inline int ota_thumb_encode(uint8_t *p, int64_t off) {
    uint32_t h1 = ota_le16(p), h2 = ota_le16(p + 2), s, i1, i2;
    if ((off & 1) || off < -((int64_t)1 << 24) || off >= ((int64_t)1 << 24)) return 0;
    s = (uint32_t)((off >> 24) & 1);
    i1 = (uint32_t)((off >> 23) & 1);
    i2 = (uint32_t)((off >> 22) & 1);
    h1 = (h1 & 0xF800u) | (s << 10) | (uint32_t)((off >> 12) & 0x3FF);
    h2 = (h2 & 0xD000u) | (((1u ^ i1) ^ s) << 13) | (((1u ^ i2) ^ s) << 11) |
         (uint32_t)((off >> 1) & 0x7FF);
    ota_put16(p, h1);
    ota_put16(p + 2, h2);
    return 1;
}

static inline int32_t ota_s32(uint32_t v) { return (int32_t)v; }

/* target + delta - base in wrapping 64-bit arithmetic (deltas come from the patch). */
static inline int64_t ota_wrap(int64_t target, int64_t delta, int64_t base) {
    return (int64_t)((uint64_t)target + (uint64_t)delta - (uint64_t)base);
}

static int ota_obs_push(ota_obs *obs, int64_t key, int64_t delta) {
    if (obs->count == obs->capacity) {
        int64_t cap = obs->capacity ? obs->capacity * 2 : 1024;
        int64_t *k = (int64_t *)realloc(obs->keys, (size_t)cap * sizeof(int64_t));
        if (k == NULL) return -1;
        obs->keys = k;
        int64_t *d = (int64_t *)realloc(obs->deltas, (size_t)cap * sizeof(int64_t));
        if (d == NULL) return -1;
        obs->deltas = d;
        obs->capacity = cap;
    }
    obs->keys[obs->count] = key;
    obs->deltas[obs->count] = delta;
    obs->count++;
    return 0;
}

static inline int ota_in_image(const ota_model *m, uint32_t w) {
    return m->image_size > 0 && (int64_t)w >= m->base && (int64_t)w - m->base < m->image_size;
}

/* Predicted value of pointer word w (unchanged when no map covers it). */
static inline uint32_t ota_predict_word(const ota_model *m, uint32_t w) {
    int64_t delta;
    if (ota_in_image(m, w)) {
        if (ota_map_find(&m->reloc, (int64_t)w - m->base, &delta)) w += (uint32_t)(uint64_t)delta;
    } else if (ota_map_find(&m->values, (int64_t)w, &delta)) {
        w += (uint32_t)(uint64_t)delta;
    }
    return w;
}

/* t wrapped into the signed 25-bit range of a BL offset, even. */
static inline int64_t ota_wrap25(int64_t t) {
    int64_t v = (int64_t)(((uint64_t)t + ((uint64_t)1 << 24)) & (((uint64_t)1 << 25) - 1));
    return (v - ((int64_t)1 << 24)) & ~(int64_t)1;
}

/* Walk old bytes src (src[0] is old offset pos) from pos while below min(limit, span_end).
 *
 * Absolute mode (absolute != 0, out != NULL): branches and calls are rewritten to hold their
 * (mapped) absolute target instead of a relative offset, words are mapped as in predict mode.
 * The maker matches such normalised images so that relocated code compares equal.
 *
 * Predict mode (out != NULL): writes the predicted bytes for [pos, returned) to out, which
 * needs room for min(limit, span_end) - pos + OTA_LOOKAHEAD bytes. src must hold the old
 * bytes up to min(limit + OTA_LOOKAHEAD, span_end).
 * Observe mode (out == NULL, nw != NULL): records (old target, new target - old target) per
 * branch into branch_obs and (old word, new word - old word) per word into word_obs, reading
 * the new bytes at nw[offset + shift].
 * Returns the old offset where the walk stopped (>= min(limit, span_end)), or -1 when an
 * observation could not be stored. */
static int64_t ota_filter_walk(const uint8_t *src, int64_t pos, int64_t span_end, int64_t limit,
                               int64_t shift, const ota_model *m, uint8_t *out, const uint8_t *nw,
                               ota_obs *branch_obs, ota_obs *word_obs, int absolute) {
    int64_t s = pos, stop = limit < span_end ? limit : span_end, delta;
    int thumb = (m->filters & OTA_FILTER_THUMB) != 0, words = (m->filters & OTA_FILTER_WORDS) != 0;
#define OTA_AT(x) (src + ((x) - pos))
#define OTA_OUT(x) (out + ((x) - pos))
#define OTA_KEEP(x, n) \
    do { if (out != NULL) memcpy(OTA_OUT(x), OTA_AT(x), (size_t)(n)); } while (0)
#define OTA_WORD(x)                                                                  \
    do {                                                                             \
        uint32_t w = ota_le32(OTA_AT(x));                                            \
        if (out != NULL) {                                                           \
            ota_put32(OTA_OUT(x), ota_predict_word(m, w));                           \
        } else if (ota_obs_push(word_obs, (int64_t)w,                                \
                                (int64_t)ota_s32(ota_le32(nw + (x) + shift) - w)) != 0) { \
            return -1;                                                               \
        }                                                                            \
    } while (0)
    if (!(m->filters & OTA_FILTER_X86) && (thumb || words)) {
        if ((s & 1) && s < stop) { /* instructions sit at even offsets */
            OTA_KEEP(s, 1);
            s++;
        }
        while (s < stop) {
            if (s + 2 > span_end) {
                OTA_KEEP(s, 1);
                s++;
            } else if (thumb && s + 4 <= span_end && ota_is_thumb_branch(OTA_AT(s))) {
                int64_t target = s + 4 + ota_thumb_offset(OTA_AT(s));
                if (out != NULL) {
                    int found = ota_map_find(&m->reloc, target, &delta);
                    memcpy(OTA_OUT(s), OTA_AT(s), 4);
                    if (absolute)
                        ota_thumb_encode(OTA_OUT(s), ota_wrap25(ota_wrap(target, found ? delta : 0, 0)));
                    else if (found)
                        ota_thumb_encode(OTA_OUT(s), ota_wrap(target, delta, s + shift + 4));
                } else if (ota_is_thumb_branch(nw + s + shift)) {
                    int64_t moved = s + shift + 4 + ota_thumb_offset(nw + s + shift);
                    if (ota_obs_push(branch_obs, target, moved - target) != 0) return -1;
                }
                s += 4;
            } else if (words && (s & 3) == 0 && s + 4 <= span_end &&
                       !(thumb && s + 6 <= span_end && ota_is_thumb_branch(OTA_AT(s + 2)))) {
                OTA_WORD(s);
                s += 4;
            } else {
                OTA_KEEP(s, 2);
                s += 2;
            }
        }
    } else if (m->filters & OTA_FILTER_X86) {
        while (s < stop) {
            const uint8_t *p = OTA_AT(s);
            if (words && s + 4 <= span_end && ota_in_image(m, ota_le32(p))) {
                OTA_WORD(s);
                s += 4;
            } else if ((p[0] == 0xE8 || p[0] == 0xE9) && s + 5 <= span_end) {
                int64_t target = s + 5 + ota_s32(ota_le32(p + 1));
                if (out != NULL) {
                    int found = ota_map_find(&m->reloc, target, &delta);
                    out[s - pos] = p[0];
                    if (absolute)
                        ota_put32(OTA_OUT(s + 1), (uint32_t)ota_wrap(target, found ? delta : 0, 0));
                    else if (found)
                        ota_put32(OTA_OUT(s + 1), (uint32_t)ota_wrap(target, delta, s + shift + 5));
                    else
                        memcpy(OTA_OUT(s + 1), p + 1, 4);
                } else if (nw[s + shift] == p[0]) {
                    int64_t moved = s + shift + 5 + ota_s32(ota_le32(nw + s + shift + 1));
                    if (ota_obs_push(branch_obs, target, moved - target) != 0) return -1;
                }
                s += 5;
            } else {
                OTA_KEEP(s, 1);
                s++;
            }
        }
    } else if (s < stop) {
        OTA_KEEP(s, stop - s);
        s = stop;
    }
#undef OTA_AT
#undef OTA_OUT
#undef OTA_KEEP
#undef OTA_WORD
    return s;
}

#endif /* OTA_DELTA_FILTER_H */
