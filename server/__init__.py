"""Trio I/O shells around otacore: device listeners, sessions, REST API, storage, CLI."""
