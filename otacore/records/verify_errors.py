"""Readable reasons for OpenSSL's certificate verification failures, for the logs of both
device listeners (a refused device's operator needs to know *why*)."""

from __future__ import annotations

from typing import Final

#: X509_V_ERR_* codes worth naming (OpenSSL include/openssl/x509_vfy.h).
VERIFY_ERRORS: Final = {
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    26: "unsuitable certificate purpose",
}


def verify_failure_reason(errnum: int, depth: int) -> str:
    """Why OpenSSL's verify callback rejected a certificate: ``errnum`` (X509_V_ERR_*) at
    chain ``depth`` (0: the device's own certificate)."""
    reason = VERIFY_ERRORS.get(errnum, f"X509 verify error {errnum}")
    return f"{reason} (chain depth {depth})"
