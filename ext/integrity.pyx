# cython: language_level=3
"""Integrity kernels: CRC-32 (hardware folding where the CPU has it) and module digests.

Twin: otacore/_integrity_py.py (same functions, same results).
"""

import hashlib

import numpy as np

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint32_t

cdef extern from "crc32_fast.h" nogil:
    void ota_crc32_init()
    uint32_t ota_crc32(uint32_t crc, const unsigned char *buf, size_t length)
    int ota_crc_has_clmul

ota_crc32_init()


def hardware_crc() -> bool:
    """True when CRC-32 runs on carry-less multiplication (PCLMULQDQ)."""
    return bool(ota_crc_has_clmul)


def crc32(data, unsigned int value=0):
    """CRC-32 of ``data`` continuing from ``value``; equals ``zlib.crc32(data, value)``."""
    cdef const unsigned char *ptr
    cdef size_t n
    cdef uint32_t out
    cdef const unsigned char[::1] view
    if type(data) is bytes:
        # Fast path for the common case (chunks of 512 B-16 KiB): no buffer acquisition.
        ptr = <const unsigned char *>PyBytes_AS_STRING(data)
        n = <size_t>PyBytes_GET_SIZE(data)
        if n < 4096:
            return ota_crc32(value, ptr, n)
        with nogil:
            out = ota_crc32(value, ptr, n)
        return out
    view = memoryview(data).cast("B")
    n = view.shape[0]
    if n == 0:
        return value
    with nogil:
        out = ota_crc32(value, &view[0], n)
    return out


def crc32_batch(data, offsets):
    """CRC-32 of each chunk ``data[offsets[i]:offsets[i+1]]``, as a uint32 numpy array.

    ``offsets`` holds n+1 non-decreasing boundaries within ``data``; the work runs with the
    GIL released.
    """
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef int64_t[::1] b = np.ascontiguousarray(offsets, dtype=np.int64)
    cdef Py_ssize_t count = b.shape[0] - 1
    cdef Py_ssize_t size = view.shape[0]
    cdef Py_ssize_t i
    cdef int64_t start, stop
    if count < 0:
        raise ValueError("offsets must hold at least one boundary")
    for i in range(count):
        if b[i] < 0 or b[i] > b[i + 1] or b[i + 1] > size:
            raise ValueError(f"chunk {i} bounds [{b[i]}, {b[i + 1]}) are outside 0..{size}")
    result = np.empty(count, dtype=np.uint32)
    cdef uint32_t[::1] out = result
    if count == 0:
        return result
    if size == 0:
        out[:] = 0
        return result
    with nogil:
        for i in range(count):
            start = b[i]
            stop = b[i + 1]
            out[i] = ota_crc32(0, &view[0] + start, <size_t>(stop - start))
    return result


def module_digests(image):
    """(CRC-32 over all but the last 4 bytes, SHA-256 over all but the last 38 bytes).

    These are the two values a Particle module stores in its suffix (build/module.mk).
    """
    cdef const unsigned char[::1] view = memoryview(image).cast("B")
    cdef size_t n = view.shape[0]
    cdef uint32_t crc
    if n < 38:
        raise ValueError(f"a module image needs at least 38 bytes, got {n}")
    with nogil:
        crc = ota_crc32(0, &view[0], n - 4)
    # hashlib releases the GIL for large buffers and runs OpenSSL's SHA-NI code.
    digest = hashlib.sha256(memoryview(image).cast("B")[: n - 38]).digest()
    return crc, digest
