// The JavaScript SDK's 0.1 alpha (npm, December 2024), of the protocol generation before
// completion tokens and health pings: its worker answers a step with the instance id and an
// activity with the instance and task ids, as durabletask-go's worker does.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import alpha from "durabletask-js-alpha";

const { TaskHubGrpcClient, TaskHubGrpcWorker } = alpha;
const COMPLETED = 1; // the alpha's OrchestrationStatus.COMPLETED
const python = process.env.DT_TRIO_PYTHON ?? "python3";
let sidecar, client, worker;
let log = "";

function startSidecar() {
  return new Promise((resolve, reject) => {
    const proc = spawn(python, ["-m", "dt_trio", "--port", "0", "--db", ""], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    const timer = setTimeout(() => reject(new Error(`dt-trio did not start:\n${log}`)), 20000);
    proc.stderr.on("data", (chunk) => {
      log += chunk;
      const match = /server listening at (\S+):(\d+)/.exec(log);
      if (match && log.includes("activity-processor: waiting")) {
        clearTimeout(timer);
        resolve({ proc, address: `127.0.0.1:${match[2]}` });
      }
    });
    proc.on("exit", (code) => reject(new Error(`dt-trio exited with ${code}:\n${log}`)));
  });
}

const double = async (_ctx, n) => 2 * n;
async function* chain(ctx, n) {
  const once = yield ctx.callActivity(double, n);
  return yield ctx.callActivity(double, once);
}
async function* napper(ctx) {
  yield ctx.createTimer(0.2);
  return "rested";
}
async function* listener(ctx) {
  return yield ctx.waitForExternalEvent("go");
}
async function* parent(ctx, n) {
  return (yield ctx.callSubOrchestrator(chain, n)) + 1;
}

before(async () => {
  let address;
  ({ proc: sidecar, address } = await startSidecar());
  worker = new TaskHubGrpcWorker(address);
  for (const orchestrator of [chain, napper, listener, parent]) worker.addOrchestrator(orchestrator);
  worker.addActivity(double);
  await worker.start();
  client = new TaskHubGrpcClient(address);
});

after(async () => {
  await worker?.stop();
  if (sidecar) {
    const exited = new Promise((resolve) => sidecar.on("exit", resolve));
    sidecar.kill("SIGTERM");
    assert.equal(await exited, 0);
  }
});

test("the alpha's worker runs activities, timers, events and sub-orchestrations", async () => {
  const ids = {
    chain: await client.scheduleNewOrchestration(chain, 3),
    napper: await client.scheduleNewOrchestration(napper),
    listener: await client.scheduleNewOrchestration(listener),
    parent: await client.scheduleNewOrchestration(parent, 5),
  };
  await client.waitForOrchestrationStart(ids.listener, false, 20);
  await client.raiseOrchestrationEvent(ids.listener, "go", "heard");
  const outputs = {};
  for (const [name, id] of Object.entries(ids)) {
    const state = await client.waitForOrchestrationCompletion(id, true, 30);
    assert.equal(state.runtimeStatus, COMPLETED, `${name}: ${JSON.stringify(state)}`);
    outputs[name] = JSON.parse(state.serializedOutput);
  }
  assert.deepEqual(outputs, { chain: 12, napper: "rested", listener: "heard", parent: 21 });
  assert.doesNotMatch(log, /is refused/);
});
