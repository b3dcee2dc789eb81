// The official Durable Task JavaScript SDK against a dt-trio sidecar: every client rpc the SDK
// offers for orchestrations, with a JavaScript worker running the orchestrators.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import {
  TaskHubGrpcClient,
  TaskHubGrpcWorker,
  OrchestrationStatus,
  PurgeInstanceCriteria,
  NoOpLogger,
  EntityInstanceId,
  TaskEntity,
} from "@microsoft/durabletask-js";

const python = process.env.DT_TRIO_PYTHON ?? "python3";
// The store: in memory, or a task hub of this run's own on the PostgreSQL server named here.
const postgres = process.env.DT_TRIO_TEST_PG;
const store = postgres
  ? ["--db", postgres, "--hub", `js${process.pid}_${Date.now()}`]
  : ["--db", ""];
let sidecar, address, client, worker;
let fragileBroken = true;

function startSidecar() {
  return new Promise((resolve, reject) => {
    const proc = spawn(python, ["-m", "dt_trio", "--port", "0", ...store, "--no-ui"], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let log = "";
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

const hello = async (_ctx, name) => `Hello, ${name}!`;
const fragile = async (_ctx, name) => {
  if (fragileBroken) throw new Error("not yet");
  return name;
};
async function* cities(ctx) {
  const out = [];
  for (const city of ["Tokyo", "Seattle", "London"]) {
    out.push(yield ctx.callActivity(hello, city));
  }
  return out;
}
async function* waiter(ctx) {
  return yield ctx.waitForExternalEvent("go");
}
async function* flaky(ctx) {
  return yield ctx.callActivity(fragile, "fixed");
}

class Counter extends TaskEntity {
  initializeState() {
    return 0;
  }
  add(amount) {
    this.state += amount;
    return this.state;
  }
  get() {
    return this.state;
  }
}
async function* lockedIncrement(ctx, key) {
  const counter = new EntityInstanceId("counter", key);
  const lock = yield ctx.entities.lockEntities(counter);
  const value = yield ctx.entities.callEntity(counter, "add", 1);
  lock.release();
  return value;
}

before(async () => {
  ({ proc: sidecar, address } = await startSidecar());
  worker = new TaskHubGrpcWorker({ hostAddress: address, logger: new NoOpLogger() });
  worker.addOrchestrator(cities);
  worker.addOrchestrator(waiter);
  worker.addOrchestrator(flaky);
  worker.addOrchestrator(lockedIncrement);
  worker.addNamedEntity("counter", () => new Counter());
  worker.addActivity(hello);
  worker.addActivity(fragile);
  await worker.start();
  client = new TaskHubGrpcClient({ hostAddress: address, logger: new NoOpLogger() });
});

after(async () => {
  await worker?.stop();
  await client?.stop();
  if (sidecar) {
    const exited = new Promise((resolve) => sidecar.on("exit", resolve));
    sidecar.kill("SIGTERM");
    assert.equal(await exited, 0);
  }
});

async function started(orchestrator, input, instanceId) {
  const id = await client.scheduleNewOrchestration(orchestrator, input, instanceId);
  await client.waitForOrchestrationStart(id, false, 20);
  return id;
}

test("schedule, wait and read an orchestration", async () => {
  const id = await client.scheduleNewOrchestration(cities);
  const state = await client.waitForOrchestrationCompletion(id, true, 30);
  assert.equal(state.runtimeStatus, OrchestrationStatus.COMPLETED);
  assert.deepEqual(JSON.parse(state.serializedOutput), [
    "Hello, Tokyo!",
    "Hello, Seattle!",
    "Hello, London!",
  ]);
  const again = await client.getOrchestrationState(id);
  assert.equal(again.name, "cities");
  assert.equal(await client.getOrchestrationState("nobody-home"), undefined);
});

test("raise an event, suspend and resume", async () => {
  const id = await started(waiter);
  await client.suspendOrchestration(id);
  await client.raiseOrchestrationEvent(id, "go", "payload");
  await client.resumeOrchestration(id);
  const state = await client.waitForOrchestrationCompletion(id, true, 30);
  assert.equal(state.runtimeStatus, OrchestrationStatus.COMPLETED);
  assert.equal(JSON.parse(state.serializedOutput), "payload");
});

test("terminate a running orchestration", async () => {
  const id = await started(waiter);
  await client.terminateOrchestration(id, "stopped");
  const state = await client.waitForOrchestrationCompletion(id, true, 30);
  assert.equal(state.runtimeStatus, OrchestrationStatus.TERMINATED);
});

test("query instances and list finished ids", async () => {
  const ids = [];
  for (let i = 0; i < 3; i++) {
    const id = await client.scheduleNewOrchestration(cities, undefined, `js-query-${i}`);
    await client.waitForOrchestrationCompletion(id, false, 30);
    ids.push(id);
  }
  const found = [];
  for await (const state of client.getAllInstances({
    statuses: [OrchestrationStatus.COMPLETED],
    instanceIdPrefix: "js-query-",
  })) {
    found.push(state.instanceId);
  }
  assert.deepEqual(found.sort(), ids);
  const page = await client.listInstanceIds({ pageSize: 100 });
  for (const id of ids) assert.ok(page.values.includes(id), `${id} is listed`);
});

test("history, restart and purge", async () => {
  const id = await client.scheduleNewOrchestration(cities, undefined, "js-lifecycle");
  await client.waitForOrchestrationCompletion(id, false, 30);
  const history = await client.getOrchestrationHistory(id);
  assert.ok(history.length >= 3, "the history has events");
  const restarted = await client.restartOrchestration(id, true);
  assert.notEqual(restarted, id);
  const state = await client.waitForOrchestrationCompletion(restarted, true, 30);
  assert.equal(state.runtimeStatus, OrchestrationStatus.COMPLETED);
  const purged = await client.purgeOrchestration(id);
  assert.equal(purged.deletedInstanceCount, 1);
  assert.equal(await client.getOrchestrationState(id), undefined);
  const criteria = new PurgeInstanceCriteria();
  criteria.setRuntimeStatusList([OrchestrationStatus.TERMINATED]);
  const byFilter = await client.purgeOrchestration(criteria);
  assert.ok(byFilter.deletedInstanceCount >= 1);
});

test("rewind a failed orchestration", async () => {
  const id = await client.scheduleNewOrchestration(flaky);
  const failed = await client.waitForOrchestrationCompletion(id, true, 30);
  assert.equal(failed.runtimeStatus, OrchestrationStatus.FAILED);
  fragileBroken = false;
  await client.rewindInstance(id, "fixed it");
  const state = await client.waitForOrchestrationCompletion(id, true, 30);
  assert.equal(state.runtimeStatus, OrchestrationStatus.COMPLETED);
  assert.equal(JSON.parse(state.serializedOutput), "fixed");
});

test("entities: signal, call under a lock, get, query and clean", async () => {
  const key = `js-${Date.now()}`;
  const counter = new EntityInstanceId("counter", key);
  await client.signalEntity(counter, "add", 41);
  const id = await client.scheduleNewOrchestration(lockedIncrement, key);
  const state = await client.waitForOrchestrationCompletion(id, true, 30);
  assert.equal(state.runtimeStatus, OrchestrationStatus.COMPLETED);
  assert.equal(JSON.parse(state.serializedOutput), 42);
  const metadata = await client.getEntity(counter, true);
  assert.equal(metadata.state, 42);
  assert.equal(await client.getEntity(new EntityInstanceId("counter", "nobody")), undefined);
  const found = [];
  for await (const entity of client.getEntities({ instanceIdStartsWith: `@counter@${key}` })) {
    found.push(entity.id.toString());
  }
  assert.deepEqual(found, [`@counter@${key}`]);
  const cleaned = await client.cleanEntityStorage();
  assert.equal(cleaned.orphanedLocksReleased, 0);
});
