// Command gosdk runs durabletask-go's own client and worker (its `client` and `task` packages)
// against a dt-trio sidecar: `gosdk HOST:PORT`. Each scenario starts one orchestration with the
// Go client; the Go worker runs it. One line per scenario and check, then "go: N passed, N
// failed"; the exit status is 1 if any failed.
//
// Built and run by tests/go/run.py (`nox -s go`).
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"

	"github.com/microsoft/durabletask-go/api"
	"github.com/microsoft/durabletask-go/backend"
	"github.com/microsoft/durabletask-go/client"
	"github.com/microsoft/durabletask-go/task"
)

var cities = []string{"Tokyo", "London", "Seattle"}

// Runs of two activities: each must run exactly once per call (an answer dt-trio refused would
// be redelivered and run again).
var explosions, lingerings int32

func SayHello(ctx task.ActivityContext) (any, error) {
	var city string
	if err := ctx.GetInput(&city); err != nil {
		return nil, err
	}
	return fmt.Sprintf("Hello, %s!", city), nil
}

func Double(ctx task.ActivityContext) (any, error) {
	var n int
	if err := ctx.GetInput(&n); err != nil {
		return nil, err
	}
	return 2 * n, nil
}

func Explode(ctx task.ActivityContext) (any, error) {
	atomic.AddInt32(&explosions, 1)
	return nil, errors.New("boom")
}

// Linger works for a while: long enough to be still running when its orchestration continues
// as new (the overlap is what Lingerer probes; its outcome does not depend on the timing).
func Linger(ctx task.ActivityContext) (any, error) {
	var n int
	if err := ctx.GetInput(&n); err != nil {
		return nil, err
	}
	atomic.AddInt32(&lingerings, 1)
	time.Sleep(150 * time.Millisecond)
	return n, nil
}

// HelloCities calls an activity three times, one after the other.
func HelloCities(ctx *task.OrchestrationContext) (any, error) {
	var greetings []string
	for _, city := range cities {
		var greeting string
		if err := ctx.CallActivity(SayHello, task.WithActivityInput(city)).Await(&greeting); err != nil {
			return nil, err
		}
		greetings = append(greetings, greeting)
	}
	ctx.SetCustomStatus("greeted all")
	return greetings, nil
}

// FanOut runs five activities at once; the worker answers them concurrently.
func FanOut(ctx *task.OrchestrationContext) (any, error) {
	var pending []task.Task
	for n := 1; n <= 5; n++ {
		pending = append(pending, ctx.CallActivity(Double, task.WithActivityInput(n)))
	}
	sum := 0
	for _, t := range pending {
		var doubled int
		if err := t.Await(&doubled); err != nil {
			return nil, err
		}
		sum += doubled
	}
	return sum, nil
}

// Napper sleeps on a durable timer; the orchestration clock must have moved past it.
func Napper(ctx *task.OrchestrationContext) (any, error) {
	began := ctx.CurrentTimeUtc
	if err := ctx.CreateTimer(300 * time.Millisecond).Await(nil); err != nil {
		return nil, err
	}
	if slept := ctx.CurrentTimeUtc.Sub(began); slept < 300*time.Millisecond {
		return nil, fmt.Errorf("the timer fired after %v", slept)
	}
	return "rested", nil
}

// Approval waits for an event that the Go client raises.
func Approval(ctx *task.OrchestrationContext) (any, error) {
	var by string
	if err := ctx.WaitForSingleEvent("approval", -1).Await(&by); err != nil {
		return nil, err
	}
	return "approved by " + by, nil
}

// Fragile catches its activity's failure and returns what the worker reported.
func Fragile(ctx *task.OrchestrationContext) (any, error) {
	err := ctx.CallActivity(Explode).Await(nil)
	if err == nil {
		return nil, errors.New("the failing activity succeeded")
	}
	return "caught: " + err.Error(), nil
}

// Doomed retries its failing activity once (on a durable timer), then fails.
func Doomed(ctx *task.OrchestrationContext) (any, error) {
	policy := &task.RetryPolicy{MaxAttempts: 2, InitialRetryInterval: 100 * time.Millisecond}
	return nil, ctx.CallActivity(Explode, task.WithActivityRetryPolicy(policy)).Await(nil)
}

// Parent runs HelloCities as a sub-orchestration with an id of its choosing.
func Parent(ctx *task.OrchestrationContext) (any, error) {
	var greetings []string
	child := task.WithSubOrchestrationInstanceID(string(ctx.ID) + "-child")
	if err := ctx.CallSubOrchestrator(HelloCities, child).Await(&greetings); err != nil {
		return nil, err
	}
	return fmt.Sprintf("%d greetings from %s-child", len(greetings), ctx.ID), nil
}

// Counter continues as new until its input reaches 3.
func Counter(ctx *task.OrchestrationContext) (any, error) {
	var n int
	if err := ctx.GetInput(&n); err != nil {
		return nil, err
	}
	if n < 3 {
		ctx.ContinueAsNew(n + 1)
		return nil, nil
	}
	return n, nil
}

// Lingerer continues as new while its activity still runs, three times; then it waits for the
// last one. Every execution's activity has task id 0, and an answer without a completion token
// names only the instance and the task id: dt-trio must not give the last execution an earlier
// one's answer.
func Lingerer(ctx *task.OrchestrationContext) (any, error) {
	var n int
	if err := ctx.GetInput(&n); err != nil {
		return nil, err
	}
	working := ctx.CallActivity(Linger, task.WithActivityInput(n))
	if n < 3 {
		if err := ctx.CreateTimer(10 * time.Millisecond).Await(nil); err != nil {
			return nil, err
		}
		ctx.ContinueAsNew(n + 1)
		return nil, nil
	}
	var got int
	if err := working.Await(&got); err != nil {
		return nil, err
	}
	return fmt.Sprintf("execution %d got %d", n, got), nil
}

// countingLogger is the SDK's logger, counting what it logs as errors and warnings: a refused
// answer, a broken stream, a work item it cannot read.
type countingLogger struct {
	backend.Logger
	complaints int32
}

func (l *countingLogger) Error(v ...any) {
	atomic.AddInt32(&l.complaints, 1)
	l.Logger.Error(v...)
}

func (l *countingLogger) Errorf(format string, v ...any) {
	atomic.AddInt32(&l.complaints, 1)
	l.Logger.Errorf(format, v...)
}

func (l *countingLogger) Warn(v ...any) {
	atomic.AddInt32(&l.complaints, 1)
	l.Logger.Warn(v...)
}

func (l *countingLogger) Warnf(format string, v ...any) {
	atomic.AddInt32(&l.complaints, 1)
	l.Logger.Warnf(format, v...)
}

type scenario struct {
	// the orchestrator's name, as the worker registers it (its function's name)
	orchestrator string
	name         string
	input        any
	// after it started: what the client does to it (nil: nothing)
	drive  func(ctx context.Context, c *client.TaskHubGrpcClient, id api.InstanceID) error
	status api.OrchestrationStatus
	output string
	// the custom status it ends with ("" where it sets none)
	custom string
}

func raiseApproval(ctx context.Context, c *client.TaskHubGrpcClient, id api.InstanceID) error {
	if _, err := c.WaitForOrchestrationStart(ctx, id); err != nil {
		return err
	}
	return c.RaiseEvent(ctx, id, "approval", api.WithEventPayload("ops"))
}

// suspendThenApprove raises the event while the orchestration is suspended, then resumes it.
func suspendThenApprove(ctx context.Context, c *client.TaskHubGrpcClient, id api.InstanceID) error {
	if _, err := c.WaitForOrchestrationStart(ctx, id); err != nil {
		return err
	}
	if err := c.SuspendOrchestration(ctx, id, "hold on"); err != nil {
		return err
	}
	// no wait rpc for a suspension: poll (bounded by ctx) until the sidecar shows it
	for {
		state, err := c.FetchOrchestrationMetadata(ctx, id)
		if err != nil {
			return err
		}
		if state.RuntimeStatus == api.RUNTIME_STATUS_SUSPENDED {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := c.RaiseEvent(ctx, id, "approval", api.WithEventPayload("ops")); err != nil {
		return err
	}
	return c.ResumeOrchestration(ctx, id, "go on")
}

func terminate(ctx context.Context, c *client.TaskHubGrpcClient, id api.InstanceID) error {
	if _, err := c.WaitForOrchestrationStart(ctx, id); err != nil {
		return err
	}
	return c.TerminateOrchestration(ctx, id, api.WithOutput("stopped"))
}

var scenarios = []scenario{
	{"HelloCities", "hello-cities", nil, nil, api.RUNTIME_STATUS_COMPLETED,
		`["Hello, Tokyo!","Hello, London!","Hello, Seattle!"]`, "greeted all"},
	{"FanOut", "fan-out", nil, nil, api.RUNTIME_STATUS_COMPLETED, `30`, ""},
	{"Napper", "timer", nil, nil, api.RUNTIME_STATUS_COMPLETED, `"rested"`, ""},
	{"Approval", "external-event", nil, raiseApproval, api.RUNTIME_STATUS_COMPLETED,
		`"approved by ops"`, ""},
	{"Fragile", "failing-activity-caught", nil, nil, api.RUNTIME_STATUS_COMPLETED,
		`"caught: task failed with an error: boom"`, ""},
	{"Doomed", "failing-activity-retried", nil, nil, api.RUNTIME_STATUS_FAILED, ``, ""},
	{"Parent", "sub-orchestration", nil, nil, api.RUNTIME_STATUS_COMPLETED,
		`"3 greetings from go-sub-orchestration-child"`, ""},
	{"Counter", "continue-as-new", 0, nil, api.RUNTIME_STATUS_COMPLETED, `3`, ""},
	{"Lingerer", "continue-as-new-activity-running", 0, nil, api.RUNTIME_STATUS_COMPLETED,
		`"execution 3 got 3"`, ""},
	{"Approval", "suspended", nil, suspendThenApprove, api.RUNTIME_STATUS_COMPLETED,
		`"approved by ops"`, ""},
	{"Approval", "terminated", nil, terminate, api.RUNTIME_STATUS_TERMINATED, `"stopped"`, ""},
}

// run starts a scenario's orchestration, drives it and checks how it ended.
func run(ctx context.Context, c *client.TaskHubGrpcClient, s scenario) error {
	options := []api.NewOrchestrationOptions{api.WithInstanceID(api.InstanceID("go-" + s.name))}
	if s.input != nil {
		options = append(options, api.WithInput(s.input))
	}
	id, err := c.ScheduleNewOrchestration(ctx, s.orchestrator, options...)
	if err != nil {
		return err
	}
	if s.drive != nil {
		if err := s.drive(ctx, c, id); err != nil {
			return err
		}
	}
	state, err := c.WaitForOrchestrationCompletion(ctx, id)
	if err != nil {
		return err
	}
	if state.RuntimeStatus != s.status || state.SerializedOutput != s.output ||
		state.SerializedCustomStatus != s.custom {
		return fmt.Errorf("ended %v with output %q and custom status %q; want %v, %q and %q",
			state.RuntimeStatus, state.SerializedOutput, state.SerializedCustomStatus,
			s.status, s.output, s.custom)
	}
	return nil
}

// purge checks what a finished instance shows without its payloads, then that it can be
// purged, and is then gone.
func purge(ctx context.Context, c *client.TaskHubGrpcClient) error {
	id := api.InstanceID("go-hello-cities")
	bare, err := c.FetchOrchestrationMetadata(ctx, id, api.WithFetchPayloads(false))
	if err != nil {
		return err
	}
	if bare.RuntimeStatus != api.RUNTIME_STATUS_COMPLETED || bare.SerializedOutput != "" ||
		bare.SerializedCustomStatus != "" {
		return fmt.Errorf("without payloads: %v, output %q, custom status %q",
			bare.RuntimeStatus, bare.SerializedOutput, bare.SerializedCustomStatus)
	}
	if err := c.PurgeOrchestrationState(ctx, id); err != nil {
		return err
	}
	if _, err := c.FetchOrchestrationMetadata(ctx, id); !errors.Is(err, api.ErrInstanceNotFound) {
		return fmt.Errorf("fetching the purged instance gave %v, want %v", err, api.ErrInstanceNotFound)
	}
	return nil
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: gosdk HOST:PORT")
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	registry := task.NewTaskRegistry()
	for _, o := range []task.Orchestrator{HelloCities, FanOut, Napper, Approval, Fragile, Doomed, Parent, Counter, Lingerer} {
		must(registry.AddOrchestrator(o))
	}
	for _, a := range []task.Activity{SayHello, Double, Explode, Linger} {
		must(registry.AddActivity(a))
	}

	// grpc.WithInsecure: the one plaintext option in every grpc-go from 1.33 (Debian 12) on
	conn, err := grpc.Dial(os.Args[1], grpc.WithInsecure())
	must(err)
	defer conn.Close()
	logger := &countingLogger{Logger: backend.DefaultLogger()}
	c := client.NewTaskHubGrpcClient(conn, logger)
	listening, stopListening := context.WithCancel(ctx)
	defer stopListening()
	// two workers (each a stream of its own), as an app scaled out runs them
	must(c.StartWorkItemListener(listening, registry))
	must(c.StartWorkItemListener(listening, registry))

	errs := make([]chan error, len(scenarios))
	for i, s := range scenarios {
		errs[i] = make(chan error, 1)
		go func(s scenario, done chan<- error) { done <- run(ctx, c, s) }(s, errs[i])
	}
	passed, failed := 0, 0
	report := func(name string, err error) {
		if err != nil {
			failed++
			fmt.Printf("FAIL %s: %v\n", name, err)
		} else {
			passed++
			fmt.Printf("ok   %s\n", name)
		}
	}
	for i, s := range scenarios {
		report(s.name, <-errs[i])
	}
	// Fragile once, Doomed twice; Lingerer once per execution: none run twice, none lost
	var counted error
	if n, m := atomic.LoadInt32(&explosions), atomic.LoadInt32(&lingerings); n != 3 || m != 4 {
		counted = fmt.Errorf("Explode ran %d times, Linger %d; want 3 and 4", n, m)
	}
	report("activity-runs-counted", counted)
	report("purge", purge(ctx, c))
	var complained error
	if n := atomic.LoadInt32(&logger.complaints); n != 0 {
		complained = fmt.Errorf("the SDK logged %d errors or warnings (above)", n)
	}
	report("no-errors-logged", complained)
	fmt.Printf("go: %d passed, %d failed\n", passed, failed)
	if failed > 0 {
		os.Exit(1)
	}
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "gosdk:", err)
		os.Exit(1)
	}
}
