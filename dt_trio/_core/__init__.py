"""The sans-IO core: history, instance state and the orchestration step state machine.

Nothing in this package touches trio, sqlite or gRPC; it is tested with plain functions.
"""

from dt_trio._core._runtime import (
    MAX_STEP_ATTEMPTS,
    Dispatch,
    Plan,
    Postpone,
    Settle,
    activity_result,
    apply_response,
    parent_notification,
    plan_step,
    running_children,
    terminate_now,
)
from dt_trio._core._state import (
    ActivityTask,
    InboxMessage,
    InstanceState,
    NewInstance,
    OutboundMessage,
    Status,
    StepResult,
)

__all__ = [
    "MAX_STEP_ATTEMPTS",
    "ActivityTask",
    "Dispatch",
    "InboxMessage",
    "InstanceState",
    "NewInstance",
    "OutboundMessage",
    "Plan",
    "Postpone",
    "Settle",
    "Status",
    "StepResult",
    "activity_result",
    "apply_response",
    "parent_notification",
    "plan_step",
    "running_children",
    "terminate_now",
]
