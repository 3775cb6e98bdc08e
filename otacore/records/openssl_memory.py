"""What the record layers need from a pyOpenSSL connection on memory BIOs."""

from __future__ import annotations

from OpenSSL import SSL

#: Bytes asked of the memory BIO per read (its whole content comes out in a few reads).
_READ_SIZE = 65536


def drain_output(connection: SSL.Connection) -> bytes:
    """Everything OpenSSL has written to the connection's outgoing memory BIO so far (for
    DTLS, several datagrams' records back to back, as OpenSSL wrote them)."""
    chunks = []
    while True:
        try:
            chunks.append(connection.bio_read(_READ_SIZE))
        except SSL.WantReadError:  # the memory BIO is empty
            return b"".join(chunks)
