# cython: language_level=3
"""Chunk framing kernel: a window of firmware chunks framed as CoAP messages, records sealed.

Twin: otacore/_chunk_framing_py.py (same functions, same results, same error classes and
messages; the module docstring there describes the formats). Buffers are read through the
buffer protocol as (pointer, length); every read is checked against the length first
because setup.py turns bounds checking off. The AEAD is `cryptography`'s, called with
nonces and additional data built here; the caller owns the sequence numbers.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy

from operator import index

from otacore._chunk_framing_py import (
    CHUNK_KIND,
    CHUNK_PREFIX_SIZE,
    MAX_DTLS_SEQUENCE,
    MAX_RECORD_PLAINTEXT,
    MAX_WINDOW_CHUNKS,
    ChunkFramingError,
    ChunkRangeError,
    WindowTooLargeError,
    _message_ids,
    _tokens,
)
from otacore.transfer.messages import MAX_CHUNK_SIZE

cdef extern from "crc32_fast.h" nogil:
    void ota_crc32_init()
    uint32_t ota_crc32(uint32_t crc, const unsigned char *buf, size_t length)

ota_crc32_init()

cdef extern from "coap_tcp_head.h" nogil:
    int ota_tcp_ext_size(size_t length)
    void ota_put_tcp_length(unsigned char *out, size_t length, int ext, int tkl)

cdef enum:
    MAX_TOKEN = 8
    DTLS12_VERSION = 0xFEFD
    DTLS_HEADER_SIZE = 13
    TLS13_HEADER_SIZE = 5
    TLS13_APPLICATION_DATA = 23


cdef inline void _put_u32le(unsigned char* out, uint32_t value) noexcept:
    out[0] = <unsigned char>(value & 0xFF)
    out[1] = <unsigned char>((value >> 8) & 0xFF)
    out[2] = <unsigned char>((value >> 16) & 0xFF)
    out[3] = <unsigned char>(value >> 24)


cdef inline void _put_u64be(unsigned char* out, uint64_t value) noexcept:
    cdef int k
    for k in range(8):
        out[k] = <unsigned char>((value >> (56 - 8 * k)) & 0xFF)


def frame_chunks(image, chunk_size, numbers, crcs, transfer_id, tcp, msg_type, code,
                 message_ids, tokens, options):
    """The CoAP message carrying each chunk of ``numbers`` (1-based), in order.

    See the twin for the arguments; results and errors are the twin's.
    """
    cdef Py_buffer img
    cdef Py_buffer opt
    cdef Py_ssize_t size, csize, count, i, number, chunk_count, offset, end, dlen
    cdef Py_ssize_t tkl, olen, total, pos, length = 0, ext = 0
    cdef uint32_t crc, tid
    cdef int mtype, ccode, mid = 0, first_mid = 0
    cdef bint use_tcp, same_token, consecutive = False
    cdef const unsigned char* base
    cdef const char* token_ptr
    cdef unsigned char* out
    cdef list chunk_numbers, ids = None, token_list = None, frames
    cdef bytes token = None, frame
    PyObject_GetBuffer(image, &img, PyBUF_SIMPLE)
    try:
        base = <const unsigned char*>img.buf
        size = img.len
        chunk_size = index(chunk_size)
        transfer_id = index(transfer_id)
        msg_type = index(msg_type)
        code = index(code)
        chunk_numbers = [index(n) for n in numbers]
        count = len(chunk_numbers)
        if count > MAX_WINDOW_CHUNKS:
            raise WindowTooLargeError(
                f"a window of {count} chunks exceeds the {MAX_WINDOW_CHUNKS}-chunk maximum; "
                "frame it in several calls"
            )
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ChunkFramingError(f"chunk size {chunk_size} is outside 1..{MAX_CHUNK_SIZE}")
        if not 0 <= transfer_id <= 0xFFFFFFFF:
            raise ChunkFramingError(f"transfer id {transfer_id} does not fit in 32 bits")
        if not 0 <= msg_type <= 3:
            raise ChunkFramingError(f"message type {msg_type} is outside 0..3")
        if not 1 <= code <= 255:
            # Code 0.00 is an Empty message, which carries no payload (RFC 7252 4.1).
            raise ChunkFramingError(f"code {code} is outside 1..255 (0.00 carries no payload)")
        csize = chunk_size
        tid = transfer_id
        mtype = msg_type
        ccode = code
        chunk_count = (size + csize - 1) // csize
        if crcs is not None and len(crcs) < chunk_count:
            raise ChunkFramingError(
                f"{len(crcs)} CRCs for a file of {chunk_count} chunks; "
                "give one per chunk of the file"
            )
        use_tcp = bool(tcp)
        if not use_tcp:
            if isinstance(message_ids, int):
                if not 0 <= message_ids <= 0xFFFF:
                    raise ChunkFramingError(f"message id {message_ids} is outside 0..65535")
                first_mid = message_ids
                consecutive = True
            else:
                ids = _message_ids(message_ids, count)
        same_token = isinstance(tokens, (bytes, bytearray, memoryview))
        if same_token:
            token = bytes(tokens)
            if PyBytes_GET_SIZE(token) > MAX_TOKEN:
                raise ChunkFramingError(
                    f"token of {PyBytes_GET_SIZE(token)} bytes exceeds the 8-byte maximum "
                    "(RFC 7252 3)"
                )
        else:
            token_list = _tokens(tokens, count)
        PyObject_GetBuffer(options, &opt, PyBUF_SIMPLE)
        try:
            olen = opt.len
            frames = []
            for i in range(count):
                number_obj = chunk_numbers[i]
                if not 1 <= number_obj <= chunk_count:
                    raise ChunkRangeError(
                        f"chunk {number_obj} is outside the file's chunks 1..{chunk_count}"
                    )
                number = number_obj
                offset = (number - 1) * csize
                end = offset + csize
                if end > size:
                    end = size
                dlen = end - offset
                if crcs is None:
                    crc = ota_crc32(0, base + offset, <size_t>dlen)
                else:
                    crc = <uint32_t>(index(crcs[number - 1]) & 0xFFFFFFFF)
                if not same_token:
                    token = token_list[i]
                tkl = PyBytes_GET_SIZE(token)
                token_ptr = PyBytes_AS_STRING(token)
                if use_tcp:
                    length = olen + 1 + CHUNK_PREFIX_SIZE + dlen
                    ext = ota_tcp_ext_size(<size_t>length)
                    total = 2 + ext + tkl + length
                else:
                    total = 4 + tkl + olen + 1 + CHUNK_PREFIX_SIZE + dlen
                frame = PyBytes_FromStringAndSize(NULL, total)
                out = <unsigned char*>PyBytes_AS_STRING(frame)
                if use_tcp:
                    # RFC 8323 3.2: Len counts the bytes after the token.
                    ota_put_tcp_length(out, <size_t>length, <int>ext, <int>tkl)
                    out[1 + ext] = <unsigned char>ccode
                    pos = 2 + ext
                else:
                    mid = ((first_mid + i) & 0xFFFF) if consecutive else ids[i]
                    out[0] = <unsigned char>(0x40 | mtype << 4 | tkl)
                    out[1] = <unsigned char>ccode
                    out[2] = <unsigned char>(mid >> 8)
                    out[3] = <unsigned char>(mid & 0xFF)
                    pos = 4
                memcpy(out + pos, token_ptr, tkl)
                pos += tkl
                memcpy(out + pos, opt.buf, olen)
                pos += olen
                out[pos] = 0xFF
                out[pos + 1] = <unsigned char>CHUNK_KIND
                _put_u32le(out + pos + 2, tid)
                _put_u32le(out + pos + 6, <uint32_t>number)
                _put_u32le(out + pos + 10, crc)
                pos += 1 + CHUNK_PREFIX_SIZE
                memcpy(out + pos, base + offset, dlen)
                frames.append(frame)
            return frames
        finally:
            PyBuffer_Release(&opt)
    finally:
        PyBuffer_Release(&img)


cdef Py_ssize_t _check_payload_sizes(list payloads) except -1:
    """Refuse a payload larger than one record holds, before anything is sealed."""
    cdef Py_buffer buf
    cdef Py_ssize_t n
    for payload in payloads:
        if PyBytes_CheckExact(payload):
            n = PyBytes_GET_SIZE(payload)
        else:
            PyObject_GetBuffer(payload, &buf, PyBUF_SIMPLE)
            n = buf.len
            PyBuffer_Release(&buf)
        if n > MAX_RECORD_PLAINTEXT:
            raise ChunkFramingError(
                f"a record holds at most {MAX_RECORD_PLAINTEXT} bytes of plaintext, got {n}"
            )
    return 0


def seal_dtls12(encrypt, write_iv, epoch, first_seq, explicit_nonce, content_type, payloads):
    """One DTLS 1.2 record per payload, as datagrams; see the twin."""
    cdef unsigned char nonce[12]
    cdef unsigned char aad[13]
    cdef unsigned char* out
    cdef const unsigned char* ivp
    cdef uint64_t epoch_seq, first
    cdef Py_ssize_t i, n, body, k
    cdef int ctype
    cdef bint explicit
    cdef bytes iv, plain, sealed, record
    cdef list items, records = []
    epoch = index(epoch)
    first_seq = index(first_seq)
    content_type = index(content_type)
    items = list(payloads)
    _check_payload_sizes(items)
    if not 0 <= epoch <= 0xFFFF:
        raise ChunkFramingError(f"epoch {epoch} is outside 0..65535")
    if first_seq < 0 or first_seq + len(items) - 1 > MAX_DTLS_SEQUENCE:
        raise ChunkFramingError(
            f"sequence numbers {first_seq}.. of {len(items)} records pass 2^48 - 1"
        )
    if not 0 <= content_type <= 255:
        raise ChunkFramingError(f"content type {content_type} is outside 0..255")
    explicit = bool(explicit_nonce)
    iv = bytes(write_iv)
    if PyBytes_GET_SIZE(iv) != (4 if explicit else 12):
        raise ChunkFramingError(
            f"a write IV of {PyBytes_GET_SIZE(iv)} bytes; this nonce style needs "
            f"{4 if explicit else 12}"
        )
    ivp = <const unsigned char*>PyBytes_AS_STRING(iv)
    first = (<uint64_t>epoch << 48) | <uint64_t>first_seq
    ctype = content_type
    for i in range(len(items)):
        plain = items[i] if PyBytes_CheckExact(items[i]) else bytes(items[i])
        n = PyBytes_GET_SIZE(plain)
        epoch_seq = first + <uint64_t>i
        # additional_data = epoch||seq, type, version, length (RFC 5246 6.2.3.3, RFC 6347 4.1.2.1)
        _put_u64be(aad, epoch_seq)
        aad[8] = <unsigned char>ctype
        aad[9] = <unsigned char>(DTLS12_VERSION >> 8)
        aad[10] = <unsigned char>(DTLS12_VERSION & 0xFF)
        aad[11] = <unsigned char>(n >> 8)
        aad[12] = <unsigned char>(n & 0xFF)
        if explicit:
            # salt || epoch||seq (RFC 5288 3, RFC 6655 3); the explicit part is carried.
            memcpy(nonce, ivp, 4)
            _put_u64be(nonce + 4, epoch_seq)
        else:
            # RFC 7905 2: epoch||seq left-padded to 12 bytes, XOR the IV.
            memcpy(nonce, ivp, 4)
            _put_u64be(nonce + 4, epoch_seq)
            for k in range(8):
                nonce[4 + k] ^= ivp[4 + k]
        sealed = encrypt(PyBytes_FromStringAndSize(<char*>nonce, 12), plain,
                         PyBytes_FromStringAndSize(<char*>aad, 13))
        body = PyBytes_GET_SIZE(sealed) + (8 if explicit else 0)
        record = PyBytes_FromStringAndSize(NULL, DTLS_HEADER_SIZE + body)
        out = <unsigned char*>PyBytes_AS_STRING(record)
        out[0] = <unsigned char>ctype
        out[1] = <unsigned char>(DTLS12_VERSION >> 8)
        out[2] = <unsigned char>(DTLS12_VERSION & 0xFF)
        _put_u64be(out + 3, epoch_seq)
        out[11] = <unsigned char>(body >> 8)
        out[12] = <unsigned char>(body & 0xFF)
        if explicit:
            _put_u64be(out + DTLS_HEADER_SIZE, epoch_seq)
            memcpy(out + DTLS_HEADER_SIZE + 8, PyBytes_AS_STRING(sealed), body - 8)
        else:
            memcpy(out + DTLS_HEADER_SIZE, PyBytes_AS_STRING(sealed), body)
        records.append(record)
    return records


def seal_tls13(encrypt, write_iv, first_seq, tag_length, content_type, payloads):
    """One TLS 1.3 record per payload, concatenated for one stream write; see the twin."""
    cdef unsigned char nonce[12]
    cdef unsigned char header[5]
    cdef const unsigned char* ivp
    cdef unsigned char* out
    cdef uint64_t seq, first
    cdef Py_ssize_t i, n, k, tag, total = 0, pos = 0
    cdef int ctype
    cdef bytes iv, inner, sealed, result
    cdef list items, parts = []
    cdef Py_buffer buf
    first_seq = index(first_seq)
    tag_length = index(tag_length)
    content_type = index(content_type)
    items = list(payloads)
    _check_payload_sizes(items)
    if first_seq < 0 or first_seq + len(items) > 2**64 - 1:
        raise ChunkFramingError(
            f"sequence numbers {first_seq}.. of {len(items)} records pass 2^64 - 2"
        )
    if not 0 < tag_length <= 16:
        raise ChunkFramingError(f"tag length {tag_length} is outside 1..16")
    if not 0 <= content_type <= 255:
        raise ChunkFramingError(f"content type {content_type} is outside 0..255")
    iv = bytes(write_iv)
    if PyBytes_GET_SIZE(iv) != 12:
        raise ChunkFramingError(f"a TLS 1.3 write IV is 12 bytes, got {PyBytes_GET_SIZE(iv)}")
    ivp = <const unsigned char*>PyBytes_AS_STRING(iv)
    first = <uint64_t>first_seq
    tag = tag_length
    ctype = content_type
    for i in range(len(items)):
        PyObject_GetBuffer(items[i], &buf, PyBUF_SIMPLE)
        try:
            n = buf.len
            # RFC 8446 5.2: TLSInnerPlaintext = content || type (no padding).
            inner = PyBytes_FromStringAndSize(NULL, n + 1)
            memcpy(PyBytes_AS_STRING(inner), buf.buf, n)
        finally:
            PyBuffer_Release(&buf)
        PyBytes_AS_STRING(inner)[n] = <char>ctype
        header[0] = TLS13_APPLICATION_DATA
        header[1] = 3
        header[2] = 3
        header[3] = <unsigned char>((n + 1 + tag) >> 8)
        header[4] = <unsigned char>((n + 1 + tag) & 0xFF)
        # RFC 8446 5.3: the sequence number left-padded to 12 bytes, XOR the IV.
        seq = first + <uint64_t>i
        memcpy(nonce, ivp, 12)
        for k in range(8):
            nonce[4 + k] ^= <unsigned char>((seq >> (56 - 8 * k)) & 0xFF)
        header_bytes = PyBytes_FromStringAndSize(<char*>header, 5)
        sealed = encrypt(PyBytes_FromStringAndSize(<char*>nonce, 12), inner, header_bytes)
        if PyBytes_GET_SIZE(sealed) != n + 1 + tag:
            raise ChunkFramingError(
                f"the AEAD returned {PyBytes_GET_SIZE(sealed)} bytes for {n + 1} of plaintext; "
                f"is its tag {tag} bytes?"
            )
        parts.append(sealed)
        total += TLS13_HEADER_SIZE + PyBytes_GET_SIZE(sealed)
    result = PyBytes_FromStringAndSize(NULL, total)
    out = <unsigned char*>PyBytes_AS_STRING(result)
    for sealed in parts:
        n = PyBytes_GET_SIZE(sealed)
        out[pos] = TLS13_APPLICATION_DATA
        out[pos + 1] = 3
        out[pos + 2] = 3
        out[pos + 3] = <unsigned char>(n >> 8)
        out[pos + 4] = <unsigned char>(n & 0xFF)
        memcpy(out + pos + TLS13_HEADER_SIZE, PyBytes_AS_STRING(sealed), n)
        pos += TLS13_HEADER_SIZE + n
    return result
