"""Human approval, in-process: wait for an "approval" event, or give up after a timeout.

    python examples/local_approval.py [DB]

The script approves the first request and lets the second one time out.
"""

import sys
from datetime import timedelta

import trio

import dt_trio

registry = dt_trio.Registry()


@registry.activity
async def notify(ctx: dt_trio.ActivityContext, message: str) -> None:
    print("  notify:", message)


@registry.orchestrator
def approval(ctx: dt_trio.OrchestrationContext, request: dict):
    yield ctx.call_activity(notify, input=f"please approve {request['what']}")
    ctx.set_custom_status("waiting for approval")
    decision = ctx.wait_for_external_event("approval")
    timeout = ctx.create_timer(timedelta(seconds=request["timeout"]))
    winner = yield dt_trio.when_any([decision, timeout])
    if winner is not decision:
        yield ctx.call_activity(notify, input=f"{request['what']}: no answer, escalated")
        return "escalated"
    approved_by = decision.get_result()
    yield ctx.call_activity(notify, input=f"{request['what']}: approved by {approved_by}")
    return f"approved by {approved_by}"


async def main(db: str) -> None:
    async with dt_trio.open_task_hub(db, registry=registry) as client:
        first = await client.schedule(approval, {"what": "a new laptop", "timeout": 30})
        second = await client.schedule(approval, {"what": "a yacht", "timeout": 0.5})
        await client.wait_until(first, lambda s: s.custom_status == "waiting for approval")
        await client.raise_event(first, "approval", "Ana")
        for instance_id in (first, second):
            state = await client.wait_for_completion(instance_id)
            print(state.status.name, state.output)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "")
