"""The key rotation half of an emulated device: the trust store's statements (ota_wire
point 5), taken from a Hello's (or ``GET k``'s) answer or pushed by the server mid-session
(``POST k``), applied in order and saved before anything trusts the new keys.

:class:`KeyRotationMixin` is mixed into :class:`~otacore.device.emulated.EmulatedDevice`.
It is separate from the session because it is the one writer of the device's trust store
(the session only asks for more statements and goes online when it has them all).
"""

from __future__ import annotations

from otacore.coap import Code, Message
from otacore.device.emulated_api import DeviceFlash
from otacore.errors import OtaError, PayloadSchemaError
from otacore.protocol.ota_wire import key_push_answer, parse_hello_answer
from otacore.signing import StatementOutOfOrderError, TrustStore, parse_statement


class KeyRotationMixin:
    """Applying and saving key rotation statements (part of EmulatedDevice)."""

    flash: DeviceFlash
    last_error: str
    _trust: TrustStore | None

    def _answer(self, request: Message, code: int, payload: bytes = b"") -> None:
        raise NotImplementedError  # EmulatedDevice answers on its link

    def _apply_key_statements(self, payload: bytes) -> bool:
        """Apply the key rotation statements an answer carries (ota_wire point 5): those
        after the trust store's sequence, in order; a bad one stops the catch-up. True when
        the server has more and these all applied and advanced the store."""
        if self._trust is None or not payload:
            return False
        try:
            page = parse_hello_answer(payload)
        except PayloadSchemaError as exc:
            self.last_error = f"bad key statements from the server: {exc}"
            return False
        start = self._trust
        refusal = self._advance_trust(page.statements)
        if refusal is not None:
            self.last_error = f"refused a key statement: {refusal}"
        return page.more and refusal is None and self._trust.sequence > start.sequence

    def _advance_trust(self, statements: tuple[bytes, ...], *,
                       stop_at_gap: bool = False) -> OtaError | None:
        """Apply ``statements`` after the trust store's sequence, in order, and save the
        store (before anything trusts the new keys). The refusal that stopped them, if any;
        with ``stop_at_gap`` one that does not follow the store's sequence just ends them
        (the caller reports where the store is, and the sender goes on from there)."""
        assert self._trust is not None
        store = start = self._trust
        refusal: OtaError | None = None
        for raw in statements:
            try:
                statement = parse_statement(raw)
                if statement.sequence > store.sequence:
                    store = store.apply(statement)
            except StatementOutOfOrderError as exc:
                refusal = None if stop_at_gap else exc
                break
            except OtaError as exc:  # a forged, replayed or foreign statement
                refusal = exc
                break
        if store is not start:
            self.flash.save_trust_store(store)
            self._trust = store
        return refusal

    def _on_key_push(self, request: Message) -> None:
        """The server's ``POST k`` (ota_wire point 5): the statements a rotation made while
        this session lives. Applied and saved before the answer, which names the sequence
        the trust store reached (the server offers firmware signed with a new key only
        after that)."""
        if self._trust is None:
            self._answer(request, Code.FORBIDDEN, b"no trust store is provisioned on this device")
            return
        try:
            page = parse_hello_answer(request.payload)
        except PayloadSchemaError as exc:
            self._answer(request, Code.BAD_REQUEST, str(exc).encode()[:200])
            return
        refusal = self._advance_trust(page.statements, stop_at_gap=True)
        if refusal is not None:
            self.last_error = f"refused a key statement: {refusal}"
            detail = f"{type(refusal).__name__}: {refusal}"  # RFC 7252 5.5.2 diagnostic
            self._answer(request, Code.FORBIDDEN, detail.encode()[:200])
            return
        self._answer(request, Code.CHANGED, key_push_answer(self._trust.sequence))
