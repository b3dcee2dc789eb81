"""Answers a client can receive (dt_trio._grpc._bounds), with plain protobuf messages."""

from __future__ import annotations

import pytest

from dt_trio._errors import AnswerTooLarge
from dt_trio._grpc import _bounds as bounds
from dt_trio._grpc._status import status_for
from dt_trio._proto import orchestrator_service_pb2 as pb

pytestmark = pytest.mark.store_independent

MIB = 1024 * 1024


def state(**payloads: str) -> pb.OrchestrationState:
    msg = pb.OrchestrationState(instanceId="i1", name="orch")
    for field, value in payloads.items():
        getattr(msg, field).value = value
    return msg


def test_the_largest_payloads_are_left_out_until_the_answer_fits() -> None:
    msg = state(input="i" * (3 * MIB), output="o" * (2 * MIB), customStatus="small")
    msg.failureDetails.errorType = "Boom"
    msg.failureDetails.errorMessage = "m" * MIB
    bounds.fit(msg)
    assert msg.ByteSize() <= bounds.MAX_ANSWER_BYTES
    assert msg.input.value == bounds.left_out(3 * MIB)
    assert msg.output.value == "o" * (2 * MIB)  # enough was left out with the largest
    assert msg.failureDetails.errorMessage == "m" * MIB
    assert msg.customStatus.value == "small"


def test_payloads_at_any_depth_count_and_failure_messages_too() -> None:
    event = pb.HistoryEvent(eventId=3)
    event.taskFailed.failureDetails.errorMessage = "x" * (5 * MIB)
    event.taskFailed.failureDetails.stackTrace.value = "s" * 1000
    bounds.fit(event, bounds.item_limit(""))
    assert event.taskFailed.failureDetails.errorMessage == bounds.left_out(5 * MIB)
    assert event.taskFailed.failureDetails.stackTrace.value == "s" * 1000


def test_an_answer_too_large_without_payloads_is_resource_exhausted() -> None:
    msg = state(input="small")
    msg.tags["huge"] = "t" * (5 * MIB)
    with pytest.raises(AnswerTooLarge, match="even without its payloads") as info:
        bounds.fit(msg, what="the state of instance 'i1'")
    status = status_for(info.value)
    assert status is not None and status[0].name == "RESOURCE_EXHAUSTED"
    assert msg.tags["huge"] == "t" * (5 * MIB)  # tags are not payloads


def test_a_page_ends_before_it_would_not_fit_and_holds_at_least_one() -> None:
    costs = [bounds.item_cost(MIB, "key")] * 5
    assert bounds.page_length(costs) == 3
    assert bounds.page_length([bounds.item_cost(8 * MIB, "k")] * 2) == 1
    assert bounds.page_length([10, 20]) == 2
    assert bounds.page_length([]) == 0
    # one element cut to its limit fits alone, continuation token included
    assert bounds.page_length([bounds.item_cost(bounds.item_limit("key"), "key")]) == 1
    assert bounds.item_cost(bounds.item_limit("key"), "key") == bounds.MAX_ANSWER_BYTES
