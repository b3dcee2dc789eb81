"""Hello cities: an orchestration that calls one activity for three cities, in sequence.

Start the sidecar in one shell:   dt-trio --port 4001 --db ./taskhub.sqlite3
then run this, in another:        python examples/hello_cities.py [--address 127.0.0.1:4001]

The orchestrator and activity run here, in the official Durable Task Python SDK's worker; the
sidecar stores every step, so the orchestration survives a restart of either process.
"""

from __future__ import annotations

import argparse

from durabletask import client, task, worker


def say_hello(ctx: task.ActivityContext, city: str) -> str:
    return f"Hello, {city}!"


def hello_cities(ctx: task.OrchestrationContext, _: object) -> list[str]:
    greetings = []
    for city in ("Tokyo", "Seattle", "London"):
        greetings.append((yield ctx.call_activity(say_hello, input=city)))
    return greetings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:4001", help="the sidecar's host:port")
    args = parser.parse_args()
    with worker.TaskHubGrpcWorker(host_address=args.address) as w:
        w.add_orchestrator(hello_cities)
        w.add_activity(say_hello)
        w.start()
        c = client.TaskHubGrpcClient(host_address=args.address)
        instance_id = c.schedule_new_orchestration(hello_cities)
        state = c.wait_for_orchestration_completion(instance_id, timeout=30)
        if state is None:
            raise SystemExit(f"instance {instance_id} vanished")
        print(f"{instance_id}: {state.runtime_status.name} {state.serialized_output}")


if __name__ == "__main__":
    main()
