"""Answers a client can receive: payloads cut to a marker, query pages cut short.

A client refuses an answer larger than its receive limit (gRPC's default of 4 MiB, which the
SDKs keep) with RESOURCE_EXHAUSTED, and learns nothing of what it asked for. So an answer
about one thing (an instance, an entity, a history event) that would be larger has its
largest payloads replaced by a marker that says so, and a page of a query ends before it
would be larger (its continuation token fetches the rest).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from google.protobuf.message import Message

from dt_trio._errors import AnswerTooLarge

MAX_ANSWER_BYTES = 4 * 1024 * 1024
# What a continuation token adds to a page beyond the key it names (see `item_cost`).
_TOKEN_BYTES = 64
# What a repeated field adds per element: its tag and length.
_ELEMENT_BYTES = 6


def left_out(size: int) -> str:
    """The marker that replaces a payload of `size` bytes."""
    return (
        f"[dt-trio left out {size} bytes here: more than an answer may carry "
        f"({MAX_ANSWER_BYTES} bytes)]"
    )


def fit(message: Message, limit: int = MAX_ANSWER_BYTES, what: str = "the answer") -> None:
    """Make `message` at most `limit` bytes by replacing its largest payloads (string
    values, failure messages) with `left_out` markers, largest first; AnswerTooLarge if that
    is not enough (its ids, names or tags alone are larger)."""
    if message.ByteSize() <= limit:
        return
    payloads = sorted(_payloads(message), key=lambda p: p[2], reverse=True)
    for holder, field, size in payloads:
        setattr(holder, field, left_out(size))
        if message.ByteSize() <= limit:
            return
    raise AnswerTooLarge(
        f"{what} is {message.ByteSize()} bytes even without its payloads, more than the "
        f"{limit} bytes a client receives: its ids, names or tags are too large"
    )


def _payloads(message: Message) -> Iterator[tuple[Message, str, int]]:
    """(holder, field, size in bytes) of every payload in `message`, at any depth."""
    if message.DESCRIPTOR.full_name == "google.protobuf.StringValue":
        yield message, "value", len(message.value.encode())  # type: ignore[attr-defined]
        return
    if message.DESCRIPTOR.name == "TaskFailureDetails":
        yield message, "errorMessage", len(message.errorMessage.encode())  # type: ignore[attr-defined]
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for item in value:
                yield from _payloads(item)
        else:
            yield from _payloads(value)


def item_cost(size: int, key: str) -> int:
    """What an element of `size` bytes adds to a page, counting the continuation token that
    names it (`key`) should the page end with it."""
    return size + _ELEMENT_BYTES + len(key.encode()) + _TOKEN_BYTES


def item_limit(key: str) -> int:
    """The most one element named `key` may take, alone on its page."""
    return MAX_ANSWER_BYTES - item_cost(0, key)


def page_length(costs: Sequence[int], limit: int = MAX_ANSWER_BYTES) -> int:
    """How many of a page's elements (their `item_cost`s, in order) one answer carries: as
    many as fit in `limit`, and at least one."""
    total = 0
    for count, cost in enumerate(costs):
        total += cost
        if total > limit:
            return max(count, 1)
    return len(costs)
