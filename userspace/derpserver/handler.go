package derpserver

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/internal/lograte"
)

// ServeHTTP is the /derp handler. A request with "Upgrade: DERP" (any
// case) is hijacked: the server answers 101 (nothing at all with
// "Derp-Fast-Start: 1"), sends its ServerKey frame and runs the handshake;
// then a reader goroutine takes over the connection and ServeHTTP returns,
// releasing net/http's buffers. Bytes the client sent after its request
// headers are kept as the start of the DERP stream. "Upgrade: websocket"
// offering the "derp" subprotocol gets an RFC 6455 upgrade with the DERP
// stream in binary messages; without that subprotocol it is treated as a
// raw DERP upgrade (as derper does). Without an upgrade header the answer
// is 426; after Close, 503.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	up := strings.ToLower(r.Header.Get("Upgrade"))
	if up != "derp" && up != "websocket" {
		http.Error(w, "DERP requires connection upgrade", http.StatusUpgradeRequired)
		return
	}
	if s.closed.Load() {
		http.Error(w, "DERP server is shutting down", http.StatusServiceUnavailable)
		return
	}
	if up == "websocket" && offersDERPSubprotocol(r) {
		s.serveWebSocket(w, r)
		return
	}
	// Upgrade: websocket without the derp subprotocol is treated as a
	// raw DERP upgrade, as the reference server does for old clients.
	nc, brw, ok := s.hijack(w, r)
	if !ok {
		return
	}
	fastStart := r.Header.Get(derp.HeaderFastStart) == "1"
	notIdeal := r.Header.Get(derp.HeaderIdealNode) != ""
	s.serveConn(r.Context(), nc, brw.Reader, fastStart, notIdeal, r.RemoteAddr, tlsVersionOf(r))
}

// tlsVersionOf returns the TLS version r arrived over, or 0.
func tlsVersionOf(r *http.Request) uint16 {
	if r.TLS == nil {
		return 0
	}
	return r.TLS.Version
}

// hijack takes the connection over from net/http for an upgrade and counts
// the accept; on failure it has answered or logged and reports false.
func (s *Server) hijack(w http.ResponseWriter, r *http.Request) (net.Conn, *bufio.ReadWriter, bool) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		http.Error(w, "connection cannot be upgraded", http.StatusInternalServerError)
		return nil, nil, false
	}
	nc, brw, err := hj.Hijack()
	if err != nil {
		s.log.Debug("derp: hijack failed", "remote", r.RemoteAddr, "err", err)
		return nil, nil, false
	}
	s.m.accepts.Inc()
	return nc, brw, true
}

func offersDERPSubprotocol(r *http.Request) bool {
	for _, v := range r.Header.Values("Sec-Websocket-Protocol") {
		for p := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(p), "derp") {
				return true
			}
		}
	}
	return false
}

// handshakeError carries the metric reason of a failed handshake.
type handshakeError struct {
	reason string
	err    error
}

func (e *handshakeError) Error() string { return e.reason + ": " + e.err.Error() }
func (e *handshakeError) Unwrap() error { return e.err }

func hsErr(reason string, format string, args ...any) error {
	return &handshakeError{reason: reason, err: fmt.Errorf(format, args...)}
}

// serveConn runs the handshake on a hijacked connection and, on success,
// hands it to a new reader goroutine. br holds bytes already read past the
// HTTP request; tlsVersion is the TLS version the request came over (0 if
// none), from net/http's state of the connection.
func (s *Server) serveConn(ctx context.Context, nc net.Conn, br *bufio.Reader, fastStart, notIdeal bool, remoteAddr string, tlsVersion uint16) {
	if !s.trackHandshake(nc, true) {
		s.m.handshakeErrors[hsClosed].Inc()
		nc.Close()
		return
	}
	c, initial, serverInfo, err := s.handshake(ctx, nc, br, fastStart, notIdeal, remoteAddr)
	s.trackHandshake(nc, false)
	if err != nil {
		reason := hsRead
		var he *handshakeError
		if errors.As(err, &he) {
			reason = he.reason
		}
		if s.closed.Load() {
			reason = hsClosed
		}
		s.m.handshakeErrors[reason].Inc()
		if reason == hsAdmission {
			if ok, suppressed := s.connLog.Allow(time.Now()); ok {
				s.log.Info("derp: client refused", lograte.Attrs(suppressed, "remote", remoteAddr, "err", err)...)
			}
		} else {
			s.log.Debug("derp: handshake failed", "remote", remoteAddr, "err", err)
		}
		nc.Close()
		return
	}
	// Register with the connection set first so Close sees it.
	s.connsMu.Lock()
	if s.closed.Load() {
		s.connsMu.Unlock()
		s.m.handshakeErrors[hsClosed].Inc()
		nc.Close()
		return
	}
	s.clients[c] = struct{}{}
	s.noteRTTSocketLocked(c)
	s.noteTLSVersion(c, tlsVersion)
	s.wg.Add(1)
	s.connsMu.Unlock()
	// Register before sending ServerInfo, so the client is reachable by the
	// time it learns it is connected. Until ServerInfo is written, the
	// connection counts as having a running writer: whatever others queue
	// waits, so nothing overtakes ServerInfo, and no writer goroutine is
	// started unless something was queued meanwhile.
	s.register(c) // c.writerRunning was set when c was made
	nc.SetWriteDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	_, werr := nc.Write(serverInfo)
	nc.SetWriteDeadline(time.Time{})
	c.mu.Lock()
	c.writerRunning = false
	start := false
	if werr == nil && (c.data.n > 0 || c.disco.n > 0 || len(c.ctrl) > 0 || c.closeAfter) {
		start, _ = c.kickLocked()
	}
	c.keepAlive = time.AfterFunc(s.keepAliveInterval(), c.onKeepAlive)
	c.mu.Unlock()
	if werr != nil {
		// The reader finds the connection closed and unregisters it.
		s.m.handshakeErrors[hsWrite].Inc()
		s.log.Debug("derp: handshake failed", "remote", remoteAddr, "err", werr)
		nc.Close()
	}
	c.startOrWake(start, false)
	s.log.Debug("derp: client connected", "remote", remoteAddr, "key", c.key.ShortString(), "mesh", c.canMesh)
	cr := newConnReader(nc, initial)
	cr.onPark = func() { c.stats.flush(&s.m) }
	go c.readLoop(cr)
}

func (s *Server) handshake(ctx context.Context, nc net.Conn, br *bufio.Reader, fastStart, notIdeal bool, remoteAddr string) (c *sclient, initial, serverInfo []byte, err error) {
	timeout := s.opts.HandshakeTimeout
	nc.SetWriteDeadline(time.Now().Add(timeout))
	hello := s.upgradeResp
	if fastStart {
		hello = s.serverKey
	}
	if _, err := nc.Write(hello); err != nil {
		return nil, nil, nil, hsErr(hsWrite, "write server key: %w", err)
	}
	nc.SetReadDeadline(time.Now().Add(timeout))
	t, n, err := derp.ReadFrameHeader(br)
	if err != nil {
		return nil, nil, nil, hsErr(hsRead, "read client info: %w", err)
	}
	if t != derp.FrameClientInfo {
		return nil, nil, nil, hsErr(hsFirstFrame, "first frame is %v, want ClientInfo", t)
	}
	if n < derp.MinClientInfoLen || n > derp.MaxClientInfoLen {
		return nil, nil, nil, hsErr(hsFirstFrame, "ClientInfo of %d bytes", n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(br, payload); err != nil {
		return nil, nil, nil, hsErr(hsRead, "read client info: %w", err)
	}
	key, info, err := derp.OpenClientInfo(s.priv, payload)
	if err != nil {
		return nil, nil, nil, hsErr(hsClientInfo, "%w", err)
	}
	remote := parseAddrPort(nc, remoteAddr)
	mesh := s.isMeshPeer(info)
	if !mesh && s.opts.Admit != nil {
		actx, cancel := context.WithTimeout(ctx, timeout)
		err := s.opts.Admit(actx, key, info, remote)
		cancel()
		if err != nil {
			return nil, nil, nil, hsErr(hsAdmission, "client %s: %w", key.ShortString(), err)
		}
	}
	frame, err := derp.AppendServerInfo(nil, s.priv, key, &derp.ServerInfo{Version: derp.ProtocolVersion})
	if err != nil {
		return nil, nil, nil, hsErr(hsWrite, "%w", err)
	}
	nc.SetDeadline(time.Time{})

	if k := br.Buffered(); k > 0 {
		b, _ := br.Peek(k)
		initial = b // copied by newConnReader before br is dropped
	}
	c = &sclient{
		s:           s,
		conn:        nc,
		key:         key,
		remote:      remote,
		canMesh:     mesh,
		notIdeal:    notIdeal,
		connNum:     s.connNum.Add(1),
		connectedAt: monoNow(),
		wake:        make(chan struct{}, 1),
		deadlineSet: noDeadline,
		// Until serveConn has written ServerInfo (see there).
		writerRunning: true,
		rc:            rawConnOf(nc),
		tlsw:          tlsProbeOf(nc),
		tlsSlot:       -1,
	}
	c.flags = presentFlags(mesh, info.IsProber, notIdeal)
	c.notHere.tokens = notHereBurst
	return c, initial, frame, nil
}

func presentFlags(mesh, prober, notIdeal bool) derp.PeerPresentFlags {
	var f derp.PeerPresentFlags
	if mesh {
		f |= derp.PeerPresentIsMeshPeer
	}
	if prober {
		f |= derp.PeerPresentIsProber
	}
	if notIdeal {
		f |= derp.PeerPresentNotIdeal
	}
	if f == 0 {
		f = derp.PeerPresentIsRegular
	}
	return f
}

func parseAddrPort(nc net.Conn, fallback string) netip.AddrPort {
	if ta, ok := nc.RemoteAddr().(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(fallback)
	return ap
}
