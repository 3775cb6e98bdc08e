/*
 * CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320: the one zlib.crc32 computes).
 *
 * Two implementations behind one entry point:
 *  - carry-less multiplication folding (Intel white paper "Fast CRC Computation for Generic
 *    Polynomials Using PCLMULQDQ Instruction", 2009; the constants are the bit-reflected k1..k5
 *    and Barrett constants of that paper, as used by Chromium's zlib crc32_simd.c), chosen at
 *    run time when the CPU has PCLMULQDQ and SSE4.1;
 *  - slicing-by-8 tables for everything else and for the tails.
 * Both operate on the "inverted" register form internally; ota_crc32() takes and returns the
 * final (zlib-compatible) value, so ota_crc32(ota_crc32(0, a), b) == zlib.crc32(a + b).
 */
#ifndef OTA_CRC32_FAST_H
#define OTA_CRC32_FAST_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t ota_crc_table[8][256];
static int ota_crc_ready = 0;
static int ota_crc_has_clmul = 0;

static void ota_crc32_init(void)
{
    if (ota_crc_ready) return;
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
        ota_crc_table[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = ota_crc_table[0][n];
        for (int t = 1; t < 8; t++) {
            c = ota_crc_table[0][c & 0xff] ^ (c >> 8);
            ota_crc_table[t][n] = c;
        }
    }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    ota_crc_has_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
    ota_crc_ready = 1;
}

/* Slicing-by-8 over the inverted register. */
static uint32_t ota_crc32_slice8(uint32_t c, const unsigned char *buf, size_t len)
{
    while (len && ((uintptr_t)buf & 7)) {
        c = ota_crc_table[0][(c ^ *buf++) & 0xff] ^ (c >> 8);
        len--;
    }
    while (len >= 8) {
        uint32_t lo, hi;
        memcpy(&lo, buf, 4);
        memcpy(&hi, buf + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        lo = __builtin_bswap32(lo);
        hi = __builtin_bswap32(hi);
#endif
        lo ^= c;
        c = ota_crc_table[7][lo & 0xff] ^ ota_crc_table[6][(lo >> 8) & 0xff] ^
            ota_crc_table[5][(lo >> 16) & 0xff] ^ ota_crc_table[4][lo >> 24] ^
            ota_crc_table[3][hi & 0xff] ^ ota_crc_table[2][(hi >> 8) & 0xff] ^
            ota_crc_table[1][(hi >> 16) & 0xff] ^ ota_crc_table[0][hi >> 24];
        buf += 8;
        len -= 8;
    }
    while (len--) c = ota_crc_table[0][(c ^ *buf++) & 0xff] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

/* Folds len bytes (len >= 64, a multiple of 16) into the inverted register c. */
__attribute__((target("pclmul,sse4.1")))
static uint32_t ota_crc32_clmul(uint32_t c, const unsigned char *buf, size_t len)
{
    static const uint64_t k1k2[2] __attribute__((aligned(16))) = {0x0154442bd4ULL, 0x01c6e41596ULL};
    static const uint64_t k3k4[2] __attribute__((aligned(16))) = {0x01751997d0ULL, 0x00ccaa009eULL};
    static const uint64_t k5k0[2] __attribute__((aligned(16))) = {0x0163cd6124ULL, 0x0000000000ULL};
    static const uint64_t poly[2] __attribute__((aligned(16))) = {0x01db710641ULL, 0x01f7011641ULL};
    __m128i x0, x1, x2, x3, x4, x5, x6, x7, x8, y5, y6, y7, y8;

    x1 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
    x2 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
    x3 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
    x4 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    x0 = _mm_load_si128((const __m128i *)k1k2);
    buf += 64;
    len -= 64;

    /* Fold four 128-bit lanes in parallel. */
    while (len >= 64) {
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x6 = _mm_clmulepi64_si128(x2, x0, 0x00);
        x7 = _mm_clmulepi64_si128(x3, x0, 0x00);
        x8 = _mm_clmulepi64_si128(x4, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x2 = _mm_clmulepi64_si128(x2, x0, 0x11);
        x3 = _mm_clmulepi64_si128(x3, x0, 0x11);
        x4 = _mm_clmulepi64_si128(x4, x0, 0x11);
        y5 = _mm_loadu_si128((const __m128i *)(buf + 0x00));
        y6 = _mm_loadu_si128((const __m128i *)(buf + 0x10));
        y7 = _mm_loadu_si128((const __m128i *)(buf + 0x20));
        y8 = _mm_loadu_si128((const __m128i *)(buf + 0x30));
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), y5);
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), y6);
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), y7);
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), y8);
        buf += 64;
        len -= 64;
    }

    /* Fold the four lanes into one. */
    x0 = _mm_load_si128((const __m128i *)k3k4);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x3), x5);
    x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
    x1 = _mm_xor_si128(_mm_xor_si128(x1, x4), x5);

    /* Single folds of the remaining 16-byte blocks. */
    while (len >= 16) {
        x2 = _mm_loadu_si128((const __m128i *)buf);
        x5 = _mm_clmulepi64_si128(x1, x0, 0x00);
        x1 = _mm_clmulepi64_si128(x1, x0, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x2), x5);
        buf += 16;
        len -= 16;
    }

    /* 128 -> 64 bits. */
    x2 = _mm_clmulepi64_si128(x1, x0, 0x10);
    x3 = _mm_setr_epi32(~0, 0, ~0, 0);
    x1 = _mm_srli_si128(x1, 8);
    x1 = _mm_xor_si128(x1, x2);
    x0 = _mm_loadl_epi64((const __m128i *)k5k0);
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_and_si128(x1, x3);
    x1 = _mm_clmulepi64_si128(x1, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);

    /* Barrett reduction to 32 bits. */
    x0 = _mm_load_si128((const __m128i *)poly);
    x2 = _mm_and_si128(x1, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x10);
    x2 = _mm_and_si128(x2, x3);
    x2 = _mm_clmulepi64_si128(x2, x0, 0x00);
    x1 = _mm_xor_si128(x1, x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

/* zlib-compatible: crc is the running CRC-32 of the bytes before buf (0 to start). */
static uint32_t ota_crc32(uint32_t crc, const unsigned char *buf, size_t len)
{
    uint32_t c = ~crc;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (ota_crc_has_clmul && len >= 64) {
        size_t bulk = len & ~(size_t)15;
        c = ota_crc32_clmul(c, buf, bulk);
        buf += bulk;
        len -= bulk;
    }
#endif
    c = ota_crc32_slice8(c, buf, len);
    return ~c;
}

#endif /* OTA_CRC32_FAST_H */
