"""The order lifecycle as a table: which status each action needs and leads to.

pending --pay--> paid --ship--> shipped
pending|paid --cancel--> cancelled     (stock restored; paid: refund payment)
paid|shipped --refund--> refunded      (refund payment)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TRANSITIONS", "Transition"]


@dataclass(frozen=True, slots=True)
class Transition:
    allowed_from: frozenset[str]
    to: str
    timestamp_column: str


TRANSITIONS: dict[str, Transition] = {
    "pay": Transition(frozenset({"pending"}), "paid", "paid_at"),
    "ship": Transition(frozenset({"paid"}), "shipped", "shipped_at"),
    "cancel": Transition(frozenset({"pending", "paid"}), "cancelled", "cancelled_at"),
    "refund": Transition(frozenset({"paid", "shipped"}), "refunded", "refunded_at"),
}
