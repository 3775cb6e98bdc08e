"""The server's answer to a FinishReply that comes once no transfer runs (sans-IO).

A device whose FinishAck is late stops repeating its FinishReply after its budget (Device
OS-like 62 s) but keeps the validated transfer *lapsed* and asks again, slowly
(:mod:`otacore.transfer.receiver`). Over DTLS each FinishAck is one NON datagram: if every
copy the transfer's sender sent (its own, and its answers to the repeats that queued behind
the completion's store write) was lost, the device's later asks reach a session whose
transfer is over. The session's updater then answers from what it remembers, never from the
store (a re-ask must cost an overloaded store nothing):

- the session's last transfer whose completion is durably recorded: a FinishAck, the answer
  its sender (DONE) gave to a repeat, so the device applies the file now, not in a next
  session;
- any other transfer (the server gave it up, e.g. timed out waiting for the FinishReply, or
  a later offer replaced it): a Cancel with UNKNOWN_TRANSFER, the protocol's answer to a
  message naming a transfer the peer does not have. A lapsed device then stops asking and,
  its file validated, resumes it as complete at the next offer (one full pass, no download);
- a FinishReply that is not OK: nothing (the device applies nothing and asks nothing).
"""

from __future__ import annotations

from otacore.transfer.messages import Cancel, FinishAck, FinishReply, TransferStatus

#: The Cancel's reason: what the device (and whoever reads its log) can act on.
UNKNOWN_REASON = "the server has no completed transfer by this id; it offers again if needed"


def answer_late_finish_reply(
    reply: FinishReply, confirmed: int | None
) -> FinishAck | Cancel | None:
    """The answer to ``reply`` when no transfer runs; ``confirmed`` is the id of the
    session's last transfer whose completion is durably recorded (None: none)."""
    if reply.status is not TransferStatus.OK:
        return None
    if reply.transfer_id == confirmed:
        return FinishAck(reply.transfer_id)
    return Cancel(reply.transfer_id, TransferStatus.UNKNOWN_TRANSFER, UNKNOWN_REASON)
