"""Fan-out/fan-in, in-process: one orchestration runs 100 activities at once and sums them.

python examples/local_fan_out.py [DB]
"""

import sys

import trio

import dt_trio

registry = dt_trio.Registry()


@registry.activity
def square(ctx: dt_trio.ActivityContext, n: int) -> int:
    return n * n  # a plain function: it runs in a worker thread, so it may block


@registry.orchestrator
def sum_of_squares(ctx: dt_trio.OrchestrationContext, count: int):
    squares = yield dt_trio.when_all([ctx.call_activity(square, input=n) for n in range(count)])
    return sum(squares)


async def main(db: str) -> None:
    async with dt_trio.open_task_hub(db, registry=registry) as client:
        instance_id = await client.schedule(sum_of_squares, 100)
        state = await client.wait_for_completion(instance_id)
        print(state.status.name, state.output)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "")
