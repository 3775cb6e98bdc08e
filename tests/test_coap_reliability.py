"""RFC 7252 section 4 message layer, driven by a fake clock (plain floats)."""

from __future__ import annotations

import heapq
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.coap import Code, Message, MessageType, decode_udp, encode_udp
from otacore.coap_reliability import (
    Acknowledged,
    DuplicateReceived,
    Event,
    GaveUp,
    Malformed,
    PingReceived,
    Received,
    Rejected,
    ReliableLayer,
    TransmissionParameters,
    Transmit,
)


def fixed(value: float) -> ReliableLayer:
    """A layer whose random factor draw is always ``value`` and whose ids start at 100."""
    return ReliableLayer(rng=lambda: value, first_message_id=100)


def request(payload: bytes = b"x", msg_type: MessageType = MessageType.CON) -> Message:
    message = Message(msg_type, Code.POST, token=b"\x01\x02", payload=payload)
    message.set_uri_path("h")
    return message


def of_type(events: list[Event], kind: type) -> list:
    return [event for event in events if isinstance(event, kind)]


def test_default_parameters_match_rfc_4_8() -> None:
    params = TransmissionParameters()
    assert (params.ack_timeout, params.ack_random_factor, params.max_retransmit) == (2.0, 1.5, 4)
    assert params.max_transmit_span == 45.0
    assert params.max_transmit_wait == 93.0
    assert params.exchange_lifetime == 247.0
    assert params.non_lifetime == 145.0
    with pytest.raises(ValueError, match="ack_random_factor"):
        TransmissionParameters(ack_random_factor=0.9)


def test_retransmission_schedule_and_give_up() -> None:
    layer = fixed(0.5)  # initial timeout 2 * (1 + 0.5 * 0.5) = 2.5 s
    sent = layer.send(request(), now=10.0)
    assert sent.message_id == 100
    assert layer.next_timer() == 12.5
    assert layer.handle_timer(12.4) == []
    times = []
    now = layer.next_timer()
    while now is not None:
        events = layer.handle_timer(now)
        times.append((now, events))
        now = layer.next_timer()
    # Four retransmissions with the timeout doubling each time, then give up (section 4.2).
    assert [t for t, _ in times] == [12.5, 17.5, 27.5, 47.5, 87.5]
    for _, events in times[:4]:
        assert events == [Transmit(sent.datagram, 100)]
    assert times[4][1] == [GaveUp(100, b"\x01\x02")]
    assert TransmissionParameters().max_transmit_wait >= 87.5 - 10.0
    assert layer.outstanding == 0


@pytest.mark.parametrize(("draw", "timeout"), [(0.0, 2.0), (0.999999, 2.999999)])
def test_initial_timeout_spans_ack_timeout_to_factor(draw: float, timeout: float) -> None:
    layer = fixed(draw)
    layer.send(request(), now=0.0)
    assert layer.next_timer() == pytest.approx(timeout)


def test_message_ids_increment_wrap_and_skip_outstanding() -> None:
    layer = ReliableLayer(rng=lambda: 0.0, first_message_id=65534)
    ids = [layer.send(request(msg_type=MessageType.CON), now=0.0).message_id for _ in range(3)]
    assert ids == [65534, 65535, 0]
    for _ in range(65533):  # NONs 1..65533 wrap the counter back to the outstanding CONs
        layer.send(request(msg_type=MessageType.NON), now=0.0)
    assert layer.next_message_id() == 1  # 65534, 65535 and 0 are still waiting for ACKs


def test_random_first_message_id_comes_from_rng() -> None:
    assert ReliableLayer(rng=lambda: 0.5).send(request(), 0.0).message_id == 32768


def test_ack_stops_retransmission_and_late_ack_is_ignored() -> None:
    layer = fixed(0.0)
    sent = layer.send(request(), now=0.0)
    layer.handle_timer(2.0)  # one retransmission
    ack = encode_udp(Message(MessageType.ACK, 0, sent.message_id))
    assert layer.receive(ack, now=3.0) == [Acknowledged(sent.message_id, b"\x01\x02")]
    assert layer.next_timer() is None
    assert layer.receive(ack, now=3.5) == []  # the ACK of the retransmission


def test_piggybacked_response_is_delivered() -> None:
    server, device = fixed(0.0), ReliableLayer(rng=lambda: 0.0, first_message_id=7)
    sent = server.send(request(b"hello"), now=0.0)
    (received,) = device.receive(sent.datagram, now=0.1)
    assert isinstance(received, Received) and received.message.payload == b"hello"
    response = Message(MessageType.NON, Code.CHANGED, payload=b"ok")
    reply = device.respond(received.message, response, now=0.2)
    events = server.receive(reply.datagram, now=0.3)
    assert events[0] == Acknowledged(sent.message_id, b"\x01\x02")
    assert isinstance(events[1], Received)
    ack = events[1].message
    assert (ack.type, ack.code, ack.token, ack.payload) == (
        MessageType.ACK,
        Code.CHANGED,
        b"\x01\x02",
        b"ok",
    )


def test_lost_ack_duplicate_con_gets_same_ack() -> None:
    server, device = fixed(0.0), fixed(0.0)
    sent = server.send(request(), now=0.0)
    (received,) = device.receive(sent.datagram, now=0.05)
    assert isinstance(received, Received)
    ack = device.respond(received.message, None, now=0.1)  # this ACK is lost
    (retransmission,) = server.handle_timer(2.0)
    assert isinstance(retransmission, Transmit) and retransmission.datagram == sent.datagram
    events = device.receive(retransmission.datagram, now=2.05)
    # Processed only once, answered with the very same ACK bytes (section 4.5).
    assert events == [DuplicateReceived(sent.message_id, replied=True), Transmit(ack.datagram, 100)]
    assert server.receive(ack.datagram, now=2.1) == [Acknowledged(100, b"\x01\x02")]
    assert server.next_timer() is None


def test_duplicate_before_reply_is_not_answered() -> None:
    device = fixed(0.0)
    datagram = encode_udp(replace_id(request(), 5))
    assert isinstance(device.receive(datagram, now=0.0)[0], Received)
    assert device.receive(datagram, now=1.0) == [DuplicateReceived(5, replied=False)]


def replace_id(message: Message, message_id: int) -> Message:
    message.message_id = message_id
    return message


def test_duplicate_window_is_exchange_lifetime_for_con_and_non_lifetime_for_non() -> None:
    device = fixed(0.0)
    con = encode_udp(replace_id(request(), 5))
    non = encode_udp(replace_id(request(msg_type=MessageType.NON), 6))
    assert isinstance(device.receive(con, now=0.0)[0], Received)
    assert isinstance(device.receive(non, now=0.0)[0], Received)
    assert isinstance(device.receive(con, now=246.9)[0], DuplicateReceived)
    assert isinstance(device.receive(non, now=144.9)[0], DuplicateReceived)
    assert isinstance(device.receive(non, now=145.0)[0], Received)
    assert isinstance(device.receive(con, now=247.0)[0], Received)
    device.handle_timer(1000.0)
    assert device.remembered == 0


def test_reset_rejects_con_and_recent_non() -> None:
    layer = fixed(0.0)
    con = layer.send(request(), now=0.0)
    non = layer.send(request(msg_type=MessageType.NON), now=0.0)
    rst = encode_udp(Message(MessageType.RST, 0, con.message_id))
    assert layer.receive(rst, now=1.0) == [Rejected(con.message_id, b"\x01\x02")]
    assert layer.next_timer() is None
    rst_non = encode_udp(Message(MessageType.RST, 0, non.message_id))
    assert layer.receive(rst_non, now=1.0) == [Rejected(non.message_id, b"\x01\x02")]
    assert layer.receive(rst_non, now=1.0) == []


@pytest.mark.parametrize(
    ("with_ack", "reply_type"), [(False, MessageType.RST), (True, MessageType.ACK)]
)
def test_ping_is_answered(with_ack: bool, reply_type: MessageType) -> None:
    layer = ReliableLayer(rng=lambda: 0.0, answer_pings_with_ack=with_ack)
    ping = encode_udp(Message(MessageType.CON, 0, 0x0BAD))
    events = layer.receive(ping, now=0.0)
    assert events[0] == PingReceived(0x0BAD)
    assert isinstance(events[1], Transmit)
    reply = decode_udp(events[1].datagram)
    assert (reply.type, reply.code, reply.message_id) == (reply_type, 0, 0x0BAD)
    assert layer.receive(ping, now=1.0) == [
        DuplicateReceived(0x0BAD, replied=True),
        Transmit(events[1].datagram, 0x0BAD),
    ]


def test_malformed_datagrams() -> None:
    layer = fixed(0.0)
    # CON with a reserved option nibble: rejected with a matching RST (section 4.2).
    events = layer.receive(bytes.fromhex("4001abcdf0"), now=0.0)
    assert isinstance(events[0], Malformed) and "nibble 15" in str(events[0].error)
    assert events[1] == Transmit(bytes.fromhex("7000abcd"), 0xABCD)
    # NON with an error and a version-2 datagram: silently ignored.
    assert [type(e) for e in layer.receive(bytes.fromhex("5001abcdf0"), now=0.0)] == [Malformed]
    assert [type(e) for e in layer.receive(bytes.fromhex("80010000"), now=0.0)] == [Malformed]
    # Empty NON, non-empty RST and an ACK carrying a request are format errors (section 4.3).
    for wire in ("50001234", "73011234aa", "62011234aaaa"):
        assert [type(e) for e in layer.receive(bytes.fromhex(wire), now=0.0)] == [Malformed]


def test_send_refuses_replies() -> None:
    layer = fixed(0.0)
    with pytest.raises(ValueError, match="CON or NON"):
        layer.send(Message(MessageType.ACK, 0), now=0.0)
    with pytest.raises(ValueError, match="only a CON"):
        layer.respond(request(msg_type=MessageType.NON), None, now=0.0)


def test_next_timer_is_earliest_deadline() -> None:
    layer = fixed(0.0)
    first = layer.send(request(), now=0.0)
    layer.send(request(), now=1.0)
    assert layer.next_timer() == 2.0
    assert layer.handle_timer(2.0) == [Transmit(first.datagram, first.message_id)]
    assert layer.next_timer() == 3.0
    assert layer.cancel(first.message_id)
    assert layer.next_timer() == 3.0


# --- lossy link between two real layers -----------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    losses=st.lists(st.booleans(), max_size=80),
    count=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossy_link_delivers_once_and_resolves_every_con(
    losses: list[bool], count: int, seed: int
) -> None:
    rng = random.Random(seed)
    server = ReliableLayer(rng=rng.random)
    device = ReliableLayer(rng=rng.random)
    drops = itertools.chain(losses, itertools.repeat(False))
    wire: list[tuple[float, int, str, bytes]] = []
    order = itertools.count()

    def put(now: float, target: str, events: list[Event] | Transmit) -> None:
        for event in [events] if isinstance(events, Transmit) else events:
            if isinstance(event, Transmit) and not next(drops):
                heapq.heappush(wire, (now + 0.05, next(order), target, event.datagram))

    sent = {}
    for i in range(count):
        transmit = server.send(request(payload=bytes([i])), now=0.0)
        sent[transmit.message_id] = bytes([i])
        put(0.0, "device", transmit)
    delivered: list[bytes] = []
    outcomes: dict[int, str] = {}
    now = 0.0
    while True:
        timers = [t for t in (server.next_timer(), device.next_timer()) if t is not None]
        candidates = timers + ([wire[0][0]] if wire else [])
        if not candidates:
            break
        now = min(candidates)
        assert now < 500.0
        if wire and wire[0][0] == now:
            _, _, target, datagram = heapq.heappop(wire)
            if target == "device":
                for event in device.receive(datagram, now):
                    if isinstance(event, Received):
                        delivered.append(event.message.payload)
                        put(now, "server", device.respond(event.message, None, now))
                    else:
                        put(now, "server", [event])
            else:
                for event in server.receive(datagram, now):
                    if isinstance(event, Acknowledged):
                        assert event.message_id not in outcomes
                        outcomes[event.message_id] = "ack"
            continue
        for event in server.handle_timer(now):
            if isinstance(event, GaveUp):
                assert event.message_id not in outcomes
                outcomes[event.message_id] = "gave up"
            put(now, "device", [event])
    # Every CON ends exactly once; nothing is delivered twice; an ACK implies delivery.
    assert set(outcomes) == set(sent)
    assert len(delivered) == len(set(delivered))
    for message_id, result in outcomes.items():
        if result == "ack":
            assert sent[message_id] in delivered
    if not any(losses):
        assert all(result == "ack" for result in outcomes.values())


def test_next_message_ids_run_on_and_skip_outstanding_cons() -> None:
    layer = ReliableLayer(rng=lambda: 0.0, first_message_id=65534)
    con = layer.send(request(), now=0.0).message_id  # 65534, awaiting its ACK
    assert layer.next_message_ids(3) == [65535, 0, 1]
    assert layer.next_message_ids(0) == []
    layer.next_message_ids(65532)  # up to 65533: the counter comes back to the CON's id
    assert layer.next_message_id() == 65535  # 65534 skipped (RFC 7252 4.4)
    assert con == 65534
    with pytest.raises(ValueError, match="count"):
        layer.next_message_ids(-1)


def test_non_table_after_the_ids_wrap_within_the_non_lifetime() -> None:
    """65,536 NONs within NON_LIFETIME (145 s) reuse every id: a Reset of an id reports the
    newest NON that used it, each table entry expires at its own time, in order."""
    layer = ReliableLayer(rng=lambda: 0.0, first_message_id=0)
    step = 0.001
    now = 0.0
    for n in range(65_536 + 10):  # ids 0..9 are used twice
        now = n * step
        layer.send(Message(MessageType.NON, Code.POST, token=n.to_bytes(4, "big"),
                           payload=b"c"), now)  # fmt: skip

    def reset(message_id: int, at: float) -> list[Event]:
        return layer.receive(encode_udp(Message(MessageType.RST, 0, message_id)), at)

    # Id 5's newest NON is the 65,541st (token 65541), sent at 65.541 s.
    assert reset(5, now) == [Rejected(5, (65_536 + 5).to_bytes(4, "big"))]
    assert reset(5, now) == []  # reported once
    # Id 20 was last used by NON 20 (sent at 0.020 s): it expires at 145.020 s.
    lifetime = layer.params.non_lifetime
    assert reset(20, 20 * step + lifetime - 0.0005) == [Rejected(20, (20).to_bytes(4, "big"))]
    assert reset(21, 21 * step + lifetime) == []  # expired exactly at its lifetime
    # A NON sent late prunes every entry expired by then and stays reportable itself,
    # while the entries sent after the expired ones stay.
    late = (65_536 + 9) * step + lifetime - 0.0005  # after every first-round NON expired
    mid = layer.send(Message(MessageType.NON, Code.POST, token=b"late", payload=b"c"), late)
    assert mid.message_id == 10
    # Only id 9's second NON (expiring at 210.545 s) and the late one are left: every
    # reused id moved to the end of the table, so nothing expired hides behind them.
    assert layer.remembered_non == 2
    assert reset(9, late) == [Rejected(9, (65_536 + 9).to_bytes(4, "big"))]
    assert reset(mid.message_id, late) == [Rejected(mid.message_id, b"late")]
    assert reset(30, late) == []
    assert layer.remembered_non == 0


def test_duplicate_table_after_the_ids_wrap() -> None:
    """The device's ids wrap: an id whose NON lifetime passed is a new message; one still
    within it is a duplicate; the table never holds more than the 65,536 ids."""
    layer = ReliableLayer(rng=lambda: 0.0, first_message_id=0)
    step = 0.003  # 65,536 ids in 196.6 s: longer than the NON lifetime
    for n in range(65_536 * 2):
        message = Message(MessageType.NON, Code.POST, n & 0xFFFF, payload=b"a")
        events = layer.receive(encode_udp(message), n * step)
        assert isinstance(events[0], Received), (n, events)
        assert layer.remembered <= 65_536
    now = (65_536 * 2 - 1) * step
    again = Message(MessageType.NON, Code.POST, 0xFFFF, payload=b"a")  # just received
    assert isinstance(layer.receive(encode_udp(again), now)[0], DuplicateReceived)
    # Held: the ids received within the last NON lifetime, no expired one before them.
    assert abs(layer.remembered - layer.params.non_lifetime / step) <= 1


def test_an_id_remembered_again_moves_behind_the_others() -> None:
    """CON and NON lifetimes differ, so an expired id can wait behind a live one; when it
    arrives again it is a new message, remembered at the back: nothing expired stays
    behind it."""
    layer = ReliableLayer(rng=lambda: 0.0, first_message_id=0)

    def arrive(message_id: int, msg_type: MessageType, at: float) -> Event:
        message = Message(msg_type, Code.POST, message_id, payload=b"a")
        return layer.receive(encode_udp(message), at)[0]

    assert isinstance(arrive(1, MessageType.CON, 0.0), Received)  # held until 247 s
    assert isinstance(arrive(2, MessageType.NON, 0.0), Received)  # until 145 s
    assert isinstance(arrive(3, MessageType.NON, 1.0), Received)  # until 146 s
    assert isinstance(arrive(2, MessageType.NON, 150.0), Received)  # anew: until 295 s
    assert layer.remembered == 3  # 3 expired but waits behind the CON
    assert isinstance(arrive(4, MessageType.NON, 250.0), Received)
    assert layer.remembered == 2  # 2 (until 295 s) and 4: 1 and 3 are gone


# -- what an idle layer keeps (issue 14 item 4: one layer per idle DTLS session) ------------


def test_a_ping_is_answered_again_without_being_remembered() -> None:
    layer = ReliableLayer(rng=lambda: 0.0, answer_pings_with_ack=True)
    lifetime = layer.params.exchange_lifetime
    first = encode_udp(Message(MessageType.CON, 0, 0x0101))
    second = encode_udp(Message(MessageType.CON, 0, 0x0102))
    events = layer.receive(first, now=0.0)
    assert events[0] == PingReceived(0x0101)
    reply = events[1]
    assert layer.remembered == 0  # a keep-alive leaves no entry in the duplicate table
    # Its repeat within EXCHANGE_LIFETIME: a duplicate, answered with the same bytes (4.5).
    assert layer.receive(first, now=lifetime - 0.1) == [
        DuplicateReceived(0x0101, replied=True), reply]
    # A CON reusing the last ping's id within its lifetime is a duplicate too (4.4, 4.5).
    reuse = encode_udp(replace_id(request(), 0x0101))
    assert layer.receive(reuse, now=1.0) == [DuplicateReceived(0x0101, replied=True), reply]
    # An older ping's repeat after a newer ping: answered the same, as a ping again.
    assert layer.receive(second, now=2.0)[0] == PingReceived(0x0102)
    assert layer.receive(first, now=3.0) == [PingReceived(0x0101), reply]
    # Past its lifetime the id is new (section 4.5).
    assert layer.receive(first, now=3.0 + lifetime)[0] == PingReceived(0x0101)
    assert layer.remembered == 0


def test_a_non_reusing_the_last_pings_id_is_a_duplicate_not_answered() -> None:
    layer = fixed(0.0)
    layer.receive(encode_udp(Message(MessageType.CON, 0, 9)), now=0.0)
    non = encode_udp(replace_id(request(msg_type=MessageType.NON), 9))
    assert layer.receive(non, now=1.0) == [DuplicateReceived(9, replied=False)]


def test_an_idle_layer_keeps_no_tables() -> None:
    """After CONs, NONs and requests in both directions have been answered and their
    lifetimes passed, the layer holds no table at all, as when it was made."""
    server, device = fixed(0.0), ReliableLayer(rng=lambda: 0.0, first_message_id=7)
    fresh = fixed(0.0)
    con = server.send(request(b"a"), now=0.0)
    non = server.send(request(b"b", MessageType.NON), now=0.0)
    (received,) = device.receive(con.datagram, now=0.1)
    assert isinstance(received, Received)
    ack = device.respond(received.message, None, now=0.1)
    device.receive(non.datagram, now=0.1)
    assert server.receive(ack.datagram, now=0.2) == [Acknowledged(con.message_id, b"\x01\x02")]
    assert server.outstanding == 0 and server.remembered_non == 1
    assert device.remembered == 2
    later = 1 + max(server.params.exchange_lifetime, server.params.non_lifetime)
    device.handle_timer(later)
    server.send(request(b"c", MessageType.NON), now=later)  # prunes the expired NON first
    server.receive(encode_udp(Message(MessageType.RST, 0, (con.message_id + 2) & 0xFFFF)),
                   now=later)  # that NON's Reset: its entry goes, and the table with it
    assert (device.remembered, server.remembered_non, server.outstanding) == (0, 0, 0)
    for layer in (server, device):
        # Private, on purpose: "no table" is what this test pins, not just "empty tables".
        assert (layer._pending, layer._seen, layer._sent_non) == (None, None, None)
        assert (fresh._pending, fresh._seen, fresh._sent_non) == (None, None, None)
