package derpserver

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/internal/lograte"
)

// errProtocol marks errors that close a connection for a protocol
// violation.
var errProtocol = errors.New("protocol violation")

func protoErr(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errProtocol}, args...)...)
}

// NotHere PeerGone limit per sending connection: 1/s, burst 3.
const (
	notHereBurst    = 3
	notHereInterval = time.Second
)

// ctrlMsg is a queued non-packet frame.
type ctrlMsg struct {
	typ    derp.FrameType
	key    derp.PublicKey
	reason derp.PeerGoneReason
	addr   netip.AddrPort
	flags  derp.PeerPresentFlags
	text   string
	dur1   time.Duration
	dur2   time.Duration
}

// pktRing is a fixed-capacity FIFO of packets, allocated on first use.
type pktRing struct {
	buf  []*packet
	head int
	n    int
}

// push appends p; if the ring is full the oldest packet is removed and
// returned.
func (q *pktRing) push(p *packet, depth int) (dropped *packet) {
	if q.buf == nil {
		q.buf = make([]*packet, depth)
	}
	if q.n == len(q.buf) {
		dropped = q.buf[q.head]
		q.buf[q.head] = nil
		q.head = (q.head + 1) % len(q.buf)
		q.n--
	}
	q.buf[(q.head+q.n)%len(q.buf)] = p
	q.n++
	return dropped
}

// takeAll appends every queued packet to dst in FIFO order and empties
// the ring.
func (q *pktRing) takeAll(dst []*packet) []*packet {
	for q.n > 0 {
		dst = append(dst, q.buf[q.head])
		q.buf[q.head] = nil
		q.head = (q.head + 1) % len(q.buf)
		q.n--
	}
	q.head = 0
	return dst
}

// sclient is one established DERP connection.
type sclient struct {
	s           *Server
	conn        net.Conn
	key         derp.PublicKey
	entry       *keyEntry
	remote      netip.AddrPort
	flags       derp.PeerPresentFlags
	canMesh     bool
	notIdeal    bool
	connNum     uint64
	connectedAt int64 // monoNow() at the handshake
	keepAlive   *time.Timer
	closeReason atomic.Pointer[string]
	// connClosed is set by closeConn before the connection is closed, so
	// a reader pacing itself (ratelimit.go) stops waiting.
	connClosed atomic.Bool

	isDup        atomic.Bool
	unregistered bool // guarded by Server.mu

	// Send side, guarded by mu.
	mu            sync.Mutex
	data          pktRing
	disco         pktRing
	ctrl          []ctrlMsg
	pongPending   bool
	pong          [derp.PingLen]byte
	keepAliveDue  bool
	closeAfter    bool // close after writing what is queued (server shutdown)
	closed        bool // connection finished: drop instead of queueing
	writerRunning bool
	writerWaiting bool
	wake          chan struct{}
	spaceCh       chan struct{} // closed when the writer takes the queue
	stalled       bool          // writer made no progress within QueueFullWait

	// Reader-owned.
	preferred bool
	// moreBuffered: another frame from this client is already buffered
	// (set before routing each packet; see enqueuePacket).
	moreBuffered bool
	lastDst      derp.PublicKey
	lastEntry    *keyEntry
	stats        localStats
	waitTimer    *time.Timer
	notHere      struct {
		tokens float64
		last   int64 // monoNow() of the last PeerGone(not-here) check; 0: none yet
	}
	recvLimit recvBucket // -rate-config (ratelimit.go)

	// Writer-owned (one writer at a time). sawSrc is written only with
	// Server.mu held, so others may read it under Server.mu.
	sawSrc       map[derp.PublicKey]*keyEntry
	pendingSrc   map[derp.PublicKey]struct{} // keys in Server.pendingRecv for this conn; written with Server.mu held
	lastSrcEntry *keyEntry
	deadlineSet  int64 // monoNow() when the write deadline was last moved; noDeadline if none is armed
	// An inline write that the socket took only in part: the writer
	// goroutine writes the rest of pending.frame()[pendingOff:] first, or
	// over TLS (tlsPending) drains what tlsw kept.
	pending    *packet
	pendingOff int
	tlsPending bool

	rc syscall.RawConn // raw socket for inline writes; nil if not a plain socket
	// tlsw: for inline writes through crypto/tls, the socket under a TLS
	// connection from a TLSListener; nil otherwise.
	tlsw *probeConn
	tcp  syscall.RawConn // TCP socket under the connection, for RTT samples; nil if none
	// tlsSlot is the Server.tlsConns slot counting this connection by TLS
	// version, or -1 if it is not over TLS.
	tlsSlot int8
}

// noDeadline is sclient.deadlineSet while no write deadline is armed: far
// enough in the past that the first write arms one.
const noDeadline = math.MinInt64 / 2

// disarmWriteDeadline clears the write deadline, if one is armed. Only the
// holder of the writer role calls it.
func (c *sclient) disarmWriteDeadline() {
	if c.deadlineSet != noDeadline {
		c.conn.SetWriteDeadline(time.Time{})
		c.deadlineSet = noDeadline
	}
}

// writeTimeout is the per-write deadline for this connection's writes.
func (c *sclient) writeTimeout() time.Duration {
	if c.canMesh {
		return c.s.opts.MeshWriteTimeout
	}
	return c.s.opts.WriteTimeout
}

// readLoop reads and dispatches frames until the connection fails, or
// until a TLS connection that has been idle a while goes idle again: then
// idleRead takes over in a new goroutine and this one ends, giving back
// the stack that reading through crypto/tls grew (see tlsidle.go).
func (c *sclient) readLoop(cr *connReader) {
	err := c.readFrames(cr)
	if err == errReaderIdle {
		c.s.idleHandoffs.Add(1)
		go c.idleRead(cr)
		return
	}
	c.finishRead(cr, err)
}

// idleRead waits for an idle TLS connection's next bytes with the small
// stack of a new goroutine, then goes on reading as readLoop.
func (c *sclient) idleRead(cr *connReader) {
	if err := cr.waitIdle(); err != nil {
		c.finishRead(cr, err)
		return
	}
	cr.woke = true // readable: the first read after this needs no probe
	c.readLoop(cr)
}

func (c *sclient) finishRead(cr *connReader, err error) {
	s := c.s
	defer s.wg.Done()
	cr.close()
	c.stats.flush(&s.m)
	s.m.readSyscalls.Add(cr.reads)
	c.teardown(err)
}

// errReaderIdle is readFrames handing an idle TLS connection to idleRead.
var errReaderIdle = errors.New("reader idle")

func (c *sclient) readFrames(cr *connReader) error {
	s := c.s
	for {
		if cr.buffered() < derp.FrameHeaderLen && (cr.rc == nil && cr.tls == nil || cr.hot >= 2) {
			// About to read again without having parked for a while:
			// publish our counts and let writers run. Under overload a
			// reader always finds data and would otherwise keep its P for
			// a whole time slice, starving the writers that deliver what
			// it queued (delivery collapses). A reader that parks in the
			// netpoller yields anyway and publishes its counts then
			// (onPark). Other plain reads (WebSocket) cannot tell, so
			// always yield.
			cr.hot = 0
			c.stats.flush(&s.m)
			runtime.Gosched()
		}
		if cr.tls != nil && cr.buffered() == 0 {
			if cr.woke {
				cr.woke = false // readable: read normally
			} else if idle, err := cr.tlsProbe(); err != nil {
				return err
			} else if idle {
				// A connection that was idle a while (or has not
				// waited yet) waits in a new goroutine; one woken more
				// often waits in place, sparing a goroutine start and a
				// stack growth per packet.
				if cr.idleNs >= s.idleHandoffNs {
					return errReaderIdle
				}
				if err := cr.waitIdle(); err != nil {
					return err
				}
			}
		}
		h, err := cr.next(derp.FrameHeaderLen)
		if err != nil {
			return err
		}
		t, n := derp.ParseFrameHeader(h)
		if rl := s.rateLimit.Load(); rl != nil && !c.canMesh {
			if err := c.paceRecv(rl, n); err != nil {
				return err
			}
		}
		if c.isDup.Load() && c.entry.active.Load() != c {
			s.noteActive(c)
		}
		switch t {
		case derp.FrameSendPacket:
			err = c.handleSendPacket(cr, n)
		case derp.FrameForwardPacket:
			err = c.handleForwardPacket(cr, n)
		case derp.FrameNotePreferred:
			err = c.handleNotePreferred(cr, n)
		case derp.FramePing:
			err = c.handlePing(cr, n)
		case derp.FrameWatchConns:
			if err = c.requireMesh(t); err == nil {
				if n != 0 {
					err = protoErr("WatchConns with %d-byte payload", n)
				} else {
					s.addWatcher(c)
				}
			}
		case derp.FrameClosePeer:
			if err = c.requireMesh(t); err == nil {
				if n != derp.KeyLen {
					err = protoErr("ClosePeer with %d-byte payload", n)
				} else {
					var kb []byte
					if kb, err = cr.next(derp.KeyLen); err == nil {
						s.closePeer(derp.PublicKey(kb))
					}
				}
			}
		default:
			// Unknown types and types meaningful only server-to-client.
			s.m.unknownFrames.Inc()
			if n > uint32(s.opts.MaxSkipFrame) {
				err = protoErr("%v frame of %d bytes exceeds skip limit %d", t, n, s.opts.MaxSkipFrame)
			} else {
				err = cr.discard(int(n))
			}
		}
		if err != nil {
			return err
		}
	}
}

func (c *sclient) requireMesh(t derp.FrameType) error {
	if c.canMesh {
		return nil
	}
	c.s.m.privilegedRejected.Inc()
	return protoErr("%v from a connection without the mesh key", t)
}

func (c *sclient) handleSendPacket(cr *connReader, n uint32) error {
	if n < derp.KeyLen || n-derp.KeyLen > derp.MaxPacketSize {
		return protoErr("SendPacket of %d bytes", n)
	}
	kb, err := cr.next(derp.KeyLen)
	if err != nil {
		return err
	}
	dst := derp.PublicKey(kb)
	p := getPacket(int(n - derp.KeyLen))
	if err := cr.readFull(p.data); err != nil {
		putPacket(p)
		return err
	}
	p.disco = derp.LooksLikeDisco(p.data)
	ls := &c.stats
	ls.packetsRecv++
	ls.bytesRecv += uint64(len(p.data))
	ls.recvKind[kindOf(p.disco)]++
	ls.dirty = true
	p.src = c.key
	p.srcEntry = c.entry
	c.moreBuffered = cr.moreBuffered()
	c.route(dst, p, false)
	return nil
}

func (c *sclient) handleForwardPacket(cr *connReader, n uint32) error {
	if err := c.requireMesh(derp.FrameForwardPacket); err != nil {
		return err
	}
	if n < 2*derp.KeyLen || n-2*derp.KeyLen > derp.MaxPacketSize {
		return protoErr("ForwardPacket of %d bytes", n)
	}
	kb, err := cr.next(2 * derp.KeyLen)
	if err != nil {
		return err
	}
	src, dst := derp.PublicKey(kb[:derp.KeyLen]), derp.PublicKey(kb[derp.KeyLen:])
	p := getPacket(int(n - 2*derp.KeyLen))
	if err := cr.readFull(p.data); err != nil {
		putPacket(p)
		return err
	}
	p.disco = derp.LooksLikeDisco(p.data)
	c.stats.forwardedIn++
	c.stats.dirty = true
	p.src = src
	p.srcEntry = nil
	c.moreBuffered = cr.moreBuffered()
	c.route(dst, p, true)
	return nil
}

// route delivers p to dst's selected local connection, else (for packets
// from local senders) to a forwarder, else drops it.
func (c *sclient) route(dst derp.PublicKey, p *packet, forwarded bool) {
	e := c.lastEntry
	if e == nil || c.lastDst != dst || e.dead.Load() {
		e = c.s.lookup(dst)
		if e != nil {
			c.lastDst, c.lastEntry = dst, e
		}
	}
	if e != nil {
		if d := e.active.Load(); d != nil {
			d.enqueuePacket(p, c)
			return
		}
		if !forwarded {
			if f := e.fwd.Load(); f != nil {
				c.stats.forwardedOut++
				c.stats.dirty = true
				if err := f.f.ForwardPacket(p.src, dst, p.data); err != nil {
					c.s.m.forwardErrors.Inc()
				}
				putPacket(p)
				return
			}
		}
	}
	reason := dropUnknownDest
	if forwarded {
		reason = dropUnknownDestOnFwd
	}
	c.stats.drop(reason, p.disco, len(p.data))
	if p.disco && c.allowNotHere() {
		c.enqueueCtrl(ctrlMsg{typ: derp.FramePeerGone, key: dst, reason: derp.PeerGoneNotHere})
	}
	putPacket(p)
}

// allowNotHere is a token bucket (1/s, burst 3) for PeerGone(not-here).
func (c *sclient) allowNotHere() bool {
	now := monoNow()
	b := &c.notHere
	if b.last != 0 {
		b.tokens = min(notHereBurst, b.tokens+time.Duration(now-b.last).Seconds()/notHereInterval.Seconds())
	}
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

func (c *sclient) handleNotePreferred(cr *connReader, n uint32) error {
	if n != 1 {
		return protoErr("NotePreferred of %d bytes", n)
	}
	b, err := cr.next(1)
	if err != nil {
		return err
	}
	v := b[0] != 0
	if v == c.preferred {
		return nil
	}
	c.preferred = v
	m := &c.s.m
	moved := time.Duration(monoNow()-c.connectedAt) > 5*time.Second
	if v {
		m.curHome.Add(1)
		if moved {
			m.homeMovesIn.Inc()
		}
	} else {
		m.curHome.Add(-1)
		if moved {
			m.homeMovesOut.Inc()
		}
	}
	return nil
}

func (c *sclient) handlePing(cr *connReader, n uint32) error {
	c.s.m.gotPing.Inc()
	if n < derp.PingLen || n > derp.MaxPingLen {
		return protoErr("Ping of %d bytes", n)
	}
	b, err := cr.next(int(n))
	if err != nil {
		return err
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	if c.pongPending {
		c.mu.Unlock()
		c.s.m.pingsIgnored.Inc()
		return nil
	}
	c.pongPending = true
	c.pong = [derp.PingLen]byte(b[:derp.PingLen])
	start, wake := c.kickLocked()
	c.mu.Unlock()
	c.startOrWake(start, wake)
	return nil
}

// closeConn closes the connection; its reader, if it is pacing itself,
// stops waiting.
func (c *sclient) closeConn() error {
	c.connClosed.Store(true)
	return c.conn.Close()
}

// teardown runs once the reader is done: it stops the writer, drops what
// is queued, and removes the connection from the registry.
func (c *sclient) teardown(err error) {
	s := c.s
	c.closeConn()
	reason := crEOF
	if r := c.closeReason.Load(); r != nil {
		reason = *r
	} else if errors.Is(err, errProtocol) {
		reason = crProtocol
	}
	s.m.closed[reason].Inc()
	if reason == crProtocol {
		if ok, suppressed := s.connLog.Allow(time.Now()); ok {
			s.log.Info("derp: closing connection", lograte.Attrs(suppressed, "remote", c.remote, "key", c.key.ShortString(), "err", err)...)
		}
	} else {
		s.log.Debug("derp: connection closed", "remote", c.remote, "key", c.key.ShortString(), "reason", reason, "err", err)
	}

	c.mu.Lock()
	c.closed = true
	c.noteTakenLocked()
	if c.keepAlive != nil {
		c.keepAlive.Stop()
	}
	var drops []*packet
	if !c.writerRunning {
		drops = c.takePacketsLocked(nil)
		c.ctrl = nil
	} else if c.writerWaiting {
		c.writerWaiting = false
		c.signal()
	}
	c.mu.Unlock()
	for _, p := range drops {
		s.m.recordDrop(dropGoneDisconnected, p.data)
		putPacket(p)
	}
	s.unregister(c)
	s.connsMu.Lock()
	delete(s.clients, c)
	s.connsMu.Unlock()
	if c.tlsSlot >= 0 {
		s.tlsConns[c.tlsSlot].Add(-1)
	}
}

func (c *sclient) takePacketsLocked(dst []*packet) []*packet {
	dst = c.disco.takeAll(dst)
	return c.data.takeAll(dst)
}

// enqueuePacket queues p for this connection. If the queue is full and
// this connection's writer has been making progress, the sender waits up
// to QueueFullWait for the writer to take the queue: under CPU overload
// that turns into TCP back-pressure on the senders instead of reading
// packets only to drop them (which collapses delivery). If the writer makes
// no progress within that time (a slow or dead receiver), the queue is
// marked stalled and later packets replace the oldest queued one at once
// (queue_head drop) until the writer takes the queue again: a slow
// receiver can delay a sender by at most QueueFullWait per write the
// receiver completes, and never blocks it.
func (c *sclient) enqueuePacket(p *packet, from *sclient) {
	p.enq = monoNow()
	ring, depth := c.ringFor(p)
	c.mu.Lock()
	if !c.s.opts.DisableInlineWrites && !from.moreBuffered && (c.rc != nil || c.tlsw != nil) && !c.writerRunning && !c.closed && c.idleLocked() {
		// Nothing queued, no writer, and the sender has no further frame
		// buffered (a burst is better batched by a writer goroutine):
		// write it from here, saving the hand-off to a writer goroutine
		// (a wake-up and two context switches) on the common path.
		c.writerRunning = true
		c.mu.Unlock()
		c.writeInline(p, from)
		return
	}
	for waited := false; ; waited = true {
		if c.closed {
			c.mu.Unlock()
			from.stats.drop(dropGoneDisconnected, p.disco, len(p.data))
			putPacket(p)
			return
		}
		if ring.n < depth || waited || c.stalled || c.s.opts.QueueFullWait < 0 || from == c {
			break
		}
		if c.spaceCh == nil {
			c.spaceCh = make(chan struct{})
		}
		ch := c.spaceCh
		start, wake := c.kickLocked()
		c.mu.Unlock()
		c.startOrWake(start, wake)
		ok := from.waitSpace(ch)
		c.mu.Lock()
		if !ok && ch == c.spaceCh {
			c.stalled = true
		}
	}
	old := ring.push(p, depth)
	start, wake := c.kickLocked()
	c.mu.Unlock()
	if old != nil {
		from.stats.drop(dropQueueHead, old.disco, len(old.data))
		putPacket(old)
	}
	c.startOrWake(start, wake)
}

// ringFor returns the queue for p and its depth.
func (c *sclient) ringFor(p *packet) (*pktRing, int) {
	if p.disco {
		return &c.disco, c.s.opts.DiscoQueueDepth
	}
	return &c.data, c.s.opts.QueueDepth
}

// idleLocked reports whether nothing at all is queued.
func (c *sclient) idleLocked() bool {
	return c.data.n == 0 && c.disco.n == 0 && len(c.ctrl) == 0 && !c.pongPending && !c.keepAliveDue && !c.closeAfter
}

// writeInline writes one packet from the sender's goroutine while holding
// the writer role (writerRunning), without waiting: what the socket does
// not take at once is left to a writer goroutine.
func (c *sclient) writeInline(p *packet, from *sclient) {
	if c.tlsw != nil {
		c.writeInlineTLS(p, from)
		return
	}
	c.noteSrc(p)
	frame := p.frame()
	n, err := rawWriteNow(c.rc, frame)
	if n == len(frame) {
		from.stats.sentPackets++
		from.stats.sentBytes += uint64(len(p.data))
		from.stats.dirty = true
		putPacket(p)
	} else if err != nil && err != syscall.EAGAIN {
		from.stats.drop(dropWriteError, p.disco, len(p.data))
		putPacket(p)
		c.closeReason.CompareAndSwap(nil, &crWriteErrorStr)
		c.closeConn()
	} else {
		c.pending, c.pendingOff = p, n
	}
	c.endInline()
}

// writeInlineTLS is writeInline over TLS: crypto/tls seals the frame into
// a record, and the socket under it takes what it can at once; the rest
// of the record is left for a writer goroutine to drain. If a write under
// crypto/tls is already waiting for socket space (crypto/tls answering a
// key update), the packet is queued instead.
func (c *sclient) writeInlineTLS(p *packet, from *sclient) {
	if !c.tlsw.beginNonblock() {
		ring, depth := c.ringFor(p)
		c.mu.Lock()
		old := ring.push(p, depth)
		c.mu.Unlock()
		if old != nil {
			from.stats.drop(dropQueueHead, old.disco, len(old.data))
			putPacket(old)
		}
		c.endInline()
		return
	}
	c.noteSrc(p)
	_, err := c.conn.Write(p.frame())
	c.tlsPending = c.tlsw.endNonblock()
	if err == nil {
		from.stats.sentPackets++
		from.stats.sentBytes += uint64(len(p.data))
		from.stats.dirty = true
	} else {
		from.stats.drop(dropWriteError, p.disco, len(p.data))
		c.closeReason.CompareAndSwap(nil, &crWriteErrorStr)
		c.closeConn()
	}
	putPacket(p)
	c.endInline()
}

// endInline gives up the writer role after an inline write, or hands it
// to a writer goroutine if part of the write is left or others queued
// meanwhile.
func (c *sclient) endInline() {
	c.mu.Lock()
	if c.pending == nil && !c.tlsPending && (c.closed || c.idleLocked()) {
		var drops []*packet
		if c.closed {
			drops = c.takePacketsLocked(nil)
			c.ctrl = nil
		}
		c.writerRunning = false
		c.mu.Unlock()
		for _, d := range drops {
			c.s.m.recordDrop(dropGoneDisconnected, d.data)
			putPacket(d)
		}
		return
	}
	// The rest of the frame, or what others queued meanwhile, goes to a
	// writer goroutine. The sender's reader is running, so the wait group
	// is not zero.
	c.s.wg.Add(1)
	c.mu.Unlock()
	c.s.m.writerStarts.Inc()
	go c.writeLoop()
}

// armWaitTimer (re)arms the reader's reusable timer for d and returns its
// channel.
func (c *sclient) armWaitTimer(d time.Duration) <-chan time.Time {
	if c.waitTimer == nil {
		c.waitTimer = time.NewTimer(d)
	} else {
		c.waitTimer.Reset(d)
	}
	return c.waitTimer.C
}

// waitSpace waits (as a sender) until ch is closed or QueueFullWait passes.
func (c *sclient) waitSpace(ch chan struct{}) bool {
	timeout := c.armWaitTimer(c.s.opts.QueueFullWait)
	select {
	case <-ch:
		c.waitTimer.Stop()
		c.s.m.queueWaits.Inc()
		return true
	case <-timeout:
		c.s.m.queueWaitTimeouts.Inc()
		return false
	}
}

// noteTakenLocked tells senders waiting for queue space that the writer
// took the queue.
func (c *sclient) noteTakenLocked() {
	c.stalled = false
	if c.spaceCh != nil {
		close(c.spaceCh)
		c.spaceCh = nil
	}
}

// enqueueCtrl queues a control frame. It may be called with Server.mu held.
func (c *sclient) enqueueCtrl(m ctrlMsg) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	if len(c.ctrl) >= maxCtrlQueue {
		c.mu.Unlock()
		c.s.m.controlQueueOverflows.Inc()
		c.closeReason.CompareAndSwap(nil, &crCtrlOverflowStr)
		go c.closeConn()
		return
	}
	c.ctrl = append(c.ctrl, m)
	start, wake := c.kickLocked()
	c.mu.Unlock()
	c.startOrWake(start, wake)
}

var crCtrlOverflowStr = crCtrlOverflow

func (c *sclient) onKeepAlive() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.keepAliveDue = true
	c.keepAlive.Reset(c.s.keepAliveInterval())
	start, wake := c.kickLocked()
	c.mu.Unlock()
	c.startOrWake(start, wake)
}

func (c *sclient) enqueueRestarting(reconnectIn, tryFor time.Duration) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.ctrl = append(c.ctrl, ctrlMsg{typ: derp.FrameRestarting, dur1: reconnectIn, dur2: tryFor})
	c.closeAfter = true
	start, wake := c.kickLocked()
	c.mu.Unlock()
	c.startOrWake(start, wake)
}

// kickLocked decides whether the writer must be started or woken.
func (c *sclient) kickLocked() (start, wake bool) {
	if !c.writerRunning {
		c.writerRunning = true
		c.s.wg.Add(1) // the reader is alive (closed is false), so the group is non-zero
		return true, false
	}
	if c.writerWaiting {
		c.writerWaiting = false
		return false, true
	}
	return false, false
}

func (c *sclient) startOrWake(start, wake bool) {
	if start {
		c.s.m.writerStarts.Inc()
		go c.writeLoop()
	} else if wake {
		c.signal()
	}
}

func (c *sclient) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// writeBatch is what the writer takes from the queues in one go.
type writeBatch struct {
	ctrl      []ctrlMsg
	pkts      []*packet
	pong      bool
	pongData  [derp.PingLen]byte
	keepAlive bool
}

func (b *writeBatch) empty() bool {
	return len(b.ctrl) == 0 && len(b.pkts) == 0 && !b.pong && !b.keepAlive
}

// writeLoop drains the queues into batched writes. It exits when the
// connection closes, on a write error, or after Server.writerLinger without
// work.
func (c *sclient) writeLoop() {
	s := c.s
	defer s.wg.Done()
	s.m.writersActive.Add(1)
	defer s.m.writersActive.Add(-1)
	wake := c.wake

	var (
		batch    writeBatch
		spare    []ctrlMsg
		bufp     *[]byte
		timer    *time.Timer
		busy     = true // work seen since the linger timer was armed
		failed   error
		pktsCap  = s.opts.QueueDepth + s.opts.DiscoQueueDepth
		sentPk   uint64
		sentByte uint64
		// meshLoops counts the batches with presence frames taken since
		// the last batch without any (derp_mesh_update_loop_count).
		meshLoops uint64
	)
	batch.pkts = make([]*packet, 0, pktsCap)
	defer func() {
		if bufp != nil {
			*bufp = (*bufp)[:0]
			writeBufPool.Put(bufp)
		}
		if timer != nil {
			timer.Stop()
		}
	}()

	// The rest of an inline write first.
	if c.pending != nil || c.tlsPending {
		if wt := c.writeTimeout(); wt > 0 {
			now := time.Now()
			c.conn.SetWriteDeadline(now.Add(wt))
			c.deadlineSet = monoAt(now)
		}
		if p := c.pending; p != nil {
			c.pending = nil
			if _, failed = c.write(p.frame()[c.pendingOff:]); failed != nil {
				s.m.recordDrop(dropWriteError, p.data)
			} else {
				s.m.packetsSent.Inc()
				s.m.bytesSent.Add(uint64(len(p.data)))
			}
			putPacket(p)
		} else {
			// The packet was counted as sent when crypto/tls took it.
			c.tlsPending = false
			failed = c.tlsw.drain()
		}
		if failed != nil {
			if errors.Is(failed, os.ErrDeadlineExceeded) {
				s.m.writeTimeouts.Inc()
			}
			c.closeReason.CompareAndSwap(nil, &crWriteErrorStr)
			c.closeConn()
		}
	}
	for {
		c.mu.Lock()
		if c.closed || failed != nil {
			rest := c.takePacketsLocked(batch.pkts[:0])
			c.noteTakenLocked()
			c.ctrl = nil
			c.writerRunning = false
			c.writerWaiting = false
			c.mu.Unlock()
			for _, p := range rest {
				s.m.recordDrop(dropGoneDisconnected, p.data)
				putPacket(p)
			}
			return
		}
		// Two arrays alternate: the writer reads one while enqueuers
		// append to the other.
		batch.ctrl, c.ctrl, spare = c.ctrl, spare[:0], nil
		batch.pkts = c.takePacketsLocked(batch.pkts[:0])
		if len(batch.pkts) > 0 {
			c.noteTakenLocked()
		}
		batch.pong, batch.pongData = c.pongPending, c.pong
		c.pongPending = false
		batch.keepAlive = c.keepAliveDue
		c.keepAliveDue = false
		if batch.empty() {
			if meshLoops > 0 {
				s.m.meshUpdateLoops.Observe(meshLoops)
				meshLoops = 0
			}
			spare, batch.ctrl = batch.ctrl[:0], nil
			if c.closeAfter {
				c.closeAfter = false
				c.mu.Unlock()
				closeWrite(c.conn)
				continue
			}
			c.writerWaiting = true
			c.mu.Unlock()
			if bufp != nil {
				*bufp = (*bufp)[:0]
				writeBufPool.Put(bufp)
				bufp = nil
			}
			if timer == nil {
				timer = time.NewTimer(s.writerLinger)
				busy = false
			}
			select {
			case <-wake:
				busy = true
				continue
			case <-timer.C:
			}
			if busy {
				busy = false
				timer.Reset(s.writerLinger)
				continue
			}
			// Inline writes (writeInline) use the same descriptor and set
			// no deadline of their own, and the runtime fails every write
			// once an armed deadline has passed: disarm it before the
			// writer role can be given up. (If work has come in meanwhile,
			// the next flush arms it again.)
			c.disarmWriteDeadline()
			c.mu.Lock()
			if !c.closed && len(c.ctrl) == 0 && c.data.n == 0 && c.disco.n == 0 && !c.pongPending && !c.keepAliveDue && !c.closeAfter {
				c.writerRunning = false
				c.writerWaiting = false
				c.mu.Unlock()
				return
			}
			c.writerWaiting = false
			c.mu.Unlock()
			timer.Reset(s.writerLinger)
			continue
		}
		c.mu.Unlock()
		busy = true
		if c.canMesh {
			if n := presenceFrames(batch.ctrl); n > 0 {
				s.m.meshUpdateBatch.Observe(n)
				meshLoops++
			} else if meshLoops > 0 {
				s.m.meshUpdateLoops.Observe(meshLoops)
				meshLoops = 0
			}
		}

		if bufp == nil {
			bufp = writeBufPool.Get().(*[]byte)
		}
		sentPk, sentByte, failed = c.writeBatch(bufp, &batch)
		if sentPk > 0 {
			s.m.packetsSent.Add(sentPk)
			s.m.bytesSent.Add(sentByte)
		}
		clear(batch.ctrl)
		spare = batch.ctrl[:0]
		batch.ctrl = nil
		if cap(spare) > 1024 {
			spare = nil
		}
		if failed != nil {
			if errors.Is(failed, os.ErrDeadlineExceeded) {
				s.m.writeTimeouts.Inc()
			}
			c.closeReason.CompareAndSwap(nil, &crWriteErrorStr)
			c.closeConn()
		}
	}
}

var crWriteErrorStr = crWriteError

// presenceFrames counts the PeerPresent and PeerGone messages in ctrl.
func presenceFrames(ctrl []ctrlMsg) uint64 {
	var n uint64
	for i := range ctrl {
		if t := ctrl[i].typ; t == derp.FramePeerPresent || t == derp.FramePeerGone {
			n++
		}
	}
	return n
}

// write writes all of b, waiting for socket space under the write
// deadline: on a plain socket without the scheduler's system-call
// bookkeeping (rawWriteAll), otherwise through the connection.
func (c *sclient) write(b []byte) (int, error) {
	if c.rc != nil {
		return rawWriteAll(c.rc, b)
	}
	return c.conn.Write(b)
}

func closeWrite(nc net.Conn) {
	if cw, ok := nc.(interface{ CloseWrite() error }); ok {
		if cw.CloseWrite() == nil {
			return
		}
	}
	nc.Close()
}

// writeBatch encodes one batch into *bufp, writing whenever the buffer
// fills, and returns the packets and bytes delivered.
func (c *sclient) writeBatch(bufp *[]byte, b *writeBatch) (pkts, bytes uint64, err error) {
	s := c.s
	m := &s.m
	buf := (*bufp)[:0]
	var pend [2]struct{ n, bytes uint64 } // unflushed packets by kind
	frames := uint64(0)
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		if wt := c.writeTimeout(); wt > 0 {
			// Re-arming the deadline costs a runtime timer update, so it
			// is moved only when a quarter of it has passed: each write
			// gets between 3/4 and all of WriteTimeout.
			if now := time.Now(); time.Duration(monoAt(now)-c.deadlineSet) > wt/4 {
				c.conn.SetWriteDeadline(now.Add(wt))
				c.deadlineSet = monoAt(now)
			}
		}
		_, err := c.write(buf)
		m.writeFlushes.Inc()
		m.writeFrames.Add(frames)
		m.bufferedWriteFrames.Observe(frames)
		frames = 0
		buf = buf[:0]
		if err != nil {
			for k := range 2 {
				if pend[k].n > 0 {
					m.packetsDropped[dropWriteError][k].Add(pend[k].n)
					m.bytesDropped[dropWriteError][k].Add(pend[k].bytes)
				}
			}
			return err
		}
		for k := range 2 {
			pkts += pend[k].n
			bytes += pend[k].bytes
			pend[k].n, pend[k].bytes = 0, 0
		}
		return nil
	}
	room := func(n int) error {
		if len(buf)+n > cap(buf) {
			return flush()
		}
		return nil
	}
	defer func() { *bufp = buf[:0] }()

	for i := range b.ctrl {
		cm := &b.ctrl[i]
		if max := cap(buf) - derp.FrameHeaderLen - derp.PeerPresentLen; len(cm.text) > max {
			cm.text = cm.text[:max]
		}
		if err = room(derp.FrameHeaderLen + derp.PeerPresentLen + len(cm.text)); err != nil {
			break
		}
		switch cm.typ {
		case derp.FramePeerGone:
			buf = derp.AppendPeerGone(buf, cm.key, cm.reason)
			if cm.reason == derp.PeerGoneNotHere {
				m.peerGoneNotHere.Inc()
			} else {
				m.peerGoneDisconnected.Inc()
				c.forgetSrc(cm.key)
			}
		case derp.FramePeerPresent:
			buf = derp.AppendPeerPresent(buf, derp.PeerPresent{Key: cm.key, Addr: cm.addr, Flags: cm.flags})
		case derp.FrameHealth:
			buf = derp.AppendHealth(buf, cm.text)
			m.healthFrames.Inc()
		case derp.FrameRestarting:
			buf = derp.AppendRestarting(buf, cm.dur1, cm.dur2)
			m.restartingFrames.Inc()
		}
		frames++
	}
	if err == nil && b.pong {
		if err = room(derp.FrameHeaderLen + derp.PingLen); err == nil {
			buf = derp.AppendPong(buf, b.pongData)
			m.sentPong.Inc()
			frames++
		}
	}
	if err == nil && b.keepAlive {
		if err = room(derp.FrameHeaderLen); err == nil {
			buf = derp.AppendKeepAlive(buf)
			m.keepAlives.Inc()
			frames++
		}
	}
	if len(b.pkts) > 0 {
		if ms := float64(monoNow()-b.pkts[0].enq) / 1e6; ms >= 0 {
			m.avgQueueMillis.ewma(ms, 0.1)
		}
	}
	for i, p := range b.pkts {
		b.pkts[i] = nil
		if err != nil {
			m.recordDrop(dropWriteError, p.data)
			putPacket(p)
			continue
		}
		if err = room(derp.FrameHeaderLen + derp.KeyLen + len(p.data)); err != nil {
			m.recordDrop(dropWriteError, p.data)
			putPacket(p)
			continue
		}
		c.noteSrc(p)
		buf = derp.AppendRecvPacket(buf, p.src, p.data)
		frames++
		k := kindOf(p.disco)
		pend[k].n++
		pend[k].bytes += uint64(len(p.data))
		putPacket(p)
	}
	if err == nil {
		err = flush()
	}
	return pkts, bytes, err
}

// notePendingSrc records a forwarded-in packet from a key this node does
// not know yet (see Server.pendingRecv).
func (c *sclient) notePendingSrc(k derp.PublicKey) {
	if _, ok := c.pendingSrc[k]; ok {
		return
	}
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.unregistered {
		return
	}
	if c.pendingSrc == nil {
		c.pendingSrc = make(map[derp.PublicKey]struct{})
	}
	c.pendingSrc[k] = struct{}{}
	if cur := s.keys[k]; cur != nil { // learned meanwhile
		if cur.receivers == nil {
			cur.receivers = make(map[*sclient]struct{})
		}
		cur.receivers[c] = struct{}{}
		return
	}
	m := s.pendingRecv[k]
	if m == nil {
		m = make(map[*sclient]struct{})
		s.pendingRecv[k] = m
	}
	m[c] = struct{}{}
}

// noteSrc records that this connection received from p.src, so it gets
// PeerGone when p.src leaves the region.
func (c *sclient) noteSrc(p *packet) {
	e := p.srcEntry
	if e != nil && e == c.lastSrcEntry {
		return
	}
	if e == nil {
		e = c.s.lookup(p.src) // forwarded-in packet
		if e == nil {
			c.notePendingSrc(p.src)
			return
		}
	}
	c.lastSrcEntry = e
	if c.sawSrc[p.src] == e && !e.dead.Load() {
		return
	}
	s := c.s
	var gone bool
	s.mu.Lock()
	if !c.unregistered {
		cur := s.keys[p.src]
		if cur == nil {
			gone = true // left before its packet reached us
		} else {
			if cur.receivers == nil {
				cur.receivers = make(map[*sclient]struct{})
			}
			cur.receivers[c] = struct{}{}
			if c.sawSrc == nil {
				c.sawSrc = make(map[derp.PublicKey]*keyEntry)
			}
			c.sawSrc[p.src] = cur
		}
	}
	s.mu.Unlock()
	if gone {
		c.enqueueCtrl(ctrlMsg{typ: derp.FramePeerGone, key: p.src, reason: derp.PeerGoneDisconnected})
	}
}

// forgetSrc drops the receive record of a key that has left, once its
// PeerGone has been written.
func (c *sclient) forgetSrc(k derp.PublicKey) {
	e, ok := c.sawSrc[k]
	if !ok || !e.dead.Load() {
		return
	}
	c.s.mu.Lock()
	delete(c.sawSrc, k)
	c.s.mu.Unlock()
	if c.lastSrcEntry == e {
		c.lastSrcEntry = nil
	}
}
