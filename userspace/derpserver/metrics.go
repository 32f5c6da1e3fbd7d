package derpserver

import (
	"runtime"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

// dropReason is the "reason" label of derp_packets_dropped, with derper's
// label values.
type dropReason int

const (
	dropUnknownDest      dropReason = iota // no local client and no forwarder
	dropUnknownDestOnFwd                   // forwarded-in packet for a key not connected here
	dropGoneDisconnected                   // destination disconnected with the packet queued
	dropQueueHead                          // oldest queued packet dropped to make room
	dropQueueTail                          // new packet dropped (kept for derper parity; see NOTES)
	dropWriteError                         // the write to the destination failed
	dropDupClient                          // destination key has connections but none is selected
	numDropReasons
)

var dropReasonNames = [numDropReasons]string{
	"unknown_dest", "unknown_dest_on_fwd", "gone_disconnected",
	"queue_head", "queue_tail", "write_error", "dup_client",
}

// kind is the "kind" label: 0 other, 1 disco.
func kindOf(disco bool) int {
	if disco {
		return 1
	}
	return 0
}

var kindNames = [2]string{"other", "disco"}

// handshake failure reasons (xderp_handshake_errors_total{reason}).
const (
	hsWrite      = "write"       // 101/ServerKey/ServerInfo write failed or timed out
	hsRead       = "read"        // ClientInfo not received in time or connection closed
	hsFirstFrame = "first_frame" // first frame was not ClientInfo or had a bad length
	hsClientInfo = "client_info" // box did not open or JSON invalid
	hsAdmission  = "admission"   // admission hook refused the client
	hsClosed     = "closed"      // server closing
)

var handshakeReasons = []string{hsWrite, hsRead, hsFirstFrame, hsClientInfo, hsAdmission, hsClosed}

// close reasons for established connections (xderp_connections_closed_total{reason}).
const (
	crEOF          = "eof"            // client closed or the read failed
	crProtocol     = "protocol_error" // malformed, oversized or unauthorised frame
	crWriteError   = "write_error"    // a write failed (including its deadline)
	crClosePeer    = "close_peer"     // a mesh peer sent ClosePeer for this key
	crServerClose  = "server_close"   // Server.Close
	crCtrlOverflow = "ctrl_overflow"  // control queue overflow (watcher far behind)
)

var closeReasons = []string{crEOF, crProtocol, crWriteError, crClosePeer, crServerClose, crCtrlOverflow}

type serverMetrics struct {
	accepts               *metrics.Counter
	curConns              *metrics.Gauge
	curHome               *metrics.Gauge
	curNotIdeal           *metrics.Gauge
	dupKeys               *metrics.Gauge
	dupConns              *metrics.Gauge
	dupConnsTotal         *metrics.Counter
	watchers              *metrics.Gauge
	bytesRecv             *metrics.Counter
	packetsRecv           *metrics.Counter
	packetsRecvKind       [2]*metrics.Counter
	bytesSent             *metrics.Counter
	packetsSent           *metrics.Counter
	unknownFrames         *metrics.Counter
	homeMovesIn           *metrics.Counter
	homeMovesOut          *metrics.Counter
	gotPing               *metrics.Counter
	sentPong              *metrics.Counter
	peerGoneDisconnected  *metrics.Counter
	peerGoneNotHere       *metrics.Counter
	forwardedOut          *metrics.Counter
	forwardedIn           *metrics.Counter
	multiFwdCreated       *metrics.Counter
	multiFwdDeleted       *metrics.Counter
	fwdDeleteOther        *metrics.Counter
	writeTimeouts         *metrics.Counter
	packetsDropped        [numDropReasons][2]*metrics.Counter
	bytesDropped          [numDropReasons][2]*metrics.Counter
	avgQueueMillis        atomicFloat
	handshakeErrors       map[string]*metrics.Counter
	closed                map[string]*metrics.Counter
	forwardErrors         *metrics.Counter
	writeFlushes          *metrics.Counter
	writeFrames           *metrics.Counter
	writerStarts          *metrics.Counter
	writersActive         *metrics.Gauge
	websocketAccepts      *metrics.Counter
	inlineWrites          *metrics.Counter
	queueWaits            *metrics.Counter
	rateLimitWaits        *metrics.Counter // exported only with Options.RateLimit
	queueWaitTimeouts     *metrics.Counter
	readSyscalls          *metrics.Counter
	handshakesInProgress  *metrics.Gauge
	restartingFrames      *metrics.Counter
	healthFrames          *metrics.Counter
	pingsIgnored          *metrics.Counter
	privilegedRejected    *metrics.Counter
	keepAlives            *metrics.Counter
	controlQueueOverflows *metrics.Counter
	bufferedWriteFrames   *metrics.Histogram
	meshUpdateBatch       *metrics.Histogram                    // presence frames per batch a mesh watcher's writer takes
	meshUpdateLoops       *metrics.Histogram                    // such batches per drain
	rtt                   [len(rttBuckets) + 1]*metrics.Counter // by rttBucket
	rttNonTCP             *metrics.Counter
	rttErrors             *metrics.Counter
}

func (s *Server) registerMetrics(r *metrics.Registry) {
	m := &s.m
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	sys0 := float64(ms.Sys)
	m.rateLimitWaits = new(metrics.Counter)
	if s.opts.RateLimit != nil {
		// derper's names, exported only when a limit is configured.
		m.rateLimitWaits = r.Counter("derp_rate_limit_per_client_waited", "Frames whose reader waited for its connection's receive limit (-rate-config)")
		r.Register("derp_rate_limit_per_client_bytes_per_second", "Per-client receive limit in bytes per second (0: none)", metrics.KindUntyped, nil, func() []metrics.Sample {
			return []metrics.Sample{{Value: float64(s.CurrentRateLimit().BytesPerSec)}}
		})
		r.Register("derp_rate_limit_per_client_burst_bytes", "Per-client receive limit's bucket size in bytes", metrics.KindUntyped, nil, func() []metrics.Sample {
			return []metrics.Sample{{Value: float64(s.CurrentRateLimit().BurstBytes)}}
		})
	}
	r.GaugeFunc("derp_memstats_sys0", "Go runtime memory obtained from the OS when the DERP server started, bytes", func() float64 { return sys0 })
	m.watchers = r.Gauge("derp_watchers", "Mesh watchers (WatchConns subscribers) currently subscribed")
	m.curConns = r.Gauge("derp_current_connections", "Client connections currently registered, duplicates included")
	m.curHome = r.Gauge("derp_current_home_connections", "Connections whose last NotePreferred said this server is home")
	m.curNotIdeal = r.Gauge("derp_current_notideal_connections", "Connections that sent an Ideal-Node header (not on their preferred node)")
	r.GaugeFunc("derp_clients_total", "Distinct node keys reachable in the region (local or via a mesh forwarder)", func() float64 {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return float64(len(s.keys))
	})
	r.GaugeFunc("derp_clients_local", "Distinct node keys connected to this server", func() float64 {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return float64(s.numLocalKeys)
	})
	r.GaugeFunc("derp_clients_remote", "Distinct node keys reachable only through a mesh forwarder", func() float64 {
		s.mu.RLock()
		defer s.mu.RUnlock()
		return float64(len(s.keys) - s.numLocalKeys)
	})
	m.dupKeys = r.Gauge("derp_current_dup_client_keys", "Node keys with two or more connections")
	m.dupConns = r.Gauge("derp_current_dup_client_conns", "Connections belonging to keys with two or more connections")
	m.dupConnsTotal = r.Counter("derp_total_dup_client_conns", "Connections registered while their key already had one")
	m.accepts = r.Counter("derp_accepts", "Connections upgraded to DERP (handshake started)")
	m.websocketAccepts = r.Counter("derp_websocket_accepts", "Connections upgraded with WebSocket (subprotocol derp)")
	m.bytesRecv = r.Counter("derp_bytes_received", "Packet bytes received in SendPacket frames")
	m.packetsRecv = r.Counter("derp_packets_received", "Packets received in SendPacket frames")
	kinds := r.CounterVec("derp_packets_received_kind", "Packets received in SendPacket frames by kind (disco or other)", "kind")
	for k := range 2 {
		m.packetsRecvKind[k] = kinds.With(kindNames[k])
	}
	m.bytesSent = r.Counter("derp_bytes_sent", "Packet bytes written in RecvPacket frames")
	m.packetsSent = r.Counter("derp_packets_sent", "Packets written in RecvPacket frames")
	m.unknownFrames = r.Counter("derp_unknown_frames", "Frames of unknown or client-irrelevant type skipped")
	m.homeMovesIn = r.Counter("derp_home_moves_in", "Connections that made this server their home after their first 5 s")
	m.homeMovesOut = r.Counter("derp_home_moves_out", "Connections that stopped using this server as home after their first 5 s")
	m.gotPing = r.Counter("derp_got_ping", "Ping frames received")
	m.sentPong = r.Counter("derp_sent_pong", "Pong frames written")
	m.peerGoneDisconnected = r.Counter("derp_peer_gone_disconnected_frames", "PeerGone frames written with reason disconnected")
	m.peerGoneNotHere = r.Counter("derp_peer_gone_not_here_frames", "PeerGone frames written with reason not-here")
	m.forwardedOut = r.Counter("derp_packets_forwarded_out", "Packets handed to a mesh forwarder")
	m.forwardedIn = r.Counter("derp_packets_forwarded_in", "ForwardPacket frames received from mesh peers")
	m.multiFwdCreated = r.Counter("derp_multiforwarder_created", "Times a key became reachable through a second forwarder")
	m.multiFwdDeleted = r.Counter("derp_multiforwarder_deleted", "Times a key went back to a single forwarder")
	m.fwdDeleteOther = r.Counter("derp_packet_forwarder_delete_other_value", "RemovePacketForwarder calls for a forwarder not registered for the key")
	m.writeTimeouts = r.Counter("derp_sclient_write_timeouts", "Connections closed because a write missed its deadline")
	pd := r.CounterVec("derp_packets_dropped", "DERP packets dropped by reason and by kind", "reason", "kind")
	bd := r.CounterVec("derp_bytes_dropped", "DERP bytes dropped by reason and by kind", "reason", "kind")
	for i := range numDropReasons {
		for k := range 2 {
			m.packetsDropped[i][k] = pd.With(dropReasonNames[i], kindNames[k])
			m.bytesDropped[i][k] = bd.With(dropReasonNames[i], kindNames[k])
		}
	}
	m.bufferedWriteFrames = r.Histogram("derp_buffered_write_frames", "Frames per write to client connections (a writer goroutine's batched write, or a packet written inline, one frame)",
		0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 50, 100)
	// derper's names and buckets for its mesh watchers' presence updates.
	m.meshUpdateBatch = r.Histogram("derp_mesh_update_batch_size", "PeerPresent/PeerGone frames in one batch a mesh watcher's writer takes from its queue",
		0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
	m.meshUpdateLoops = r.Histogram("derp_mesh_update_loop_count", "Batches with presence frames a mesh watcher's writer takes before its queue has none",
		0, 1, 2, 5, 10, 20, 50, 100)
	rtt := r.CounterVec("derp_tcp_rtt", "TCP round-trip time samples of established connections (every 10 s by default), by upper bound (non-cumulative); non-tcp: connections without a TCP socket (once each); error: failed reads", "le")
	for i, b := range rttBuckets {
		m.rtt[i] = rtt.With(b.label)
	}
	m.rtt[len(rttBuckets)] = rtt.With("inf")
	m.rttNonTCP = rtt.With("non-tcp")
	m.rttErrors = rtt.With("error")
	r.Register("derp_average_queue_duration_ms", "Moving average (alpha 0.1) of the time a packet waits in a send queue, sampled once per write batch, ms", metrics.KindUntyped, nil, func() []metrics.Sample {
		return []metrics.Sample{{Value: m.avgQueueMillis.load()}}
	})

	he := r.CounterVec("xderp_handshake_errors_total", "DERP handshakes that failed, by reason", "reason")
	m.handshakeErrors = make(map[string]*metrics.Counter)
	for _, h := range handshakeReasons {
		m.handshakeErrors[h] = he.With(h)
	}
	cl := r.CounterVec("xderp_connections_closed_total", "Established DERP connections closed, by reason", "reason")
	m.closed = make(map[string]*metrics.Counter)
	for _, c := range closeReasons {
		m.closed[c] = cl.With(c)
	}
	m.handshakesInProgress = r.Gauge("xderp_handshakes_in_progress", "Connections upgraded but not yet through the DERP handshake")
	m.forwardErrors = r.Counter("xderp_packets_forward_errors_total", "Packets a mesh forwarder failed to take (not counted as drops, as in derper)")
	m.writeFlushes = r.Counter("xderp_write_flushes_total", "Batched writes (one per flush) to client connections")
	m.writeFrames = r.Counter("xderp_write_frames_total", "Frames written to client connections; divided by flushes gives the batch size")
	m.writerStarts = r.Counter("xderp_writer_starts_total", "Writer goroutines started (writers exit after an idle period)")
	m.writersActive = r.Gauge("xderp_writers_active", "Writer goroutines currently running (idle connections have none)")
	m.queueWaits = r.Counter("xderp_queue_full_waits_total", "Times a sender waited for a full destination queue and the writer took it in time (back-pressure)")
	m.queueWaitTimeouts = r.Counter("xderp_queue_full_wait_timeouts_total", "Times a sender's wait for a full destination queue timed out (queue marked stalled)")
	m.inlineWrites = r.Counter("xderp_inline_writes_total", "Packets written directly by the sender's reader because the destination had nothing queued and no writer running")
	m.readSyscalls = r.Counter("xderp_read_calls_total", "Reads from client connections after the handshake")
	m.restartingFrames = r.Counter("xderp_restarting_frames_total", "Restarting frames written (server shutdown)")
	m.healthFrames = r.Counter("xderp_health_frames_total", "Health frames written")
	m.pingsIgnored = r.Counter("xderp_pings_ignored_total", "Pings ignored because a Pong was still pending")
	m.privilegedRejected = r.Counter("xderp_privileged_frames_rejected_total", "Mesh-only frames from connections without the mesh key (connection closed)")
	m.keepAlives = r.Counter("xderp_keepalive_frames_total", "KeepAlive frames written")
	m.controlQueueOverflows = r.Counter("xderp_control_queue_overflows_total", "Connections closed because their control-frame queue overflowed")
}

// localStats accumulates per-reader counts and adds them to the shared
// counters in one go, so the hot path does not bounce shared cache lines
// once per packet. Drop counts live behind a pointer that is allocated on
// a reader's first drop: most connections never drop, and an idle
// connection should not carry a table it does not use.
type localStats struct {
	packetsRecv  uint64
	bytesRecv    uint64
	recvKind     [2]uint64
	drops        *dropStats
	forwardedOut uint64
	forwardedIn  uint64
	sentPackets  uint64 // written inline by this reader
	sentBytes    uint64
	frames       int
	dirty        bool
}

// dropStats is a reader's drop counts by reason and kind.
type dropStats struct {
	packets [numDropReasons][2]uint64
	bytes   [numDropReasons][2]uint64
}

func (ls *localStats) drop(r dropReason, disco bool, n int) {
	if ls.drops == nil {
		ls.drops = new(dropStats)
	}
	k := kindOf(disco)
	ls.drops.packets[r][k]++
	ls.drops.bytes[r][k] += uint64(n)
	ls.dirty = true
}

func (ls *localStats) flush(m *serverMetrics) {
	if !ls.dirty {
		return
	}
	if ls.packetsRecv != 0 {
		m.packetsRecv.Add(ls.packetsRecv)
		m.bytesRecv.Add(ls.bytesRecv)
	}
	for k := range 2 {
		if ls.recvKind[k] != 0 {
			m.packetsRecvKind[k].Add(ls.recvKind[k])
		}
	}
	if d := ls.drops; d != nil {
		for r := range numDropReasons {
			for k := range 2 {
				if d.packets[r][k] != 0 {
					m.packetsDropped[r][k].Add(d.packets[r][k])
					m.bytesDropped[r][k].Add(d.bytes[r][k])
				}
			}
		}
		*d = dropStats{} // kept: a reader that dropped once may drop again
	}
	if ls.sentPackets != 0 {
		m.packetsSent.Add(ls.sentPackets)
		m.bytesSent.Add(ls.sentBytes)
		m.inlineWrites.Add(ls.sentPackets)
		m.bufferedWriteFrames.ObserveN(1, ls.sentPackets)
	}
	if ls.forwardedOut != 0 {
		m.forwardedOut.Add(ls.forwardedOut)
	}
	if ls.forwardedIn != 0 {
		m.forwardedIn.Add(ls.forwardedIn)
	}
	*ls = localStats{drops: ls.drops}
}

// recordDrop counts one dropped packet directly in the shared counters
// (used off the reader's hot path).
func (m *serverMetrics) recordDrop(r dropReason, pkt []byte) {
	k := kindOf(derp.LooksLikeDisco(pkt))
	m.packetsDropped[r][k].Inc()
	m.bytesDropped[r][k].Add(uint64(len(pkt)))
}
