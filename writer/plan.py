"""The load generator's command plan: what each worker will do, from the seed alone.

Worker ``w`` of a run with seed ``s`` draws from ``random.Random(f"{s}:{w}")``
(string seeds are hashed with SHA-512, so this is stable across processes and
Python versions). Its stream of commands depends on nothing else: not on
timing, not on the number of other workers, not on the database. What the
database makes of a command (which ids, whether stock suffices) is decided
when it runs; see ``writer.load``.

References are symbolic, so the plan can be made before any id exists:
  * ``Pick(u)``: a point in [0, 1) that the runner maps onto the ids of
    customers or products that existed when the run started (skewed towards
    low ids: old customers order more, early products sell more);
  * ``local``: "the n-th order this worker placed".

Each worker simulates its own orders' lifecycle, so it pays only orders it
placed, ships only orders it paid, and so on (FIFO, like a warehouse).
"""

from __future__ import annotations

import itertools
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from writer.pricing import CURRENCIES, SHIPPING_COUNTRIES

__all__ = [
    "MIX",
    "AddProduct",
    "Cancel",
    "ChangePrice",
    "ChangeProfile",
    "Command",
    "Pay",
    "PlaceOrder",
    "Refund",
    "RegisterCustomer",
    "Restock",
    "Ship",
    "plan",
    "share",
    "worker_plan",
]


@dataclass(frozen=True, slots=True)
class RegisterCustomer:
    kind = "register_customer"
    email_local: str  # the runner appends the run tag and domain
    full_name: str
    phone: str | None
    profile: dict[str, Any]
    bio: str


@dataclass(frozen=True, slots=True)
class ChangeProfile:
    kind = "change_profile"
    customer: float
    full_name: str | None
    phone: str | None  # None: leave as it is
    profile: dict[str, Any]
    bio: str | None


@dataclass(frozen=True, slots=True)
class AddProduct:
    kind = "add_product"
    sku_suffix: str  # the runner prefixes the run tag
    name: str
    category: str
    price: str
    stock: int
    attributes: dict[str, Any]
    description: str


@dataclass(frozen=True, slots=True)
class ChangePrice:
    kind = "change_price"
    product: float
    price: str


@dataclass(frozen=True, slots=True)
class Restock:
    kind = "restock"
    product: float
    quantity: int


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    kind = "place_order"
    local: int
    customer: float
    items: tuple[tuple[float, int], ...]
    currency: str
    shipping_address: dict[str, str]


@dataclass(frozen=True, slots=True)
class Pay:
    kind = "pay"
    local: int
    method: str


@dataclass(frozen=True, slots=True)
class Ship:
    kind = "ship"
    local: int


@dataclass(frozen=True, slots=True)
class Cancel:
    kind = "cancel"
    local: int


@dataclass(frozen=True, slots=True)
class Refund:
    kind = "refund"
    local: int


Command = (
    RegisterCustomer
    | ChangeProfile
    | AddProduct
    | ChangePrice
    | Restock
    | PlaceOrder
    | Pay
    | Ship
    | Cancel
    | Refund
)

# Relative weights per step. Lifecycle steps with nothing to act on fall back
# to placing an order, so the realised mix leans a little more to orders.
MIX: dict[str, int] = {
    "place_order": 30,
    "pay": 24,
    "ship": 18,
    "cancel": 4,
    "refund": 3,
    "register_customer": 6,
    "change_profile": 8,
    "add_product": 1,
    "change_price": 4,
    "restock": 2,
}

# How many of its orders in each state a worker remembers; older pending
# orders are abandoned carts, older shipped ones are past their return window.
BACKLOG = 200

FIRST_NAMES = (
    "ada", "alan", "barbara", "claude", "dennis", "donald", "edsger", "frances", "grace", "guido",
    "hedy", "ivan", "jean", "john", "ken", "leslie", "linus", "margaret", "niklaus", "radia",
    "shafi", "tim", "tony", "vint", "whitfield", "yukihiro", "barbara", "katherine", "annie", "dorothy",
)  # fmt: skip
LAST_NAMES = (
    "lovelace", "turing", "liskov", "shannon", "ritchie", "knuth", "dijkstra", "allen", "hopper", "rossum",
    "lamarr", "sutherland", "sammet", "backus", "thompson", "lamport", "torvalds", "hamilton", "wirth", "perlman",
    "goldwasser", "berners-lee", "hoare", "cerf", "diffie", "matsumoto", "johnson", "easley", "vaughan",
)  # fmt: skip
WORDS = (
    "the", "shop", "sells", "kettles", "teapots", "mugs", "lamps", "chairs", "desks", "pens",
    "notebooks", "bags", "linen", "cotton", "oak", "walnut", "steel", "brass", "ceramic", "glass",
    "handmade", "small", "large", "blue", "green", "red", "black", "white", "warm", "bright",
    "quiet", "durable", "gift", "everyday", "classic", "kitchen", "office", "garden", "travel", "reading",
    "morning", "evening", "weekend", "studio", "home",
)  # fmt: skip
CATEGORIES = ("kitchen", "office", "garden", "lighting", "furniture", "stationery", "travel")
CITIES = {
    "AT": "Wien", "BE": "Bruxelles", "DE": "Berlin", "ES": "Madrid", "FR": "Lyon",
    "GB": "Leeds", "IT": "Torino", "NL": "Utrecht", "US": "Boston",
}  # fmt: skip
METHODS = ("card", "card", "card", "paypal", "paypal", "bank_transfer", "gift_card")
COUNTRIES = sorted(SHIPPING_COUNTRIES)
CURRENCY_CHOICES = ("EUR",) * 7 + ("USD",) * 2 + ("GBP",)
assert set(CURRENCY_CHOICES) <= set(CURRENCIES)


def _corpus() -> str:
    rng = random.Random(0)
    return " ".join(rng.choice(WORDS) for _ in range(40_000))


_CORPUS = _corpus()


def text(rng: random.Random, min_chars: int, max_chars: int) -> str:
    """Shop words, between the two lengths: a slice of a fixed corpus (cheap to make)."""
    size = rng.randint(min_chars, max_chars)
    if size == 0:
        return ""
    start = _CORPUS.find(" ", rng.randrange(len(_CORPUS) - max_chars - 20)) + 1
    return _CORPUS[start : start + size].strip() + "."


def _bio(rng: random.Random) -> str:
    # One in ten is long enough to be stored out of line (TOAST, > 2 kB).
    return text(rng, 2500, 6000) if rng.random() < 0.1 else text(rng, 0, 300)


def _phone(rng: random.Random) -> str:
    return f"+{rng.randint(1, 49)} {rng.randint(100, 999)} {rng.randint(100000, 9999999)}"


def _pick(rng: random.Random, skew: float) -> float:
    return float(rng.random() ** skew)


def _price(rng: random.Random) -> str:
    return (
        f"{rng.choice((4, 9, 14, 19, 24, 29, 39, 49, 79, 129))}.{rng.choice((0, 50, 95, 99)):02d}"
    )


def _address(rng: random.Random, name: str) -> dict[str, str]:
    country = rng.choice(COUNTRIES)
    return {
        "name": name,
        "line1": f"{rng.randint(1, 250)} {rng.choice(WORDS).title()} Street",
        "city": CITIES[country],
        "postal_code": f"{rng.randint(1000, 99999)}",
        "country": country,
    }


@dataclass(slots=True)
class _Orders:
    """The worker's own orders by state, as the plan expects them to be."""

    placed: itertools.count[int] = field(default_factory=itertools.count)
    pending: deque[int] = field(default_factory=lambda: deque(maxlen=BACKLOG))
    paid: deque[int] = field(default_factory=lambda: deque(maxlen=BACKLOG))
    shipped: deque[int] = field(default_factory=lambda: deque(maxlen=BACKLOG))


def _take_random(rng: random.Random, *queues: deque[int]) -> int:
    candidates = [q for q in queues if q]
    queue = rng.choice(candidates)
    index = rng.randrange(len(queue))
    local = queue[index]
    del queue[index]
    return local


def _next(rng: random.Random, worker: int, step: int, orders: _Orders) -> Command:
    kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
    if kind == "pay" and orders.pending:
        local = orders.pending.popleft()
        orders.paid.append(local)
        return Pay(local, rng.choice(METHODS))
    if kind == "ship" and orders.paid:
        local = orders.paid.popleft()
        orders.shipped.append(local)
        return Ship(local)
    if kind == "cancel" and (orders.pending or orders.paid):
        return Cancel(_take_random(rng, orders.pending, orders.paid))
    if kind == "refund" and (orders.paid or orders.shipped):
        return Refund(_take_random(rng, orders.paid, orders.shipped))
    if kind == "register_customer":
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        return RegisterCustomer(
            email_local=f"{first}.{last}.w{worker}s{step}",
            full_name=f"{first.title()} {last.title()}",
            phone=_phone(rng) if rng.random() < 0.6 else None,
            profile={
                "language": rng.choice(("en", "de", "fr", "nl")),
                "newsletter": rng.random() < 0.4,
                "tier": "standard",
            },
            bio=_bio(rng),
        )
    if kind == "change_profile":
        changes: dict[str, Any] = {"newsletter": rng.random() < 0.5}
        if rng.random() < 0.3:
            changes["tier"] = rng.choice(("standard", "silver", "gold"))
        return ChangeProfile(
            customer=_pick(rng, 2.0),
            full_name=(
                f"{rng.choice(FIRST_NAMES).title()} {rng.choice(LAST_NAMES).title()}"
                if rng.random() < 0.1
                else None
            ),
            phone=_phone(rng) if rng.random() < 0.2 else None,
            profile=changes,
            bio=_bio(rng) if rng.random() < 0.05 else None,
        )
    if kind == "add_product":
        return AddProduct(
            sku_suffix=f"W{worker}S{step}",
            name=f"{rng.choice(WORDS).title()} {rng.choice(WORDS)} {rng.choice(WORDS)}",
            category=rng.choice(CATEGORIES),
            price=_price(rng),
            stock=rng.randint(50, 5000),
            attributes={
                "color": rng.choice(("red", "blue", "oak", "black")),
                "weight_g": rng.randint(50, 9000),
            },
            description=text(rng, 200, 4000),
        )
    if kind == "change_price":
        return ChangePrice(_pick(rng, 1.5), _price(rng))
    if kind == "restock":
        return Restock(_pick(rng, 1.5), rng.randint(20, 400))

    local = next(orders.placed)
    orders.pending.append(local)
    lines = rng.choices((1, 2, 3, 4), weights=(40, 30, 20, 10))[0]
    return PlaceOrder(
        local=local,
        customer=_pick(rng, 2.0),
        items=tuple(
            (_pick(rng, 1.5), rng.choices((1, 2, 3), weights=(70, 20, 10))[0]) for _ in range(lines)
        ),
        currency=rng.choice(CURRENCY_CHOICES),
        shipping_address=_address(
            rng, f"{rng.choice(FIRST_NAMES).title()} {rng.choice(LAST_NAMES).title()}"
        ),
    )


def worker_plan(seed: int, worker: int) -> Iterator[Command]:
    """Worker ``worker``'s endless, deterministic stream of commands."""
    rng = random.Random(f"{seed}:{worker}")
    orders = _Orders()
    for step in itertools.count():
        yield _next(rng, worker, step, orders)


def plan(seed: int, workers: int, commands: int) -> list[list[Command]]:
    """The first ``commands`` commands of a run, split over ``workers`` as ``writer.load`` does."""
    return [
        list(itertools.islice(worker_plan(seed, w), share(commands, workers, w)))
        for w in range(workers)
    ]


def share(commands: int, workers: int, worker: int) -> int:
    """How many of ``commands`` worker ``worker`` runs: an even split, the first ones +1."""
    return commands // workers + (1 if worker < commands % workers else 0)
