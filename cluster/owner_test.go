package cluster

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/require"

	"github.com/citypulse/citypulse/cluster/natstest"
	"github.com/citypulse/citypulse/pipeline"
)

// recorder remembers which node handled which batch of which partition, and
// when partitions were gained.
type recorder struct {
	mu      sync.Mutex
	handled map[int][]handled // partition → batches in handling order
	gained  map[int][]gain
}

type handled struct {
	node int
	seq  uint64
	data string
	at   time.Time
}

type gain struct {
	node  int
	owned bool
	at    time.Time
}

func newRecorder() *recorder {
	return &recorder{handled: map[int][]handled{}, gained: map[int][]gain{}}
}

func (r *recorder) handler(node int) Handler {
	return func(_ context.Context, msgs []Message) (Commit, error) {
		r.mu.Lock()
		defer r.mu.Unlock()
		for _, m := range msgs {
			r.handled[m.Partition] = append(r.handled[m.Partition], handled{node, m.Seq, string(m.Data), time.Now()})
		}
		return nil, nil
	}
}

func (r *recorder) ownership(node int) OwnershipFunc {
	return func(p int, owned bool) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.gained[p] = append(r.gained[p], gain{node, owned, time.Now()})
	}
}

// count is the number of distinct batches handled (by any node).
func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, hs := range r.handled {
		seen := map[uint64]bool{}
		for _, h := range hs {
			if !seen[h.seq] {
				seen[h.seq] = true
				n++
			}
		}
	}
	return n
}

// handlers returns the nodes that handled partition p's batches after seq.
func (r *recorder) handlers(p int, after uint64) map[int]int {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[int]int{}
	for _, h := range r.handled[p] {
		if h.seq > after {
			out[h.node]++
		}
	}
	return out
}

// requireInOrder checks that each node handled each partition's batches in
// stream order: every batch new to a node comes after the ones it handled
// before. A batch the node already handled may come again (its ack was late:
// at least once); those repeats are returned, for Dedupe to drop.
func (r *recorder) requireInOrder(t *testing.T) (repeats int) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	for p, hs := range r.handled {
		last := map[int]uint64{}
		seen := map[handled]bool{}
		for _, h := range hs {
			k := handled{node: h.node, seq: h.seq}
			if seen[k] {
				repeats++
				continue
			}
			seen[k] = true
			require.Greater(t, h.seq, last[h.node], "partition %d: node %d handled %d after %d", p, h.node, h.seq, last[h.node])
			last[h.node] = h.seq
		}
	}
	return repeats
}

// requireStream creates the stream, retrying: a JetStream API request sent
// while a fresh cluster settles its leaders may get no reply (seen: the
// stream was created, the request timed out after 2 minutes).
func requireStream(t *testing.T, l *Log) jetstream.Stream {
	t.Helper()
	var s jetstream.Stream
	var last error
	for range 12 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		s, last = l.EnsureStream(ctx)
		cancel()
		if last == nil {
			return s
		}
		t.Logf("create the stream: %v; retrying", last)
		time.Sleep(200 * time.Millisecond)
	}
	require.NoError(t, last)
	return nil
}

// testNodes are the node ids of the owner tests: node i is testNodes[i].
// Between the two, rendezvous hashing puts 4 partitions as p mod 2
// (TestTheTestNodesSplitFourPartitionsByParity).
var testNodes = [2]string{"node-0a", "node-1a"}

// nodeNum is the number of a test node id.
func nodeNum(id string) int { return slices.Index(testNodes[:], id) }

// fastConfig is the config of test node i (testNodes) on 4 partitions.
func fastConfig(i int) Config {
	c := testConfig(3, 4)
	c.NodeID = testNodes[i]
	c.PinnedTTL = 3 * time.Second
	c.AckWait = 2 * time.Second
	c.Settle = 100 * time.Millisecond
	c.AliveInterval = 200 * time.Millisecond
	c.AliveTimeout = time.Second
	return c
}

// publish appends n batches round-robin over the partitions and waits for
// their acknowledgements; it returns the first sequence's lower bound.
func publish(t *testing.T, l *Log, from, n, partitions int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var waits []func(context.Context) error
	for i := from; i < from+n; i++ {
		w, err := l.Append(ctx, i%partitions, "", fmt.Appendf(nil, "%d", i))
		require.NoError(t, err)
		waits = append(waits, w)
	}
	for _, w := range waits {
		require.NoError(t, w(ctx))
	}
}

type runningOwner struct {
	cancel context.CancelFunc
	done   chan error
}

func startOwner(t *testing.T, url string, cfg Config, rec *recorder, m *Metrics) *runningOwner {
	t.Helper()
	return startOwnerWith(t, url, cfg, rec.handler(nodeNum(cfg.NodeID)), rec.ownership(nodeNum(cfg.NodeID)), m)
}

func startOwnerWith(t *testing.T, url string, cfg Config, handle Handler, owned OwnershipFunc, m *Metrics) *runningOwner {
	t.Helper()
	nc := connect(t, url)
	o, err := NewOwner(nc, cfg, handle, owned, nil, m)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	ro := &runningOwner{cancel: cancel, done: make(chan error, 1)}
	go func() { ro.done <- o.Run(ctx) }()
	t.Cleanup(func() { ro.stop(t) })
	return ro
}

func (ro *runningOwner) stop(t *testing.T) {
	t.Helper()
	if ro.cancel == nil {
		return
	}
	ro.cancel()
	ro.cancel = nil
	select {
	case err := <-ro.done:
		require.NoError(t, err)
	case <-time.After(30 * time.Second):
		t.Fatal("owner did not stop within 30s")
	}
}

func TestTheTestNodesSplitFourPartitionsByParity(t *testing.T) {
	require.Equal(t, []string{testNodes[0], testNodes[1], testNodes[0], testNodes[1]}, Assign(4, testNodes[:]))
}

func TestOwnerHandlesEveryPartitionInOrderAndUnpinsOnShutdown(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := fastConfig(0)
	cfg.Replicas = 1
	l, err := NewLog(connect(t, c.URL()), cfg, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	s := requireStream(t, l)
	publish(t, l, 0, 200, cfg.Partitions)

	reg := prometheus.NewRegistry()
	rec, m := newRecorder(), NewMetrics(reg)
	ro := startOwner(t, c.URL(), cfg, rec, m)
	require.Eventually(t, func() bool { return rec.count() == 200 }, 30*time.Second, 20*time.Millisecond)
	publish(t, l, 200, 200, cfg.Partitions)
	require.Eventually(t, func() bool { return rec.count() == 400 }, 30*time.Second, 20*time.Millisecond)
	rec.requireInOrder(t)
	for p := range cfg.Partitions {
		hs := rec.handlers(p, 0)
		require.Equal(t, map[int]int{0: 100}, hs, "partition %d: each batch handled once", p)
		require.Equal(t, fmt.Sprint(p), rec.handled[p][0].data)
	}
	require.Equal(t, 4.0, testutil.ToFloat64(m.owned))
	require.Equal(t, 4.0, testutil.ToFloat64(m.changes.WithLabelValues("gained")))
	require.Equal(t, 1.0, testutil.ToFloat64(m.alive), "alone")
	require.Equal(t, 4.0, testutil.ToFloat64(m.preferred), "alone: every partition is its")
	n, err := testutil.GatherAndCount(reg, "citypulse_cluster_partitions_owned", "citypulse_cluster_partition_handovers_total")
	require.NoError(t, err)
	require.Equal(t, 2, n, "the metrics are in the injected registry")

	ro.stop(t)
	require.Zero(t, testutil.ToFloat64(m.owned))
	for p := range cfg.Partitions {
		ci, err := s.Consumer(ctx, consumerName(p))
		require.NoError(t, err)
		info, err := ci.Info(ctx)
		require.NoError(t, err)
		require.Zero(t, info.NumAckPending, "partition %d: everything acknowledged", p)
		require.Len(t, info.PriorityGroups, 1)
		require.Empty(t, info.PriorityGroups[0].PinnedClientID, "partition %d: unpinned on shutdown", p)
		require.Equal(t, jetstream.PriorityPolicyPinned, info.Config.PriorityPolicy)
	}
}

func TestTwoNodesSplitThePartitionsAndHandThemOverOnShutdownAndBack(t *testing.T) {
	c := natstest.Start(t, 3)
	cfg0, cfg1 := fastConfig(0), fastConfig(1)
	l, err := NewLog(connect(t, c.URL()), cfg0, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	requireStream(t, l)

	rec := newRecorder()
	startOwner(t, c.Nodes[0].URL(), cfg0, rec, nil)
	o1 := startOwner(t, c.Nodes[1].URL(), cfg1, rec, nil)
	publish(t, l, 0, 40, 4)
	require.Eventually(t, func() bool { return rec.count() == 40 }, 30*time.Second, 20*time.Millisecond)
	for p := range 4 {
		require.Equal(t, map[int]int{p % 2: 10}, rec.handlers(p, 0), "partition %d goes to node p mod 2 (rendezvous hashing of the test nodes)", p)
	}

	// Batches flow at about 200/s while node 1 shuts down.
	stopFlow := flow(t, ctx, l, 40)
	time.Sleep(500 * time.Millisecond)
	stopped := time.Now()
	o1.stop(t)
	require.Eventually(t, func() bool { return rec.lastGain(1, 0).After(stopped) && rec.lastGain(3, 0).After(stopped) },
		30*time.Second, 10*time.Millisecond, "node 0 takes partitions 1 and 3 over")
	published := 40 + stopFlow()
	require.Eventually(t, func() bool { return rec.count() == published }, 30*time.Second, 20*time.Millisecond)
	var took, first time.Duration
	for _, p := range []int{1, 3} {
		g := rec.gained[p][len(rec.gained[p])-1]
		require.Equal(t, gain{node: 0, owned: true, at: g.at}, g, "partition %d: node 0 took it over", p)
		took = max(took, g.at.Sub(stopped))
		first = max(first, rec.firstHandled(p, 0, stopped).Sub(stopped))
	}
	t.Logf("clean shutdown of node 1 while batches flow: node 0 owned its partitions %v and handled their first batch %v after the shutdown began",
		took.Round(time.Millisecond), first.Round(time.Millisecond))
	require.Less(t, took, cfg0.PinnedTTL, "a clean shutdown unpins: no wait for the pin to expire")

	seen := rec.lastSeq()
	startOwner(t, c.Nodes[2].URL(), cfg1, rec, nil)
	require.Eventually(t, func() bool {
		publish(t, l, published, 4, 4)
		h := rec.handlers(1, seen[1])
		return h[1] > 0
	}, 30*time.Second, 500*time.Millisecond, "node 1 gets its preferred partitions back")
	rec.requireInOrder(t)
}

// TestACleanHandOverKeepsTheOrderOfTheBatchesTheOldOwnerHadNotHandled shuts
// node 1 down while its slow handler is behind: batches of partitions 1 and
// 3 were delivered to it and not handled. Node 0 must handle them before any
// newer batch (not after cluster.ack_wait, when they would come again).
func TestACleanHandOverKeepsTheOrderOfTheBatchesTheOldOwnerHadNotHandled(t *testing.T) {
	c := natstest.Start(t, 3)
	cfg0, cfg1 := fastConfig(0), fastConfig(1)
	cfg1.MaxBatch = 16
	l, err := NewLog(connect(t, c.URL()), cfg0, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	requireStream(t, l)

	rec := newRecorder()
	startOwner(t, c.Nodes[0].URL(), cfg0, rec, nil)
	handle := rec.handler(1)
	slow := func(ctx context.Context, msgs []Message) (Commit, error) {
		time.Sleep(200 * time.Millisecond) // a store that is behind
		return handle(ctx, msgs)
	}
	o1 := startOwnerWith(t, c.Nodes[1].URL(), cfg1, slow, rec.ownership(1), nil)
	publish(t, l, 0, 40, 4)
	require.Eventually(t, func() bool { return rec.count() == 40 }, 30*time.Second, 20*time.Millisecond)

	// Batches flow at about 200/s; a burst of 400 puts node 1 behind.
	stopFlow := flow(t, ctx, l, 1000)
	publish(t, l, 40, 400, 4)
	stopped := time.Now()
	o1.stop(t)
	require.Eventually(t, func() bool { return rec.lastGain(1, 0).After(stopped) && rec.lastGain(3, 0).After(stopped) },
		30*time.Second, 10*time.Millisecond, "node 0 takes partitions 1 and 3 over")
	time.Sleep(time.Second)
	published := 440 + stopFlow()
	require.Eventually(t, func() bool { return rec.count() == published }, 30*time.Second, 20*time.Millisecond)
	var took, first time.Duration
	for _, p := range []int{1, 3} {
		took = max(took, rec.lastGain(p, 0).Sub(stopped))
		first = max(first, rec.firstHandled(p, 0, stopped).Sub(stopped))
	}
	repeats := rec.requireInOrder(t)
	t.Logf("clean shutdown of node 1 while behind: node 0 owned its partitions %v and handled their first batch %v after the shutdown began; %d batches, %d repeats",
		took.Round(time.Millisecond), first.Round(time.Millisecond), published, repeats)
}

// firstHandled is when node first handled a batch of p after t (zero if never).
func (r *recorder) firstHandled(p, node int, t time.Time) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, h := range r.handled[p] {
		if h.node == node && h.at.After(t) {
			return h.at
		}
	}
	return time.Time{}
}

func (r *recorder) lastSeq() map[int]uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := map[int]uint64{}
	for p, hs := range r.handled {
		for _, h := range hs {
			out[p] = max(out[p], h.seq)
		}
	}
	return out
}

// The owner process: a node in a child process, so that the test can SIGKILL
// it. It prints "gained <p>" and "handled <p> <seq>" lines.
const ownerProcessEnv = "CITYPULSE_TEST_OWNER_PROCESS"

func runOwnerProcess() int {
	url, idx, _ := strings.Cut(os.Getenv(ownerProcessEnv), " ")
	index, _ := strconv.Atoi(idx)
	nc, err := connectURL(url)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	handle := func(_ context.Context, msgs []Message) (Commit, error) {
		// A slow store: when the process is killed, a call is under way
		// and its batches are not acknowledged, so they are redelivered.
		time.Sleep(100 * time.Millisecond)
		mu.Lock()
		defer mu.Unlock()
		for _, m := range msgs {
			fmt.Fprintf(out, "handled %d %d\n", m.Partition, m.Seq)
		}
		return nil, out.Flush()
	}
	owned := func(p int, owned bool) {
		mu.Lock()
		defer mu.Unlock()
		fmt.Fprintf(out, "owned %d %v\n", p, owned)
		_ = out.Flush()
	}
	o, err := NewOwner(nc, fastConfig(index), handle, owned, nil, nil)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	_ = o.Run(context.Background()) // until SIGKILL
	return 0
}

// TestAKilledOwnerProcessesPartitionsMoveToTheOtherNode SIGKILLs the process
// owning partitions 1 and 3 while batches flow, and measures how long until
// the other node handles them.
func TestAKilledOwnerProcessesPartitionsMoveToTheOtherNode(t *testing.T) {
	c := natstest.Start(t, 3)
	cfg := fastConfig(0)
	l, err := NewLog(connect(t, c.URL()), cfg, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	requireStream(t, l)

	child := startOwnerProcess(t, c.Nodes[1].URL(), 1)
	rec, m := newRecorder(), NewMetrics(nil)
	startOwner(t, c.Nodes[0].URL(), cfg, rec, m)

	// Batches flow at about 200/s while the child is killed.
	stopFlow := flow(t, ctx, l, 0)
	require.Eventually(t, func() bool { return child.handledCount(1) > 20 && child.handledCount(3) > 20 },
		30*time.Second, 20*time.Millisecond, "the child owns partitions 1 and 3")
	killed := child.kill()
	require.Eventually(t, func() bool { return len(rec.handlers(1, 0)) > 0 && len(rec.handlers(3, 0)) > 0 },
		30*time.Second, 10*time.Millisecond, "node 0 takes partitions 1 and 3 over")
	var took time.Duration
	for _, p := range []int{1, 3} {
		took = max(took, rec.lastGain(p, 0).Sub(killed))
	}
	time.Sleep(time.Second)
	published := stopFlow()

	// Every batch was handled by one node or the other (at least once).
	require.Eventually(t, func() bool { return rec.count()+child.onlyIn(rec) >= published }, 30*time.Second, 50*time.Millisecond)
	repeats := rec.requireInOrder(t)
	t.Logf("SIGKILL of the owner of partitions 1 and 3: node 0 owned them %v later (pinned_ttl %v, alive_timeout %v); %d batches published, %d redelivered to node 0 (%d of them handled by the killed node too, %d by node 0 before)",
		took.Round(time.Millisecond), cfg.PinnedTTL, cfg.AliveTimeout, published, int(testutil.ToFloat64(m.redelivered)), rec.duplicatesOf(child), repeats)
	require.Positive(t, testutil.ToFloat64(m.redelivered), "the batches of the killed node's unfinished call come again")
}

// lastGain is when node last gained p (zero if never).
func (r *recorder) lastGain(p, node int) time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	var at time.Time
	for _, g := range r.gained[p] {
		if g.node == node && g.owned {
			at = g.at
		}
	}
	return at
}

// flow appends batches numbered from `from`, round-robin over 4 partitions,
// at about 200/s, each awaited, until the returned stop is called; stop
// returns how many were appended.
func flow(t *testing.T, ctx context.Context, l *Log, from int) (stop func() int) {
	quit, done := make(chan struct{}), make(chan int)
	go func() {
		i := 0
		defer func() { done <- i }()
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		for ; i < 60_000; i++ {
			select {
			case <-quit:
				return
			case <-tick.C:
			}
			w, err := l.Append(ctx, (from+i)%4, "", fmt.Appendf(nil, "%d", from+i))
			if err == nil {
				err = w(ctx)
			}
			if err != nil {
				t.Errorf("append %d: %v", from+i, err)
				return
			}
		}
	}()
	return func() int { close(quit); return <-done }
}

// ownerProcess is a child process running an Owner.
type ownerProcess struct {
	cmd     *exec.Cmd
	mu      sync.Mutex
	handled map[int]map[uint64]bool
	done    chan struct{}
}

func startOwnerProcess(t *testing.T, url string, index int) *ownerProcess {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d", ownerProcessEnv, url, index))
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	op := &ownerProcess{cmd: cmd, handled: map[int]map[uint64]bool{}, done: make(chan struct{})}
	go func() {
		defer close(op.done)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var p int
			var seq uint64
			if n, _ := fmt.Sscanf(sc.Text(), "handled %d %d", &p, &seq); n == 2 {
				op.mu.Lock()
				if op.handled[p] == nil {
					op.handled[p] = map[uint64]bool{}
				}
				op.handled[p][seq] = true
				op.mu.Unlock()
			}
		}
	}()
	t.Cleanup(func() { op.kill() })
	return op
}

func (op *ownerProcess) kill() time.Time {
	if op.cmd.ProcessState == nil {
		_ = op.cmd.Process.Kill()
	}
	at := time.Now()
	<-op.done
	_ = op.cmd.Wait()
	return at
}

func (op *ownerProcess) handledCount(p int) int {
	op.mu.Lock()
	defer op.mu.Unlock()
	return len(op.handled[p])
}

// onlyIn counts the batches the child handled and r did not.
func (op *ownerProcess) onlyIn(r *recorder) int {
	op.mu.Lock()
	defer op.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for p, seqs := range op.handled {
		inR := map[uint64]bool{}
		for _, h := range r.handled[p] {
			inR[h.seq] = true
		}
		for s := range seqs {
			if !inR[s] {
				n++
			}
		}
	}
	return n
}

// duplicatesOf counts the batches both the child and r handled.
func (r *recorder) duplicatesOf(op *ownerProcess) int {
	op.mu.Lock()
	defer op.mu.Unlock()
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for p, hs := range r.handled {
		for _, h := range hs {
			if op.handled[p][h.seq] {
				n++
			}
		}
	}
	return n
}

// TestReadingsFlowFromAppendThroughTheOwnerAndDedupe is the path the server
// will wire: a gateway encodes a batch and appends it to its device's
// partition; the owner decodes, drops what it passed on before and hands
// each device's readings on in time order.
func TestReadingsFlowFromAppendThroughTheOwnerAndDedupe(t *testing.T) {
	c := natstest.Start(t, 1)
	cfg := fastConfig(0)
	cfg.Replicas = 1
	m := NewMetrics(nil)
	l, err := NewLog(connect(t, c.URL()), cfg, m)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	requireStream(t, l)

	dedupe, err := NewDedupe(64, 1000, m)
	require.NoError(t, err)
	var mu sync.Mutex
	got := map[string][]int64{}
	handle := func(_ context.Context, msgs []Message) (Commit, error) {
		var rs []pipeline.Reading
		for _, msg := range msgs {
			var err error
			if rs, err = DecodeBatch(msg.Data, rs); err != nil {
				return nil, err
			}
		}
		mu.Lock()
		defer mu.Unlock()
		for _, r := range dedupe.Filter(rs) {
			got[r.Device] = append(got[r.Device], r.Time)
		}
		return nil, nil
	}
	nc := connect(t, c.URL())
	o, err := NewOwner(nc, cfg, handle, nil, nil, m)
	require.NoError(t, err)

	devices := []string{"pipe-0001", "pipe-0002", "tl-0001"}
	appendBatch := func(id string, times ...int64) {
		byPartition := map[int][]pipeline.Reading{}
		for _, d := range devices {
			for _, ts := range times {
				p := PartitionOf(d, cfg.Partitions)
				byPartition[p] = append(byPartition[p], pipeline.Reading{Device: d, Kind: "pipe", Metric: "pressure", Value: float64(ts), Time: ts})
			}
		}
		for p, rs := range byPartition {
			w, err := l.Append(ctx, p, fmt.Sprintf("%s/%d", id, p), AppendBatch(nil, rs))
			require.NoError(t, err)
			require.NoError(t, w(ctx))
		}
	}
	// Published before the owner runs: all handed over in its first, settled call.
	appendBatch("a", 3, 1, 2)
	appendBatch("b", 2, 4) // a gateway resent time 2 inside a new batch
	runCtx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- o.Run(runCtx) }()
	defer func() { stop(); require.NoError(t, <-done) }()

	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(got["tl-0001"]) == 4 && len(got["pipe-0001"]) == 4 && len(got["pipe-0002"]) == 4
	}, 30*time.Second, 20*time.Millisecond)
	mu.Lock()
	defer mu.Unlock()
	for _, d := range devices {
		require.Equal(t, []int64{1, 2, 3, 4}, got[d], "%s: in time order, time 2 once", d)
	}
	require.Equal(t, 3.0, testutil.ToFloat64(m.duplicates), "one repeated reading per device")
}
