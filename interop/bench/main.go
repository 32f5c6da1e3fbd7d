// Command bench runs xderpd and Tailscale's derper side by side on loopback
// (plain HTTP, separate processes built from this module) and drives both
// with the same load generator built on Tailscale's derphttp client and
// net/stun code. It prints a markdown table of figures and ratios.
//
//	cd interop && go run ./bench [-duration 5s] [-conns 10000]
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
	"tailscale.com/derp"
	"tailscale.com/derp/derphttp"
	"tailscale.com/net/netmon"
	"tailscale.com/net/stun"
	"tailscale.com/types/key"
	"tailscale.com/types/logger"
)

var (
	flagDuration = flag.Duration("duration", 5*time.Second, "measuring time of each throughput, latency and STUN phase")
	flagWarmup   = flag.Duration("warmup", 500*time.Millisecond, "warm-up before each measured phase")
	flagPairs    = flag.Int("pairs", 16, "sender/receiver pairs in the throughput phases")
	flagInflight = flag.Int("inflight", 32, "packets in flight per pair in the closed-loop phase")
	flagSize     = flag.Int("size", 1200, "packet size in bytes")
	flagConns    = flag.Int("conns", 10000, "idle connections in the memory phase")
	flagSTUNSock = flag.Int("stun-sockets", 8, "client sockets in the STUN phase")
	flagSTUNOut  = flag.Int("stun-outstanding", 8, "requests outstanding per STUN socket")
	flagTargets  = flag.String("targets", "xderpd,reference", "implementations to measure")
	flagPhases   = flag.String("phases", "closed,overload,latency,memory,stun,ceiling", "phases to run")
)

type result struct {
	closedPPS, closedMbps float64
	overPPS               float64
	p50, p99              time.Duration
	memKiBPerConn         float64
	stunRPS               float64
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
	dir, err := os.MkdirTemp("", "xderp-bench-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)

	results := map[target.Kind]*result{}
	var kinds []target.Kind
	for _, k := range strings.Split(*flagTargets, ",") {
		kinds = append(kinds, target.Kind(strings.TrimSpace(k)))
	}
	bins := map[target.Kind]string{}
	for _, k := range kinds {
		r := &result{}
		results[k] = r
		bin, err := target.Build(k, dir)
		if err != nil {
			r.errs = append(r.errs, err.Error())
			log.Printf("%s: %v", k, err)
			continue
		}
		bins[k] = bin
	}
	// Both servers run side by side for the whole bench; phases measure
	// one at a time so they do not compete for the two cores.
	servers := map[target.Kind]*target.Server{}
	for _, k := range kinds {
		if bins[k] == "" {
			continue
		}
		s, err := target.Start(k, bins[k], target.Options{Dir: dir})
		if err != nil {
			results[k].errs = append(results[k].errs, err.Error())
			log.Printf("%s: %v", k, err)
			continue
		}
		defer s.Stop(10 * time.Second)
		servers[k] = s
		log.Printf("%s: pid %d on %s (stun %s)", k, s.PID(), s.HostPort(), s.STUNAddr())
	}

	for _, k := range kinds {
		s := servers[k]
		if s == nil {
			continue
		}
		r := results[k]
		note := func(phase string, err error) {
			if err != nil {
				r.errs = append(r.errs, phase+": "+err.Error())
				log.Printf("%s %s: %v", k, phase, err)
			}
		}
		if phases["closed"] {
			pps, err := throughput(s, true)
			note("closed-loop", err)
			r.closedPPS, r.closedMbps = pps, pps*float64(*flagSize)*8/1e6
			log.Printf("%s closed-loop: %.0f pkt/s, %.0f Mbit/s", k, pps, r.closedMbps)
		}
		if phases["overload"] {
			pps, err := throughput(s, false)
			note("overload", err)
			r.overPPS = pps
			log.Printf("%s overload: %.0f pkt/s delivered", k, pps)
		}
		if phases["latency"] {
			p50, p99, err := latency(s)
			note("latency", err)
			r.p50, r.p99 = p50, p99
			log.Printf("%s rtt: p50 %v p99 %v", k, p50, p99)
		}
		if phases["stun"] {
			rps, err := stunRate(s)
			note("stun", err)
			r.stunRPS = rps
			log.Printf("%s stun: %.0f responses/s", k, rps)
		}
		if phases["memory"] {
			// A fresh process so the baseline is not inflated by the
			// buffers the throughput phases grew.
			fresh, err := target.Start(k, bins[k], target.Options{Dir: dir})
			if err != nil {
				note("memory", err)
			} else {
				kib, err := memoryPerConn(fresh, *flagConns)
				note("memory", err)
				r.memKiBPerConn = kib
				log.Printf("%s memory: %.2f KiB per idle connection", k, kib)
				fresh.Stop(10 * time.Second)
			}
		}
	}
	var ceilMbps float64
	if phases["ceiling"] {
		var err error
		ceilMbps, err = ceiling()
		if err != nil {
			log.Printf("ceiling: %v", err)
		}
		log.Printf("ceiling: %.0f Mbit/s through an io.Copy relay", ceilMbps)
	}
	printTable(os.Stdout, results[target.Xderpd], results[target.Reference], ceilMbps)
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

func connect(ctx context.Context, s *target.Server) (*client, error) {
	priv := key.NewNode()
	c, err := derphttp.NewClient(priv, s.DERPURL(), quiet, netmon.NewStatic())
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
func pairUp(s *target.Server, n int) (senders, receivers []*client, err error) {
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
func throughput(s *target.Server, closed bool) (float64, error) {
	senders, receivers, err := pairUp(s, *flagPairs)
	if err != nil {
		return 0, err
	}
	var (
		counting  atomic.Bool
		stop      atomic.Bool
		delivered atomic.Int64
		lost      atomic.Int64
		wg        sync.WaitGroup
		errMu     sync.Mutex
		firstErr  error
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
					delivered.Add(1)
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
			return 0, err
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
			}
		}()
	}
	time.Sleep(*flagWarmup) // warm-up
	counting.Store(true)
	start := time.Now()
	time.Sleep(*flagDuration) // measuring window
	counting.Store(false)
	elapsed := time.Since(start)
	n := delivered.Load()
	stop.Store(true)
	close(stopped)
	for _, c := range append(senders, receivers...) {
		c.c.Close()
	}
	swg.Wait()
	wg.Wait()
	if closed && lost.Load() > 0 {
		log.Printf("%s closed-loop: %d credits timed out (packets lost)", s.Kind, lost.Load())
	}
	return float64(n) / elapsed.Seconds(), firstErr
}

// latency measures round trips a -> relay -> b -> relay -> a of one packet
// at a time, for the phase duration (at most 500,000 samples).
func latency(s *target.Server) (p50, p99 time.Duration, err error) {
	senders, receivers, err := pairUp(s, 1)
	if err != nil {
		return 0, 0, err
	}
	a, b := senders[0], receivers[0]
	defer a.c.Close()
	defer b.c.Close()
	var stop atomic.Bool
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
	var samples []time.Duration
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
		if t0.After(warmEnd) && rtt < 2*time.Second {
			samples = append(samples, rtt)
		}
	}
	stop.Store(true)
	if len(samples) == 0 {
		return 0, 0, errors.New("no round trip completed")
	}
	slices.Sort(samples)
	return samples[len(samples)/2], samples[len(samples)*99/100], nil
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
func memoryPerConn(s *target.Server, n int) (float64, error) {
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
func stableRSS(s *target.Server) (int64, error) {
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
// stun-sockets sockets and counts valid responses per second.
func stunRate(s *target.Server) (float64, error) {
	var counting, stop atomic.Bool
	var answered atomic.Int64
	var wg sync.WaitGroup
	errc := make(chan error, *flagSTUNSock)
	for range *flagSTUNSock {
		conn, err := net.Dial("udp", s.STUNAddr())
		if err != nil {
			return 0, err
		}
		defer conn.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1500)
			send := func() error {
				_, err := conn.Write(stun.Request(stun.NewTxID()))
				return err
			}
			for range *flagSTUNOut {
				if err := send(); err != nil {
					errc <- err
					return
				}
			}
			for !stop.Load() {
				conn.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
				n, err := conn.Read(buf)
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						// Requests lost: refill the window.
						for range *flagSTUNOut {
							send()
						}
						continue
					}
					if !stop.Load() {
						errc <- err
					}
					return
				}
				if _, _, err := stun.ParseResponse(buf[:n]); err == nil && counting.Load() {
					answered.Add(1)
				}
				if err := send(); err != nil {
					if !stop.Load() {
						errc <- err
					}
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

func printTable(w io.Writer, x, r *result, ceilMbps float64) {
	if x == nil {
		x = &result{}
	}
	if r == nil {
		r = &result{}
	}
	fmt.Fprintf(w, "\nxderp benchmark: %d pairs, %d in flight, %d-byte packets, %v per phase, %d idle connections, GOMAXPROCS %d on %d CPUs\n\n",
		*flagPairs, *flagInflight, *flagSize, *flagDuration, *flagConns, runtime.GOMAXPROCS(0), runtime.NumCPU())
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
	rt, ok = ratio(x.stunRPS, r.stunRPS)
	row("STUN responses/s", num(x.stunRPS, "%.0f"), num(r.stunRPS, "%.0f"), rt, ok, ">= 2x", func(v float64) bool { return v >= 2 })
	fmt.Fprintf(w, "| ceiling: loopback TCP through an io.Copy relay (Mbit/s) | %s | | | - | - |\n", num(ceilMbps, "%.0f"))
	for name, res := range map[string]*result{"xderpd": x, "reference": r} {
		for _, e := range res.errs {
			fmt.Fprintf(w, "\n%s: %s", name, e)
		}
	}
	fmt.Fprintln(w)
}
