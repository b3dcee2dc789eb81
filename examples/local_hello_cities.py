"""Hello cities, in-process: the orchestration and its activities run in this script.

python examples/local_hello_cities.py [DB]      (DB: an sqlite file; default in memory)
"""

import sys

import trio

import dt_trio

registry = dt_trio.Registry()


@registry.activity
async def say_hello(ctx: dt_trio.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


@registry.orchestrator
def hello_cities(ctx: dt_trio.OrchestrationContext, _: None):
    greetings = []
    for city in ("Tokyo", "Seattle", "London"):
        greetings.append((yield ctx.call_activity(say_hello, input=city)))
    return greetings


async def main(db: str) -> None:
    async with dt_trio.open_task_hub(db, registry=registry) as client:
        instance_id = await client.schedule(hello_cities)
        state = await client.wait_for_completion(instance_id)
        print(state.status.name, state.output)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "")
