"""The project's own record layers (issue 14).

OpenSSL (through pyOpenSSL) runs every handshake. Once a session is established its record
keys are taken out and the OpenSSL object is freed; from then on the session's records are
sealed and opened here, with `cryptography`'s AEADs, following RFC 6347 (DTLS 1.2) and
RFC 8446 (TLS 1.3) section by section. Everything here is sans-IO: bytes in, bytes and
events out, no sockets, clocks or threads.
"""
