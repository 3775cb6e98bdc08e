"""The device emulator: simulated Particle devices that talk to the OTA cloud.

:mod:`server.emulator.flash` is the persistent, crash-safe simulated flash of one device (slot
files, boot record, transfer receiver state, trust store); the decisions it stores are made by
the sans-IO core in :mod:`otacore.device`.
"""
