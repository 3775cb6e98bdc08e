"""The device plane: CoAP sessions of authenticated devices, and the OTA engine on top."""
