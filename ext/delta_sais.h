/* Suffix array construction by induced sorting (SA-IS).
 *
 * Nong, Zhang and Chan, "Two Efficient Algorithms for Linear Time Suffix Array
 * Construction" (IEEE Trans. Computers, 2011). Linear time; the recursion works on the
 * reduced string of LMS-substring names. Suffixes are ordered as if the text ended with a
 * virtual sentinel smaller than every symbol, so a proper prefix sorts first.
 *
 * Used by ext/delta.pyx to match a new firmware image against the old one.
 */
#ifndef OTA_DELTA_SAIS_H
#define OTA_DELTA_SAIS_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Symbol i of the text: bytes at the top level, int32 names in the recursion. */
#define OTA_SYM(i) (t8 != NULL ? (int32_t)t8[(i)] : t32[(i)])
/* An LMS position: S-type with an L-type left neighbour. */
#define OTA_IS_LMS(i) ((i) > 0 && types[(i)] && !types[(i) - 1])

static void ota_sais_bucket_bounds(const int32_t *counts, int32_t *bucket, int32_t alphabet,
                                   int ends) {
    int64_t sum = 0;
    for (int32_t c = 0; c < alphabet; c++) {
        sum += counts[c];
        bucket[c] = (int32_t)(ends ? sum : sum - counts[c]);
    }
}

/* Induce the order of L-type suffixes from the placed ones, then of S-type suffixes. */
static void ota_sais_induce(const unsigned char *t8, const int32_t *t32, int32_t *sa, int32_t n,
                            int32_t alphabet, const uint8_t *types, const int32_t *counts,
                            int32_t *bucket) {
    int32_t i, j;
    ota_sais_bucket_bounds(counts, bucket, alphabet, 0);
    /* Suffix n-1 is L-type and follows the virtual sentinel, so it leads its bucket. */
    sa[bucket[OTA_SYM(n - 1)]++] = n - 1;
    for (i = 0; i < n; i++) {
        j = sa[i] - 1;
        if (sa[i] > 0 && !types[j]) sa[bucket[OTA_SYM(j)]++] = j;
    }
    ota_sais_bucket_bounds(counts, bucket, alphabet, 1);
    for (i = n - 1; i >= 0; i--) {
        j = sa[i] - 1;
        if (sa[i] > 0 && types[j]) sa[--bucket[OTA_SYM(j)]] = j;
    }
}

/* Sort the suffixes of t8 (bytes) or t32 (names < alphabet) of length n into sa.
 * Returns 0, or -1 when memory runs out. */
static int ota_sais_sort(const unsigned char *t8, const int32_t *t32, int32_t *sa, int32_t n,
                         int32_t alphabet) {
    int32_t i, j, lms_count, names, prev, pos, d;
    int rc = -1;
    uint8_t *types = NULL;
    int32_t *counts = NULL, *bucket = NULL;

    if (n <= 0) return 0;
    if (n == 1) {
        sa[0] = 0;
        return 0;
    }
    types = (uint8_t *)malloc((size_t)n);
    counts = (int32_t *)calloc((size_t)alphabet, sizeof(int32_t));
    bucket = (int32_t *)malloc((size_t)alphabet * sizeof(int32_t));
    if (types == NULL || counts == NULL || bucket == NULL) goto done;

    /* Classify: S-type (1) when smaller than the next suffix, L-type (0) otherwise. */
    types[n - 1] = 0;
    for (i = n - 2; i >= 0; i--) {
        int32_t a = OTA_SYM(i), b = OTA_SYM(i + 1);
        types[i] = (uint8_t)(a < b || (a == b && types[i + 1]));
    }
    for (i = 0; i < n; i++) counts[OTA_SYM(i)]++;

    /* Stage 1: sort the LMS substrings by one induced pass from unsorted LMS seeds. */
    for (i = 0; i < n; i++) sa[i] = -1;
    ota_sais_bucket_bounds(counts, bucket, alphabet, 1);
    for (i = 1; i < n; i++) {
        if (OTA_IS_LMS(i)) sa[--bucket[OTA_SYM(i)]] = i;
    }
    ota_sais_induce(t8, t32, sa, n, alphabet, types, counts, bucket);

    /* Gather the sorted LMS positions at the front (at most n/2 of them). */
    lms_count = 0;
    for (i = 0; i < n; i++) {
        pos = sa[i];
        if (OTA_IS_LMS(pos)) sa[lms_count++] = pos;
    }
    /* Name them: equal LMS substrings share a name. Names go to sa[lms_count + pos/2],
     * distinct slots because LMS positions are at least two apart. */
    for (i = lms_count; i < n; i++) sa[i] = -1;
    names = 0;
    prev = -1;
    for (i = 0; i < lms_count; i++) {
        int differ = 0;
        pos = sa[i];
        for (d = 0;; d++) {
            if (prev < 0 || pos + d == n || prev + d == n ||
                OTA_SYM(pos + d) != OTA_SYM(prev + d) || types[pos + d] != types[prev + d]) {
                differ = 1;
                break;
            }
            if (d > 0 && (OTA_IS_LMS(pos + d) || OTA_IS_LMS(prev + d))) break;
        }
        if (differ) {
            names++;
            prev = pos;
        }
        sa[lms_count + (pos >> 1)] = names - 1;
    }
    /* The reduced string: names in text order, packed at the end of sa. */
    for (i = n - 1, j = n - 1; i >= lms_count; i--) {
        if (sa[i] >= 0) sa[j--] = sa[i];
    }

    /* Stage 2: sort the reduced string (recursively unless all names differ). */
    {
        int32_t *reduced = sa + n - lms_count;
        if (names < lms_count) {
            if (ota_sais_sort(NULL, reduced, sa, lms_count, names) != 0) goto done;
        } else {
            for (i = 0; i < lms_count; i++) sa[reduced[i]] = i;
        }
        /* Map ranks of the reduced string back to LMS positions of the text. */
        for (i = 1, j = 0; i < n; i++) {
            if (OTA_IS_LMS(i)) reduced[j++] = i;
        }
        for (i = 0; i < lms_count; i++) sa[i] = reduced[sa[i]];
    }

    /* Stage 3: seed the sorted LMS suffixes at their bucket ends and induce the rest. */
    for (i = lms_count; i < n; i++) sa[i] = -1;
    ota_sais_bucket_bounds(counts, bucket, alphabet, 1);
    for (i = lms_count - 1; i >= 0; i--) {
        j = sa[i];
        sa[i] = -1;
        sa[--bucket[OTA_SYM(j)]] = j;
    }
    ota_sais_induce(t8, t32, sa, n, alphabet, types, counts, bucket);
    rc = 0;

done:
    free(types);
    free(counts);
    free(bucket);
    return rc;
}

/* Suffix array of a byte string: sa[k] is the start of the k-th smallest suffix. */
static int ota_suffix_array(const unsigned char *text, int32_t *sa, int32_t n) {
    return ota_sais_sort(text, NULL, sa, n, 256);
}

#undef OTA_SYM
#undef OTA_IS_LMS

#endif /* OTA_DELTA_SAIS_H */
