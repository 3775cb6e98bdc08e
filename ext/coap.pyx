# cython: language_level=3
"""CoAP message codec: RFC 7252 section 3 (UDP/DTLS) and RFC 8323 section 3.2 (TCP/TLS).

Twin: otacore/_coap_py.py (same functions, same results, same error classes and messages).
Input is read through the buffer protocol as (pointer, length); every read is checked
against the length first because setup.py turns bounds checking off.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

cdef extern from "coap_tcp_head.h" nogil:
    int ota_tcp_ext_size(size_t length)
    void ota_put_tcp_length(unsigned char *out, size_t length, int ext, int tkl)

from operator import itemgetter

from otacore._coap_py import CoapFormatError, FrameTooLargeError, UnsupportedVersionError

cdef enum:
    MAX_OPTION_NUMBER = 65535
    MAX_OPTION_VALUE_LENGTH = 65804
    MAX_TOKEN_LENGTH = 8

_first = itemgetter(0)


# --- shared option format (RFC 7252 section 3.1) -----------------------------------------


cdef tuple _parse_options(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end):
    """Options and payload of p[pos:end]."""
    cdef list options = []
    cdef Py_ssize_t number = 0
    cdef Py_ssize_t delta, length
    cdef unsigned char byte
    while pos < end:
        byte = p[pos]
        pos += 1
        if byte == 0xFF:
            # Section 3: a marker followed by a zero-length payload is a format error.
            if pos == end:
                raise CoapFormatError("payload marker 0xFF is followed by an empty payload (RFC 7252 3)")
            return options, PyBytes_FromStringAndSize(<const char*>p + pos, end - pos)
        delta = byte >> 4
        length = byte & 0x0F
        if delta == 15:
            raise CoapFormatError("option delta nibble 15 is reserved (RFC 7252 3.1)")
        if length == 15:
            raise CoapFormatError("option length nibble 15 is reserved (RFC 7252 3.1)")
        if delta == 13:
            if end - pos < 1:
                raise CoapFormatError("truncated option header: extended delta needs 1 byte, have 0")
            delta = p[pos] + 13
            pos += 1
        elif delta == 14:
            if end - pos < 2:
                raise CoapFormatError(
                    f"truncated option header: extended delta needs 2 bytes, have {end - pos}"
                )
            delta = (p[pos] << 8 | p[pos + 1]) + 269
            pos += 2
        if length == 13:
            if end - pos < 1:
                raise CoapFormatError("truncated option header: extended length needs 1 byte, have 0")
            length = p[pos] + 13
            pos += 1
        elif length == 14:
            if end - pos < 2:
                raise CoapFormatError(
                    f"truncated option header: extended length needs 2 bytes, have {end - pos}"
                )
            length = (p[pos] << 8 | p[pos + 1]) + 269
            pos += 2
        number += delta
        if number > MAX_OPTION_NUMBER:
            raise CoapFormatError(f"option number {number} exceeds the 16-bit maximum 65535")
        if end - pos < length:
            raise CoapFormatError(f"truncated option value: need {length} bytes, have {end - pos}")
        options.append((number, PyBytes_FromStringAndSize(<const char*>p + pos, length)))
        pos += length
    return options, b""


cdef inline Py_ssize_t _ext_size(Py_ssize_t value) noexcept:
    """Extended bytes an option delta or length needs (RFC 7252 section 3.1)."""
    if value < 13:
        return 0
    if value < 269:
        return 1
    return 2


cdef inline Py_ssize_t _value_length(object value) except -1:
    """Length of a bytes-like option value (fast path for bytes)."""
    cdef Py_buffer buf
    cdef Py_ssize_t n
    if PyBytes_CheckExact(value):
        return PyBytes_GET_SIZE(value)
    PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
    n = buf.len
    PyBuffer_Release(&buf)
    return n


cdef object _sorted_options(object options, Py_ssize_t* size):
    """Validate the options, return them sorted by number (stable) and their encoded size."""
    cdef Py_ssize_t total = 0, previous = 0, number, length
    cdef bint in_order = True
    cdef object number_obj, value
    if type(options) is not list and type(options) is not tuple:
        options = list(options)  # it is walked twice
    for number_obj, value in options:
        number = number_obj
        if number < 0 or number > MAX_OPTION_NUMBER:
            raise ValueError(f"option number {number} is outside 0..65535")
        length = _value_length(value)
        if length > MAX_OPTION_VALUE_LENGTH:
            raise ValueError(
                f"option {number} value of {length} bytes exceeds the 65804-byte maximum"
            )
        if number < previous:
            in_order = False
        previous = number
        total += 1 + length + _ext_size(length)
    if not in_order:
        options = sorted(options, key=_first)
    # Delta sizes depend on the order, so they are summed over the sorted sequence.
    previous = 0
    for number_obj, _ in options:
        number = number_obj
        total += _ext_size(number - previous)
        previous = number
    size[0] = total
    return options


cdef inline Py_ssize_t _put_nibble_ext(unsigned char* out, Py_ssize_t pos, Py_ssize_t value) noexcept:
    if value >= 269:
        value -= 269
        out[pos] = <unsigned char>(value >> 8)
        out[pos + 1] = <unsigned char>(value & 0xFF)
        return pos + 2
    if value >= 13:
        out[pos] = <unsigned char>(value - 13)
        return pos + 1
    return pos


cdef inline unsigned char _nibble(Py_ssize_t value) noexcept:
    if value < 13:
        return <unsigned char>value
    if value < 269:
        return 13
    return 14


cdef Py_ssize_t _write_options(unsigned char* out, Py_ssize_t pos, Py_ssize_t limit,
                               object options) except -1:
    """Write the (sorted, validated) options at out[pos:limit]; return the new position."""
    cdef Py_ssize_t previous = 0, number, delta, length, need
    cdef Py_buffer buf
    cdef const char* src
    cdef object number_obj, value
    for number_obj, value in options:
        number = number_obj
        delta = number - previous
        if PyBytes_CheckExact(value):
            length = PyBytes_GET_SIZE(value)
            src = PyBytes_AS_STRING(value)
            need = 1 + _ext_size(delta) + _ext_size(length) + length
            # Guard against values that changed size since they were measured.
            if delta < 0 or need > limit - pos:
                raise RuntimeError("options changed while being encoded")
            out[pos] = (_nibble(delta) << 4) | _nibble(length)
            pos = _put_nibble_ext(out, pos + 1, delta)
            pos = _put_nibble_ext(out, pos, length)
            memcpy(out + pos, src, length)
        else:
            PyObject_GetBuffer(value, &buf, PyBUF_SIMPLE)
            try:
                length = buf.len
                need = 1 + _ext_size(delta) + _ext_size(length) + length
                if delta < 0 or need > limit - pos:
                    raise RuntimeError("options changed while being encoded")
                out[pos] = (_nibble(delta) << 4) | _nibble(length)
                pos = _put_nibble_ext(out, pos + 1, delta)
                pos = _put_nibble_ext(out, pos, length)
                memcpy(out + pos, buf.buf, length)
            finally:
                PyBuffer_Release(&buf)
        pos += length
        previous = number
    return pos


# --- UDP / DTLS framing (RFC 7252 section 3) -----------------------------------------------


cdef tuple _decode_udp(const unsigned char* p, Py_ssize_t n):
    cdef int version, msg_type, tkl, code, message_id
    if n < 4:
        raise CoapFormatError(
            f"datagram of {n} bytes is shorter than the 4-byte CoAP header (RFC 7252 3)"
        )
    version = p[0] >> 6
    if version != 1:
        raise UnsupportedVersionError(f"CoAP version {version} is not supported (only version 1)")
    msg_type = (p[0] >> 4) & 0x03
    tkl = p[0] & 0x0F
    if tkl > MAX_TOKEN_LENGTH:
        raise CoapFormatError(f"token length {tkl} is reserved (RFC 7252 3)")
    code = p[1]
    message_id = p[2] << 8 | p[3]
    # Section 4.1: an Empty message (code 0.00) ends right after the Message ID.
    if code == 0 and n > 4:
        raise CoapFormatError(
            f"empty message (code 0.00) has {n - 4} bytes after the header (RFC 7252 4.1)"
        )
    if n - 4 < tkl:
        raise CoapFormatError(f"truncated token: need {tkl} bytes, have {n - 4}")
    token = PyBytes_FromStringAndSize(<const char*>p + 4, tkl)
    options, payload = _parse_options(p, 4 + tkl, n)
    return msg_type, code, message_id, token, options, payload


def decode_udp(data):
    """Decode one datagram into ``(type, code, message_id, token, options, payload)``."""
    cdef Py_buffer buf
    if PyBytes_CheckExact(data):
        return _decode_udp(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        return _decode_udp(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


def encode_udp(Py_ssize_t msg_type, Py_ssize_t code, Py_ssize_t message_id, token, options,
               payload):
    """Encode one datagram; options are sorted by number (stable for repeats)."""
    cdef Py_ssize_t t = msg_type, c = code, mid = message_id
    cdef Py_ssize_t opt_size = 0, total, pos
    cdef Py_buffer tok, body
    cdef unsigned char* out
    if t < 0 or t > 3:
        raise ValueError(f"message type {t} is outside 0..3")
    if c < 0 or c > 255:
        raise ValueError(f"code {c} is outside 0..255")
    if mid < 0 or mid > 0xFFFF:
        raise ValueError(f"message id {mid} is outside 0..65535")
    PyObject_GetBuffer(token, &tok, PyBUF_SIMPLE)
    try:
        if tok.len > MAX_TOKEN_LENGTH:
            raise ValueError(f"token of {tok.len} bytes exceeds the 8-byte maximum (RFC 7252 3)")
        PyObject_GetBuffer(payload, &body, PyBUF_SIMPLE)
        try:
            if c == 0 and (tok.len or len(options) or body.len):
                raise ValueError(
                    "an empty message (code 0.00) carries no token, options or payload (RFC 7252 4.1)"
                )
            options = _sorted_options(options, &opt_size)
            total = 4 + tok.len + opt_size + (1 + body.len if body.len else 0)
            result = PyBytes_FromStringAndSize(NULL, total)
            out = <unsigned char*>PyBytes_AS_STRING(result)
            out[0] = <unsigned char>(0x40 | t << 4 | tok.len)
            out[1] = <unsigned char>c
            out[2] = <unsigned char>(mid >> 8)
            out[3] = <unsigned char>(mid & 0xFF)
            memcpy(out + 4, tok.buf, tok.len)
            pos = _write_options(out, 4 + tok.len, total, options)
            if body.len:
                if pos + 1 + body.len != total:
                    raise RuntimeError("options changed while being encoded")
                out[pos] = 0xFF
                memcpy(out + pos + 1, body.buf, body.len)
            elif pos != total:
                raise RuntimeError("options changed while being encoded")
            return result
        finally:
            PyBuffer_Release(&body)
    finally:
        PyBuffer_Release(&tok)


# --- TCP / TLS framing (RFC 8323 section 3.2) -----------------------------------------------


cdef Py_ssize_t _frame_bounds(const unsigned char* p, Py_ssize_t n, Py_ssize_t* ext_out,
                              Py_ssize_t* tkl_out) except -1:
    """Frame size (0 = need more bytes); needs n >= 1. Checks TKL on the first byte."""
    cdef Py_ssize_t tkl = p[0] & 0x0F
    cdef Py_ssize_t len_nibble = p[0] >> 4
    cdef Py_ssize_t ext, body
    if tkl > MAX_TOKEN_LENGTH:
        raise CoapFormatError(f"token length {tkl} is reserved (RFC 8323 3.2)")
    if len_nibble < 13:
        ext = 0
    elif len_nibble == 13:
        ext = 1
    elif len_nibble == 14:
        ext = 2
    else:
        ext = 4
    ext_out[0] = ext
    tkl_out[0] = tkl
    if n < 1 + ext:
        return 0
    if ext == 0:
        body = len_nibble
    elif ext == 1:
        body = p[1] + 13
    elif ext == 2:
        body = (p[1] << 8 | p[2]) + 269
    else:
        body = ((<Py_ssize_t>p[1]) << 24 | p[2] << 16 | p[3] << 8 | p[4]) + 65805
    return 2 + ext + tkl + body


cdef tuple _decode_frame(const unsigned char* p, Py_ssize_t ext, Py_ssize_t tkl, Py_ssize_t frame):
    code = p[1 + ext]
    token = PyBytes_FromStringAndSize(<const char*>p + 2 + ext, tkl)
    options, payload = _parse_options(p, 2 + ext + tkl, frame)
    return code, token, options, payload


def decode_tcp(data):
    """Decode exactly one frame into ``(code, token, options, payload)``."""
    cdef Py_buffer buf
    if PyBytes_CheckExact(data):
        return _decode_tcp(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    PyObject_GetBuffer(data, &buf, PyBUF_SIMPLE)
    try:
        return _decode_tcp(<const unsigned char*>buf.buf, buf.len)
    finally:
        PyBuffer_Release(&buf)


cdef tuple _decode_tcp(const unsigned char* p, Py_ssize_t n):
    cdef Py_ssize_t ext = 0, tkl = 0, frame
    if n == 0:
        raise CoapFormatError("empty buffer: a CoAP frame needs at least 2 bytes (RFC 8323 3.2)")
    frame = _frame_bounds(p, n, &ext, &tkl)
    if frame == 0:
        raise CoapFormatError(f"truncated frame header: need {1 + ext} bytes, have {n}")
    if n < frame:
        raise CoapFormatError(f"truncated frame: need {frame} bytes, have {n}")
    if n > frame:
        raise CoapFormatError(f"frame of {frame} bytes is followed by {n - frame} extra bytes")
    return _decode_frame(p, ext, tkl, frame)


def decode_tcp_stream(buffer, Py_ssize_t max_frame_size):
    """Decode the first frame of a byte stream: ``(message, bytes_consumed)`` or ``(None, 0)``.

    ``(None, 0)`` means "need more bytes". A frame larger than ``max_frame_size`` raises
    FrameTooLargeError as soon as its length field is complete.
    """
    cdef Py_buffer buf
    if max_frame_size < 2:
        raise ValueError(f"max_frame_size must be at least 2, got {max_frame_size}")
    if PyBytes_CheckExact(buffer):
        return _decode_stream(
            <const unsigned char*>PyBytes_AS_STRING(buffer), PyBytes_GET_SIZE(buffer), max_frame_size
        )
    PyObject_GetBuffer(buffer, &buf, PyBUF_SIMPLE)
    try:
        return _decode_stream(<const unsigned char*>buf.buf, buf.len, max_frame_size)
    finally:
        PyBuffer_Release(&buf)


cdef tuple _decode_stream(const unsigned char* p, Py_ssize_t n, Py_ssize_t limit):
    cdef Py_ssize_t ext = 0, tkl = 0, frame
    if n == 0:
        return None, 0
    frame = _frame_bounds(p, n, &ext, &tkl)
    if frame == 0:
        return None, 0
    if frame > limit:
        raise FrameTooLargeError(f"frame of {frame} bytes exceeds the {limit}-byte limit")
    if n < frame:
        return None, 0
    return _decode_frame(p, ext, tkl, frame), frame


def encode_tcp(Py_ssize_t code, token, options, payload):
    """Encode one frame; options are sorted by number (stable for repeats)."""
    cdef Py_ssize_t c = code
    cdef Py_ssize_t opt_size = 0, length, ext, total, pos, tkl
    cdef Py_buffer tok, body
    cdef unsigned char* out
    if c < 0 or c > 255:
        raise ValueError(f"code {c} is outside 0..255")
    PyObject_GetBuffer(token, &tok, PyBUF_SIMPLE)
    try:
        tkl = tok.len
        if tkl > MAX_TOKEN_LENGTH:
            raise ValueError(f"token of {tkl} bytes exceeds the 8-byte maximum (RFC 7252 3)")
        PyObject_GetBuffer(payload, &body, PyBUF_SIMPLE)
        try:
            options = _sorted_options(options, &opt_size)
            length = opt_size + (1 + body.len if body.len else 0)
            if length >= 65805 and length - 65805 > 0xFFFFFFFF:
                raise ValueError(f"message body of {length} bytes is too large for one frame")
            ext = ota_tcp_ext_size(<size_t>length)
            total = 2 + ext + tkl + length
            result = PyBytes_FromStringAndSize(NULL, total)
            out = <unsigned char*>PyBytes_AS_STRING(result)
            ota_put_tcp_length(out, <size_t>length, <int>ext, <int>tkl)
            out[1 + ext] = <unsigned char>c
            memcpy(out + 2 + ext, tok.buf, tkl)
            pos = _write_options(out, 2 + ext + tkl, total, options)
            if body.len:
                if pos + 1 + body.len != total:
                    raise RuntimeError("options changed while being encoded")
                out[pos] = 0xFF
                memcpy(out + pos + 1, body.buf, body.len)
            elif pos != total:
                raise RuntimeError("options changed while being encoded")
            return result
        finally:
            PyBuffer_Release(&body)
    finally:
        PyBuffer_Release(&tok)
