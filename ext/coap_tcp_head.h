/* The head of a CoAP-over-TCP frame (RFC 8323 section 3.2), shared by the kernels that
 * encode such frames (coap.pyx, chunk_framing.pyx): Len and TKL in the first byte, then 0,
 * 1, 2 or 4 bytes of extended length, selected by how many bytes follow the token. */
#ifndef OTA_COAP_TCP_HEAD_H
#define OTA_COAP_TCP_HEAD_H

#include <stddef.h>

/* Extended-length bytes of a frame whose Len counts `length` bytes (0, 1, 2 or 4). The
 * caller refuses lengths past 65805 + 0xFFFFFFFF. */
static inline int ota_tcp_ext_size(size_t length) {
    if (length < 13) return 0;
    if (length < 269) return 1;
    if (length < 65805) return 2;
    return 4;
}

/* Write Len/TKL and the extended length (ext = ota_tcp_ext_size(length)) at `out`. */
static inline void ota_put_tcp_length(unsigned char *out, size_t length, int ext, int tkl) {
    if (ext == 0) {
        out[0] = (unsigned char)(length << 4 | tkl);
    } else if (ext == 1) {
        out[0] = (unsigned char)(13 << 4 | tkl);
        out[1] = (unsigned char)(length - 13);
    } else if (ext == 2) {
        out[0] = (unsigned char)(14 << 4 | tkl);
        out[1] = (unsigned char)((length - 269) >> 8);
        out[2] = (unsigned char)((length - 269) & 0xFF);
    } else {
        size_t extended = length - 65805;
        out[0] = (unsigned char)(15 << 4 | tkl);
        out[1] = (unsigned char)((extended >> 24) & 0xFF);
        out[2] = (unsigned char)((extended >> 16) & 0xFF);
        out[3] = (unsigned char)((extended >> 8) & 0xFF);
        out[4] = (unsigned char)(extended & 0xFF);
    }
}

#endif
