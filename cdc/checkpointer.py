"""Which LSN may be confirmed to Postgres: the end of the longest run of
transactions whose every message Kafka has acknowledged.

Sans-I/O: the capture loop opens a ``Tx`` per transaction, hands ``tx.ack`` to
the publisher as the delivery callback of each of its messages, seals it when
the transaction's last message is queued, and asks ``confirmable()`` when it
sends a standby status update.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["Checkpointer", "Tx"]


class Tx:
    __slots__ = ("end_lsn", "error", "pending", "sealed")

    def __init__(self) -> None:
        self.pending = 0
        self.sealed = False
        self.end_lsn = 0
        self.error: str | None = None

    def sent(self) -> None:
        self.pending += 1

    def ack(self, err: Any, _msg: Any = None) -> None:
        """Delivery callback (confluent-kafka signature: err, msg)."""
        if err is not None:
            self.error = str(err)
            return
        self.pending -= 1

    @property
    def done(self) -> bool:
        return self.sealed and self.pending == 0


class Checkpointer:
    def __init__(self, confirmed: int) -> None:
        self.confirmed = confirmed
        self._txs: deque[Tx] = deque()

    def begin(self) -> Tx:
        tx = Tx()
        self._txs.append(tx)
        return tx

    def seal(self, tx: Tx, end_lsn: int) -> None:
        tx.end_lsn = end_lsn
        tx.sealed = True

    def idle(self) -> bool:
        """Nothing queued and unacknowledged, and no transaction open."""
        return not self._txs

    def advance_idle(self, wal_end: int) -> None:
        """When everything sent is acknowledged, the server's position itself may be
        confirmed: this is what keeps the slot moving while published tables are idle."""
        if not self._txs and wal_end > self.confirmed:
            self.confirmed = wal_end

    def confirmable(self) -> int:
        txs = self._txs
        while txs:
            head = txs[0]
            if head.error is not None:
                raise DeliveryFailed(head.error)
            if not head.done:
                break
            txs.popleft()
            if head.end_lsn > self.confirmed:
                self.confirmed = head.end_lsn
        return self.confirmed


class DeliveryFailed(Exception):
    """Kafka rejected a message for good; the capture stops without confirming past it."""
