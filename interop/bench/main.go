// Command bench runs xderpd and Tailscale's derper side by side on loopback
// (separate processes built from this module) and drives both with the same
// load generator built on Tailscale's derphttp client and net/stun code. It
// prints a markdown table of figures and ratios per transport: plain HTTP,
// and TLS (both servers in manual certificate mode with one shared
// self-signed certificate for 127.0.0.1, the clients pinning it by
// CertName), where it also measures full TLS handshakes per second.
//
//	cd interop && go run ./bench [-transports http,tls] [-duration 5s] [-conns 10000]
//
// Every phase is bounded in time and count; all traffic stays on loopback.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/xderp/xderp/interop/internal/target"
	"golang.org/x/net/ipv4"
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

var (
	flagDuration   = flag.Duration("duration", 5*time.Second, "measuring time of each throughput, latency and STUN phase")
	flagWarmup     = flag.Duration("warmup", 500*time.Millisecond, "warm-up before each measured phase")
	flagPairs      = flag.Int("pairs", 16, "sender/receiver pairs in the throughput phases")
	flagInflight   = flag.Int("inflight", 32, "packets in flight per pair in the closed-loop phase")
	flagSize       = flag.Int("size", 1200, "packet size in bytes")
	flagConns      = flag.Int("conns", 10000, "idle connections in the memory phase")
	flagSTUNSock   = flag.Int("stun-sockets", 8, "client sockets in the STUN phase")
	flagSTUNOut    = flag.Int("stun-outstanding", 8, "requests outstanding per STUN socket")
	flagTargets    = flag.String("targets", "xderpd,reference", "implementations to measure")
	flagRounds     = flag.Int("rounds", 2, "measure each phase (except memory) this many times per implementation and keep the best figure")
	flagPhases     = flag.String("phases", "closed,overload,latency,memory,stun,ceiling,handshake", "phases to run (stun and ceiling only over http, handshake only over tls)")
	flagTransports = flag.String("transports", "http,tls", "transports to measure, each printing its own table: http (plain HTTP) and/or tls (both servers with the same self-signed certificate)")
	flagHSParallel = flag.Int("handshake-parallel", 4, "concurrent dialers in the TLS handshake phase")
	flagHSMax      = flag.Int("handshake-max", 20000, "at most this many TLS handshakes per measured handshake window")
)

type result struct {
	closedPPS, closedMbps float64
	overPPS, overOffered  float64
	closedCPU, overCPU    float64 // packets delivered per server CPU-second
	stunCPU               float64 // responses per server CPU-second
	p50, p99              time.Duration
	memKiBPerConn         float64
	stunRPS               float64
	handshakes            float64 // full TLS handshakes per second
	handshakeCPU          float64 // handshakes per server CPU-second
	errs                  []string
}

func main() {
	flag.Parse()
	log.SetFlags(0)
	log.SetPrefix("bench: ")
	raiseNoFile()
	phases := map[string]bool{}
	for _, p := range strings.Split(*flagPhases, ",") {
		phases[strings.TrimSpace(p)] = true
	}
	var transports []string
	for _, t := range strings.Split(*flagTransports, ",") {
		switch t = strings.TrimSpace(t); t {
		case "http", "tls":
			transports = append(transports, t)
		case "":
		default:
			log.Fatalf("-transports: unknown transport %q (want http, tls or both)", t)
		}
	}
	dir, err := os.MkdirTemp("", "xderp-bench-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	var kinds []target.Kind
	for _, k := range strings.Split(*flagTargets, ",") {
		kinds = append(kinds, target.Kind(strings.TrimSpace(k)))
	}
	bins := map[target.Kind]string{}
	buildErrs := map[target.Kind]string{}
	for _, k := range kinds {
		bin, err := target.Build(k, dir)
		if err != nil {
			buildErrs[k] = err.Error()
			log.Printf("%s: %v", k, err)
			continue
		}
		bins[k] = bin
	}
	type table struct {
		transport string
		results   map[target.Kind]*result
		ceilMbps  float64
		load      string // 1-minute load average when the suite ended
	}
	var tables []table
	for _, tr := range transports {
		results := map[target.Kind]*result{}
		for _, k := range kinds {
			results[k] = &result{}
			if e, ok := buildErrs[k]; ok {
				results[k].errs = append(results[k].errs, e)
			}
		}
		ceil := runSuite(tr, dir, kinds, bins, phases, results)
		tables = append(tables, table{tr, results, ceil, loadAvg()})
	}
	for _, t := range tables {
		printTable(os.Stdout, t.transport, t.load, t.results[target.Xderpd], t.results[target.Reference], t.ceilMbps)
	}
}

// startRelay starts the server for k over the given transport.
func startRelay(transport, dir string, k target.Kind, bin string) (relay, error) {
	if transport == "tls" {
		return startTLS(k, bin, dir)
	}
	s, err := target.Start(k, bin, target.Options{Dir: dir})
	if err != nil {
		return nil, err
	}
	return plainRelay{s}, nil
}

// runSuite runs the phases against every built implementation over one
// transport ("http" or "tls") and returns the ceiling figure (plain HTTP
// only: STUN and the ceiling do not depend on TLS and are not repeated).
func runSuite(transport, dir string, kinds []target.Kind, bins map[target.Kind]string, phases map[string]bool, results map[target.Kind]*result) float64 {
	log.Printf("=== transport %s ===", transport)
	// Both servers run side by side for the whole suite; phases measure
	// one at a time so they do not compete for the two cores.
	servers := map[target.Kind]relay{}
	for _, k := range kinds {
		if bins[k] == "" {
			continue
		}
		s, err := startRelay(transport, dir, k, bins[k])
		if err != nil {
			results[k].errs = append(results[k].errs, err.Error())
			log.Printf("%s: %v", k, err)
			continue
		}
		defer s.Stop(10 * time.Second)
		servers[k] = s
		log.Printf("%s: pid %d on %s over %s (stun %s)", k, s.PID(), s.HostPort(), transport, s.STUNAddr())
	}

	// Phases run in the outer loop and implementations in the inner one, so
	// both see the same background load; with -rounds N each figure is the
	// best of N.
	type phase struct {
		name string
		run  func(k target.Kind, s relay, r *result) error
	}
	all := []phase{
		{"closed", func(k target.Kind, s relay, r *result) error {
			pps, _, err := throughput(s, true)
			if pps > r.closedPPS {
				r.closedPPS, r.closedMbps = pps, pps*float64(*flagSize)*8/1e6
			}
			r.closedCPU = max(r.closedCPU, perCPU(pps))
			log.Printf("%s closed-loop: %.0f pkt/s, %.0f Mbit/s", k, pps, pps*float64(*flagSize)*8/1e6)
			return err
		}},
		{"overload", func(k target.Kind, s relay, r *result) error {
			pps, offered, err := throughput(s, false)
			if pps > r.overPPS {
				r.overPPS, r.overOffered = pps, offered
			}
			r.overCPU = max(r.overCPU, perCPU(pps))
			log.Printf("%s overload: %.0f pkt/s delivered of %.0f pkt/s sent", k, pps, offered)
			return err
		}},
		{"latency", func(k target.Kind, s relay, r *result) error {
			p50, p99, err := latency(s)
			if r.p99 == 0 || (p99 > 0 && p99 < r.p99) {
				r.p50, r.p99 = p50, p99
			}
			log.Printf("%s rtt: p50 %v p99 %v", k, p50, p99)
			return err
		}},
		{"stun", func(k target.Kind, s relay, r *result) error {
			rps, err := stunRate(s)
			r.stunRPS = max(r.stunRPS, rps)
			r.stunCPU = max(r.stunCPU, perCPU(rps))
			log.Printf("%s stun: %.0f responses/s", k, rps)
			return err
		}},
		{"handshake", func(k target.Kind, s relay, r *result) error {
			t, ok := s.(*tlsRelay)
			if !ok {
				return nil
			}
			hps, perSec, err := handshakeRate(t)
			r.handshakes = max(r.handshakes, hps)
			r.handshakeCPU = max(r.handshakeCPU, perSec)
			log.Printf("%s TLS handshakes: %.0f/s", k, hps)
			return err
		}},
		{"memory", func(k target.Kind, _ relay, r *result) error {
			// A fresh process so the baseline is not inflated by the
			// buffers the throughput phases grew.
			fresh, err := startRelay(transport, dir, k, bins[k])
			if err != nil {
				return err
			}
			defer fresh.Stop(10 * time.Second)
			kib, err := memoryPerConn(fresh, *flagConns)
			if kib > 0 && (r.memKiBPerConn == 0 || kib < r.memKiBPerConn) {
				r.memKiBPerConn = kib
			}
			log.Printf("%s memory: %.2f KiB per idle connection", k, kib)
			return err
		}},
	}
	for _, ph := range all {
		if !phases[ph.name] {
			continue
		}
		if transport == "tls" && ph.name == "stun" {
			continue // STUN is UDP: the same with or without TLS
		}
		if transport == "http" && ph.name == "handshake" {
			continue
		}
		rounds := *flagRounds
		if ph.name == "memory" {
			rounds = 1 // needs a fresh process each time and is not CPU-bound
		}
		for range rounds {
			for _, k := range kinds {
				s := servers[k]
				if s == nil {
					continue
				}
				if err := ph.run(k, s, results[k]); err != nil {
					results[k].errs = append(results[k].errs, ph.name+": "+err.Error())
					log.Printf("%s %s: %v", k, ph.name, err)
				}
			}
		}
	}
	var ceilMbps float64
	if phases["ceiling"] && transport == "http" {
		var err error
		ceilMbps, err = ceiling()
		if err != nil {
			log.Printf("ceiling: %v", err)
		}
		log.Printf("ceiling: %.0f Mbit/s through an io.Copy relay", ceilMbps)
	}
	return ceilMbps
}

// relay is one running server as the phases see it: how to reach it and
// what it reports about itself.
type relay interface {
	kind() target.Kind
	newClient(priv key.NodePrivate) (*derphttp.Client, error)
	PID() int
	HostPort() string
	STUNAddr() string
	CPUSeconds() (float64, error)
	RSSKiB() (int64, error)
	Metric(ctx context.Context, name string) (float64, error)
	MetricSum(ctx context.Context, name string) (float64, error)
	Stop(d time.Duration) error
}

// plainRelay is a server on plain HTTP, run by the shared target package.
type plainRelay struct{ *target.Server }

func (p plainRelay) kind() target.Kind { return p.Kind }

func (p plainRelay) newClient(priv key.NodePrivate) (*derphttp.Client, error) {
	return derphttp.NewClient(priv, p.DERPURL(), quiet, netmon.NewStatic())
}

func raiseNoFile() {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
}

var quiet = logger.Discard

var syncMagic = []byte("xderp-bench-sync")

type client struct {
	c    *derphttp.Client
	priv key.NodePrivate
	pub  key.NodePublic
}

func connect(ctx context.Context, s relay) (*client, error) {
	priv := key.NewNode()
	c, err := s.newClient(priv)
	if err != nil {
		return nil, err
	}
	if err := c.Connect(ctx); err != nil {
		c.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	return &client{c: c, priv: priv, pub: priv.Public()}, nil
}

// pairUp connects n sender/receiver pairs and makes sure each receiver is
// registered (a sync packet from its sender arrived).
func pairUp(s relay, n int) (senders, receivers []*client, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	closeAll := func() {
		for _, c := range append(senders, receivers...) {
			c.c.Close()
		}
	}
	for range n {
		a, err := connect(ctx, s)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		b, err := connect(ctx, s)
		if err != nil {
			a.c.Close()
			closeAll()
			return nil, nil, err
		}
		senders, receivers = append(senders, a), append(receivers, b)
	}
	return senders, receivers, nil
}

// awaitSync has a send sync packets to b until b's receive loop (which
// calls arrived) has seen one.
func awaitSync(a, b *client, arrived *atomic.Bool) error {
	deadline := time.Now().Add(10 * time.Second)
	for !arrived.Load() {
		if time.Now().After(deadline) {
			return errors.New("pair did not sync within 10s")
		}
		if err := a.c.Send(b.pub, syncMagic); err != nil {
			return err
		}
		time.Sleep(10 * time.Millisecond) // resend interval while polling
	}
	return nil
}

// throughput runs pairs senders to pairs receivers. closed: each pair keeps
// at most inflight packets in flight (a receiver returns a credit per
// packet; a credit not returned within 1 s counts as lost and is
// reissued). Otherwise senders are unthrottled. Returns delivered pkt/s.
func throughput(s relay, closed bool) (delivered, offered float64, err error) {
	senders, receivers, err := pairUp(s, *flagPairs)
	if err != nil {
		return 0, 0, err
	}
	var (
		counting atomic.Bool
		stop     atomic.Bool
		recvd    atomic.Int64
		sent     atomic.Int64
		lost     atomic.Int64
		wg       sync.WaitGroup
		errMu    sync.Mutex
		firstErr error
	)
	setErr := func(err error) {
		errMu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		errMu.Unlock()
	}
	pkt := make([]byte, *flagSize)
	for i := range pkt {
		pkt[i] = byte(i)
	}
	synced := make([]atomic.Bool, len(senders))
	credits := make([]chan struct{}, len(senders))
	for i := range senders {
		credits[i] = make(chan struct{}, *flagInflight)
		for range *flagInflight {
			credits[i] <- struct{}{}
		}
		a, b := senders[i], receivers[i]
		wg.Add(1)
		go func() { // receiver
			defer wg.Done()
			for {
				m, err := b.c.Recv()
				if err != nil {
					if !stop.Load() {
						setErr(fmt.Errorf("receiver: %w", err))
					}
					return
				}
				rp, ok := m.(derp.ReceivedPacket)
				if !ok || rp.Source != a.pub {
					continue
				}
				if len(rp.Data) == len(syncMagic) {
					synced[i].Store(true)
					continue
				}
				if counting.Load() {
					recvd.Add(1)
				}
				if closed {
					select {
					case credits[i] <- struct{}{}:
					default:
					}
				}
			}
		}()
	}
	for i := range senders {
		if err := awaitSync(senders[i], receivers[i], &synced[i]); err != nil {
			stop.Store(true)
			for _, c := range append(senders, receivers...) {
				c.c.Close()
			}
			wg.Wait()
			return 0, 0, err
		}
	}
	stopped := make(chan struct{})
	var swg sync.WaitGroup
	for i := range senders {
		a, b := senders[i], receivers[i]
		swg.Add(1)
		go func() { // sender
			defer swg.Done()
			for !stop.Load() {
				if closed {
					select {
					case <-credits[i]:
					case <-time.After(time.Second):
						if !stop.Load() {
							lost.Add(1)
						}
					case <-stopped:
						return
					}
				}
				if err := a.c.Send(b.pub, pkt); err != nil {
					if !stop.Load() {
						setErr(fmt.Errorf("sender: %w", err))
					}
					return
				}
				if counting.Load() {
					sent.Add(1)
				}
			}
		}()
	}
	time.Sleep(*flagWarmup) // warm-up
	before := serverCounters(s)
	cpu0, _ := s.CPUSeconds()
	self0 := selfCPU()
	counting.Store(true)
	start := time.Now()
	time.Sleep(*flagDuration) // measuring window
	counting.Store(false)
	elapsed := time.Since(start)
	n, m := recvd.Load(), sent.Load()
	cpu1, _ := s.CPUSeconds()
	lastCPU, lastElapsed = cpu1-cpu0, elapsed.Seconds()
	genCPU := selfCPU() - self0
	after := serverCounters(s)
	log.Printf("%s %s: server counted per second: %s; CPU cores busy: server %.2f, load generator %.2f",
		s.kind(), map[bool]string{true: "closed-loop", false: "overload"}[closed], after.rateSince(before, elapsed),
		lastCPU/elapsed.Seconds(), genCPU/elapsed.Seconds())
	stop.Store(true)
	close(stopped)
	for _, c := range append(senders, receivers...) {
		c.c.Close()
	}
	swg.Wait()
	wg.Wait()
	if closed && lost.Load() > 0 {
		log.Printf("%s closed-loop: %d credits timed out (packets lost)", s.kind(), lost.Load())
	}
	return float64(n) / elapsed.Seconds(), float64(m) / elapsed.Seconds(), firstErr
}

// latency measures round trips a -> relay -> b -> relay -> a of one packet
// at a time, for the phase duration (at most 500,000 samples).
func latency(s relay) (p50, p99 time.Duration, err error) {
	senders, receivers, err := pairUp(s, 1)
	if err != nil {
		return 0, 0, err
	}
	a, b := senders[0], receivers[0]
	defer a.c.Close()
	defer b.c.Close()
	echoErr := make(chan error, 1)
	go func() { // b echoes everything from a back to a
		for {
			m, err := b.c.Recv()
			if err != nil {
				echoErr <- err
				return
			}
			if rp, ok := m.(derp.ReceivedPacket); ok && rp.Source == a.pub {
				if err := b.c.Send(a.pub, rp.Data); err != nil {
					echoErr <- err
					return
				}
			}
		}
	}()
	got := make(chan []byte, 1)
	go func() {
		for {
			m, err := a.c.Recv()
			if err != nil {
				close(got)
				return
			}
			if rp, ok := m.(derp.ReceivedPacket); ok && rp.Source == b.pub {
				got <- append([]byte(nil), rp.Data...)
			}
		}
	}()
	pkt := make([]byte, *flagSize)
	// Both registered: resend until one packet has made the round trip.
	syncDeadline := time.Now().Add(10 * time.Second)
	for synced := false; !synced; {
		if time.Now().After(syncDeadline) {
			return 0, 0, errors.New("pair did not sync within 10s")
		}
		if err := a.c.Send(b.pub, pkt); err != nil {
			return 0, 0, err
		}
		select {
		case _, ok := <-got:
			if !ok {
				return 0, 0, errors.New("client a closed")
			}
			synced = true
		case <-time.After(10 * time.Millisecond): // resend interval
		}
	}
	var samples []time.Duration
	cpu0, self0, trips := serverCPU(s), selfCPU(), 0
	warmEnd := time.Now().Add(*flagWarmup)
	end := warmEnd.Add(*flagDuration)
	for seq := uint64(1); time.Now().Before(end) && len(samples) < 500_000; seq++ {
		putSeq(pkt, seq)
		t0 := time.Now()
		if err := a.c.Send(b.pub, pkt); err != nil {
			return 0, 0, err
		}
		timeout := time.NewTimer(2 * time.Second)
	wait:
		for {
			select {
			case d, ok := <-got:
				if !ok {
					timeout.Stop()
					return 0, 0, errors.New("client a closed")
				}
				if getSeq(d) == seq {
					break wait
				}
			case err := <-echoErr:
				timeout.Stop()
				return 0, 0, err
			case <-timeout.C:
				// Lost (or never registered): skip this sample.
				break wait
			}
		}
		timeout.Stop()
		rtt := time.Since(t0)
		if rtt < 2*time.Second {
			trips++
			if t0.After(warmEnd) {
				samples = append(samples, rtt)
			}
		}
	}
	if len(samples) == 0 {
		return 0, 0, errors.New("no round trip completed")
	}
	// Where a round trip's time goes: CPU of the server and of this
	// process (the two clients) per round trip; the rest is waiting.
	log.Printf("%s rtt: CPU per round trip: server %.1f µs, clients %.1f µs",
		s.kind(), (serverCPU(s)-cpu0)/float64(trips)*1e6, (selfCPU()-self0)/float64(trips)*1e6)
	slices.Sort(samples)
	return samples[len(samples)/2], samples[len(samples)*99/100], nil
}

// serverCPU returns the CPU time (s) the server process has used (0 if
// unknown).
func serverCPU(s relay) float64 {
	c, _ := s.CPUSeconds()
	return c
}

// selfCPU returns the CPU time (s) the bench process has used.
func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// lastCPU is the server CPU time (s) of the last measured window, and
// lastElapsed that window's wall-clock length (s), over which its rate was
// counted.
var lastCPU, lastElapsed float64

func perCPU(rate float64) float64 {
	if lastCPU <= 0 {
		return 0
	}
	return rate * lastElapsed / lastCPU
}

// counters are the server's own packet counters (derper's names).
type counters struct{ received, sent, dropped float64 }

func serverCounters(s relay) counters {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var c counters
	c.received, _ = s.MetricSum(ctx, "derp_packets_received")
	c.sent, _ = s.MetricSum(ctx, "derp_packets_sent")
	c.dropped, _ = s.MetricSum(ctx, "derp_packets_dropped")
	return c
}

func (c counters) rateSince(b counters, d time.Duration) string {
	sec := d.Seconds()
	return fmt.Sprintf("received %.0f, sent %.0f, dropped %.0f", (c.received-b.received)/sec, (c.sent-b.sent)/sec, (c.dropped-b.dropped)/sec)
}

func putSeq(b []byte, v uint64) {
	for i := range 8 {
		b[i] = byte(v >> (8 * i))
	}
}

func getSeq(b []byte) uint64 {
	if len(b) < 8 {
		return 0
	}
	var v uint64
	for i := range 8 {
		v |= uint64(b[i]) << (8 * i)
	}
	return v
}

// memoryPerConn opens n idle, fully handshaken connections and returns the
// growth of the server's VmRSS per connection, in KiB.
func memoryPerConn(s relay, n int) (float64, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	before, err := stableRSS(s)
	if err != nil {
		return 0, err
	}
	clients := make([]*client, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var firstErr atomic.Value
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				c, err := connect(ctx, s)
				if err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				clients[i] = c
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.c.Close()
			}
		}
	}()
	if err, _ := firstErr.Load().(error); err != nil {
		return 0, err
	}
	// After the handshake: the server counts all n as connected.
	for {
		v, err := s.Metric(ctx, "derp_current_connections")
		if err == nil && v >= float64(n) {
			break
		}
		if ctx.Err() != nil {
			return 0, fmt.Errorf("server reports %v connections of %d (%v)", v, n, err)
		}
		time.Sleep(100 * time.Millisecond) // poll interval
	}
	after, err := stableRSS(s)
	if err != nil {
		return 0, err
	}
	return float64(after-before) / float64(n), nil
}

// stableRSS polls VmRSS until two readings 500 ms apart differ by less than
// 0.5% (at most 5 s) and returns the last.
func stableRSS(s relay) (int64, error) {
	prev, err := s.RSSKiB()
	if err != nil {
		return 0, err
	}
	for range 10 {
		time.Sleep(500 * time.Millisecond) // sampling interval
		cur, err := s.RSSKiB()
		if err != nil {
			return 0, err
		}
		d := cur - prev
		if d < 0 {
			d = -d
		}
		if float64(d) < 0.005*float64(cur) {
			return cur, nil
		}
		prev = cur
	}
	return prev, nil
}

// stunRate keeps stun-outstanding requests in flight on each of
// stun-sockets sockets and counts valid responses per second. The client
// sends and receives in batches (sendmmsg/recvmmsg) and cycles through
// pre-built requests, so that on a small machine it costs less CPU per
// request than the server and the figure is the server's.
func stunRate(s relay) (float64, error) {
	var counting, stop atomic.Bool
	var answered atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, *flagSTUNSock)
	dst, err := net.ResolveUDPAddr("udp", s.STUNAddr())
	if err != nil {
		return 0, err
	}
	window := *flagSTUNOut
	for range *flagSTUNSock {
		uc, err := net.ListenUDP("udp", &net.UDPAddr{IP: dst.IP, Port: 0})
		if err != nil {
			return 0, err
		}
		defer uc.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			pc := ipv4.NewPacketConn(uc)
			reqs := make([][]byte, 1024)
			for i := range reqs {
				reqs[i] = stun.Request(stun.NewTxID())
			}
			next := 0
			out := make([]ipv4.Message, window)
			in := make([]ipv4.Message, window)
			for i := range in {
				in[i].Buffers = [][]byte{make([]byte, 1500)}
			}
			send := func(n int) error {
				for i := range n {
					out[i].Buffers = [][]byte{reqs[next]}
					out[i].Addr = dst
					next = (next + 1) % len(reqs)
				}
				for sent := 0; sent < n; {
					k, err := pc.WriteBatch(out[sent:n], 0)
					if err != nil {
						return err
					}
					sent += k
				}
				return nil
			}
			if err := send(window); err != nil {
				errc <- err
				return
			}
			for !stop.Load() {
				uc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				n, err := pc.ReadBatch(in, 0)
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						// Requests lost: refill the window.
						if err := send(window); err != nil && !stop.Load() {
							errc <- err
							return
						}
						continue
					}
					if !stop.Load() {
						errc <- err
					}
					return
				}
				valid := 0
				for i := range n {
					if _, _, err := stun.ParseResponse(in[i].Buffers[0][:in[i].N]); err == nil {
						valid++
					}
				}
				if counting.Load() {
					answered.Add(int64(valid))
				}
				if err := send(n); err != nil {
					if !stop.Load() {
						errc <- err
					}
					return
				}
			}
		}()
	}
	time.Sleep(*flagWarmup) // warm-up
	cpu0, _ := s.CPUSeconds()
	self0 := selfCPU()
	counting.Store(true)
	start := time.Now()
	time.Sleep(*flagDuration) // measuring window
	counting.Store(false)
	elapsed := time.Since(start)
	cpu1, _ := s.CPUSeconds()
	lastCPU, lastElapsed = cpu1-cpu0, elapsed.Seconds()
	log.Printf("%s stun: CPU cores busy: server %.2f, load generator %.2f", s.kind(), lastCPU/elapsed.Seconds(), (selfCPU()-self0)/elapsed.Seconds())
	stop.Store(true)
	wg.Wait()
	select {
	case err := <-errc:
		return float64(answered.Load()) / elapsed.Seconds(), err
	default:
	}
	return float64(answered.Load()) / elapsed.Seconds(), nil
}

// ceiling measures the loopback TCP copy rate through a trivial relay
// (io.Copy between two sockets) with as many streams as pairs.
func ceiling() (float64, error) {
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer sink.Close()
	proxy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer proxy.Close()
	var counting, stop atomic.Bool
	var bytes atomic.Int64
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64<<10)
				for {
					n, err := c.Read(buf)
					if counting.Load() {
						bytes.Add(int64(n))
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	go func() {
		for {
			c, err := proxy.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", sink.Addr().String())
				if err != nil {
					return
				}
				defer up.Close()
				io.Copy(up, c)
			}()
		}
	}()
	var wg sync.WaitGroup
	for range *flagPairs {
		c, err := net.Dial("tcp", proxy.Addr().String())
		if err != nil {
			return 0, err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			buf := make([]byte, 32<<10)
			for !stop.Load() {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
	}
	time.Sleep(*flagWarmup) // warm-up
	counting.Store(true)
	start := time.Now()
	time.Sleep(*flagDuration) // measuring window
	counting.Store(false)
	elapsed := time.Since(start)
	stop.Store(true)
	wg.Wait()
	return float64(bytes.Load()) * 8 / 1e6 / elapsed.Seconds(), nil
}

func printTable(w io.Writer, transport, load string, x, r *result, ceilMbps float64) {
	if x == nil {
		x = &result{}
	}
	if r == nil {
		r = &result{}
	}
	over := "plain HTTP"
	if transport == "tls" {
		over = "TLS (one self-signed ECDSA P-256 certificate for both, pinned by CertName; the targets are the plain-HTTP ones)"
	}
	fmt.Fprintf(w, "\nxderp benchmark over %s: %d pairs, %d in flight, %d-byte packets, %v per phase, best of %d, %d idle connections, GOMAXPROCS %d on %d CPUs, load average %s\n\n",
		over, *flagPairs, *flagInflight, *flagSize, *flagDuration, *flagRounds, *flagConns, runtime.GOMAXPROCS(0), runtime.NumCPU(), load)
	fmt.Fprintln(w, "| metric | xderpd | reference (derper) | ratio | target | met? |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|")
	ratio := func(a, b float64) (float64, bool) {
		if a <= 0 || b <= 0 {
			return 0, false
		}
		return a / b, true
	}
	row := func(metric, xs, rs string, rat float64, ok bool, tgt string, met func(float64) bool) {
		rstr, mstr := "n/a", "n/a"
		if ok {
			rstr = fmt.Sprintf("%.2fx", rat)
			if met != nil {
				mstr = "no"
				if met(rat) {
					mstr = "yes"
				}
			} else {
				mstr = "-"
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s |\n", metric, xs, rs, rstr, tgt, mstr)
	}
	num := func(v float64, format string) string {
		if v <= 0 {
			return "n/a"
		}
		return fmt.Sprintf(format, v)
	}
	rt, ok := ratio(x.closedPPS, r.closedPPS)
	row("closed-loop throughput (pkt/s)", num(x.closedPPS, "%.0f"), num(r.closedPPS, "%.0f"), rt, ok, ">= 3x", func(v float64) bool { return v >= 3 })
	rt, ok = ratio(x.closedMbps, r.closedMbps)
	row("closed-loop throughput (Mbit/s)", num(x.closedMbps, "%.0f"), num(r.closedMbps, "%.0f"), rt, ok, "-", nil)
	rt, ok = ratio(x.overOffered, r.overOffered)
	row("overload offered by senders (pkt/s)", num(x.overOffered, "%.0f"), num(r.overOffered, "%.0f"), rt, ok, "-", nil)
	rt, ok = ratio(x.overPPS, r.overPPS)
	row("overload delivered (pkt/s)", num(x.overPPS, "%.0f"), num(r.overPPS, "%.0f"), rt, ok, "-", nil)
	xo, xok := ratio(x.overPPS, x.closedPPS)
	ro, rok := ratio(r.overPPS, r.closedPPS)
	xs, rs := "n/a", "n/a"
	if xok {
		xs = fmt.Sprintf("%.0f%%", 100*xo)
	}
	if rok {
		rs = fmt.Sprintf("%.0f%%", 100*ro)
	}
	met := "n/a"
	if xok {
		met = "no"
		if xo >= 0.9 {
			met = "yes"
		}
	}
	fmt.Fprintf(w, "| overload as %% of own closed-loop | %s | %s | - | xderpd >= 90%% | %s |\n", xs, rs, met)
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	rt, ok = ratio(us(x.p50), us(r.p50))
	row("round trip p50 (µs)", num(us(x.p50), "%.0f"), num(us(r.p50), "%.0f"), rt, ok, "-", nil)
	rt, ok = ratio(us(x.p99), us(r.p99))
	row("round trip p99 (µs)", num(us(x.p99), "%.0f"), num(us(r.p99), "%.0f"), rt, ok, "<= 0.7x", func(v float64) bool { return v <= 0.7 })
	rt, ok = ratio(x.memKiBPerConn, r.memKiBPerConn)
	row("RSS per idle connection (KiB)", num(x.memKiBPerConn, "%.2f"), num(r.memKiBPerConn, "%.2f"), rt, ok, "<= 0.33x", func(v float64) bool { return v <= 1.0/3 })
	if transport != "tls" {
		rt, ok = ratio(x.stunRPS, r.stunRPS)
		row("STUN responses/s", num(x.stunRPS, "%.0f"), num(r.stunRPS, "%.0f"), rt, ok, ">= 2x", func(v float64) bool { return v >= 2 })
	}
	rt, ok = ratio(x.closedCPU, r.closedCPU)
	row("closed-loop pkt per server CPU-second", num(x.closedCPU, "%.0f"), num(r.closedCPU, "%.0f"), rt, ok, "-", nil)
	rt, ok = ratio(x.overCPU, r.overCPU)
	row("overload delivered pkt per server CPU-second", num(x.overCPU, "%.0f"), num(r.overCPU, "%.0f"), rt, ok, "-", nil)
	if transport == "tls" {
		rt, ok = ratio(x.handshakes, r.handshakes)
		row("full TLS handshakes/s", num(x.handshakes, "%.0f"), num(r.handshakes, "%.0f"), rt, ok, "-", nil)
		rt, ok = ratio(x.handshakeCPU, r.handshakeCPU)
		row("full TLS handshakes per server CPU-second", num(x.handshakeCPU, "%.0f"), num(r.handshakeCPU, "%.0f"), rt, ok, "-", nil)
	} else {
		rt, ok = ratio(x.stunCPU, r.stunCPU)
		row("STUN responses per server CPU-second", num(x.stunCPU, "%.0f"), num(r.stunCPU, "%.0f"), rt, ok, "-", nil)
		fmt.Fprintf(w, "| ceiling: loopback TCP through an io.Copy relay (Mbit/s) | %s | | | - | - |\n", num(ceilMbps, "%.0f"))
	}
	for name, res := range map[string]*result{"xderpd": x, "reference": r} {
		for _, e := range res.errs {
			fmt.Fprintf(w, "\n%s: %s", name, e)
		}
	}
	fmt.Fprintln(w)
}

// loadAvg returns the 1-minute load average, to show how busy the machine was.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return "unknown"
	}
	return f[0]
}
