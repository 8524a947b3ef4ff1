"""Every failure the writer expects, named, so callers can tell them apart.

A ``DomainError`` means the command was refused and wrote nothing; the other
``WriterError``s are about the environment (database unreachable, migrations
out of step).
"""

from __future__ import annotations

__all__ = [
    "CustomerNotFound",
    "DatabaseUnavailable",
    "DomainError",
    "EmailTaken",
    "InsufficientStock",
    "InvalidInput",
    "InvalidOrderState",
    "MigrationError",
    "NotFound",
    "OrderNotFound",
    "ProductInactive",
    "ProductNotFound",
    "SkuTaken",
    "WriterError",
]


class WriterError(Exception):
    """Base of everything the writer raises on purpose."""


class DatabaseUnavailable(WriterError):
    """Postgres cannot be reached or refused the login."""


class MigrationError(WriterError):
    """The migration files and the database disagree."""


class DomainError(WriterError):
    """A command was refused by a business rule or bad input; nothing was written."""


class InvalidInput(DomainError, ValueError):
    """An argument is malformed, out of range or too large."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"invalid {field}: {problem}")
        self.field = field
        self.problem = problem


class NotFound(DomainError):
    """A referenced row does not exist."""

    entity = "row"

    def __init__(self, id_: int) -> None:
        super().__init__(f"{self.entity} {id_} does not exist")
        self.id = id_


class CustomerNotFound(NotFound):
    entity = "customer"


class ProductNotFound(NotFound):
    entity = "product"


class OrderNotFound(NotFound):
    entity = "order"


class EmailTaken(DomainError):
    def __init__(self, email: str) -> None:
        super().__init__(f"email {email!r} is already registered to another customer")
        self.email = email


class SkuTaken(DomainError):
    def __init__(self, sku: str) -> None:
        super().__init__(f"sku {sku!r} is already used by another product")
        self.sku = sku


class ProductInactive(DomainError):
    def __init__(self, product_id: int) -> None:
        super().__init__(f"product {product_id} is no longer sold")
        self.product_id = product_id


class InsufficientStock(DomainError):
    def __init__(self, product_id: int, requested: int, available: int) -> None:
        super().__init__(
            f"product {product_id}: {requested} requested but only {available} in stock"
        )
        self.product_id = product_id
        self.requested = requested
        self.available = available


class InvalidOrderState(DomainError):
    """The order's status does not allow the action (e.g. shipping an unpaid order)."""

    def __init__(self, order_id: int, action: str, status: str, allowed: frozenset[str]) -> None:
        expected = " or ".join(sorted(allowed))
        super().__init__(f"cannot {action} order {order_id}: it is {status}, expected {expected}")
        self.order_id = order_id
        self.action = action
        self.status = status
        self.allowed = allowed
