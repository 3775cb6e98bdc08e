"""The server nodes a fleet of emulated devices can reach, and each device's order over them.

An installation of several nodes gives devices several endpoints, as a DNS name with several
answers does. Each device tries them in its own order: the order of rendezvous hashing
(highest random weight: endpoints sorted by a hash of device id and endpoint), so

* the same device starts at the same endpoint in every run (the hash is stable: BLAKE2b,
  not Python's per-process salted ``hash``);
* devices spread evenly over the endpoints, and when one endpoint dies its devices spread
  evenly over the others (a plain rotation would send them all to the next one);
* adding or removing an endpoint moves only the devices whose first choice it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from otacore.errors import ValidationError
from otacore.protocol.link import Transport

Address = tuple[str, int]


def format_address(address: Address) -> str:
    """``host:port``, or ``[v6]:port`` for an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Endpoint:
    """One server node as devices reach it: its TLS (TCP) and DTLS (UDP) addresses."""

    tcp: Address
    #: The DTLS address when it is not ``tcp`` (a node serves both on one port by default).
    udp: Address | None = None

    def address(self, transport: Transport) -> Address:
        """Where a device of ``transport`` connects."""
        return self.udp if transport == "udp" and self.udp is not None else self.tcp

    @property
    def name(self) -> str:
        """The endpoint as operators wrote it (its TLS address)."""
        return format_address(self.tcp)


def check_endpoints(endpoints: Sequence[Endpoint]) -> None:
    """ValidationError unless there is at least one endpoint and none appears twice."""
    if not endpoints:
        raise ValidationError("give at least one server endpoint")
    seen: set[str] = set()
    for endpoint in endpoints:
        if endpoint.name in seen:
            raise ValidationError(f"server endpoint {endpoint.name} is given twice")
        seen.add(endpoint.name)


def endpoint_order(device_id: str, endpoints: Sequence[Endpoint]) -> list[int]:
    """Indexes of ``endpoints`` in the order device ``device_id`` tries them (its first
    choice first): rendezvous hashing over the device id and each endpoint's name."""

    def weight(index: int) -> bytes:
        key = f"{device_id}\0{endpoints[index].name}".encode()
        return hashlib.blake2b(key, digest_size=8).digest()

    return sorted(range(len(endpoints)), key=weight, reverse=True)
