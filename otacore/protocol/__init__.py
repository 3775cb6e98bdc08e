"""Sans-IO device protocol: CoAP links over DTLS/TLS and the session logic on top."""
