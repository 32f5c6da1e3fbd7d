package derpserver

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"
)

func timeNowPlus(d time.Duration) time.Time { return time.Now().Add(d) }

// DERP over WebSocket (derp-protocol.md §3.5): an RFC 6455 server with
// subprotocol "derp", carrying the DERP byte stream in binary messages
// whose boundaries mean nothing. Messages are streamed frame by frame, so
// there is no message size limit and no per-message buffering.

const wsGUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

// WebSocket opcodes and close codes used here.
const (
	wsContinuation = 0x0
	wsText         = 0x1
	wsBinary       = 0x2
	wsClose        = 0x8
	wsPing         = 0x9
	wsPong         = 0xa

	wsCloseNormal      = 1000
	wsCloseGoingAway   = 1001
	wsCloseProtocol    = 1002
	wsCloseUnsupported = 1003
	wsCloseTooBig      = 1009

	wsMaxFrame = 1 << 30 // a single frame longer than this is refused
)

var errWSClosed = errors.New("websocket closed by peer")

func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h.Values(name) {
		for t := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(t), token) {
				return true
			}
		}
	}
	return false
}

func wsAccept(key string) string {
	h := sha1.Sum([]byte(key + wsGUID))
	return base64.StdEncoding.EncodeToString(h[:])
}

// serveWebSocket upgrades a request that offers the "derp" subprotocol.
func (s *Server) serveWebSocket(w http.ResponseWriter, r *http.Request) {
	key := r.Header.Get("Sec-Websocket-Key")
	if r.Method != http.MethodGet || r.Header.Get("Sec-Websocket-Version") != "13" || !headerHasToken(r.Header, "Connection", "upgrade") {
		w.Header().Set("Sec-WebSocket-Version", "13")
		http.Error(w, "bad WebSocket upgrade request: want GET, Connection: Upgrade, Sec-WebSocket-Version: 13", http.StatusBadRequest)
		return
	}
	if raw, err := base64.StdEncoding.DecodeString(key); err != nil || len(raw) != 16 {
		http.Error(w, "bad Sec-WebSocket-Key", http.StatusBadRequest)
		return
	}
	nc, brw, ok := s.hijack(w, r)
	if !ok {
		return
	}
	s.m.websocketAccepts.Inc()
	resp := "HTTP/1.1 101 Switching Protocols\r\n" +
		"Upgrade: websocket\r\n" +
		"Connection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + wsAccept(key) + "\r\n" +
		"Sec-WebSocket-Protocol: derp\r\n\r\n"
	hsDeadline := timeNowPlus(s.opts.HandshakeTimeout)
	nc.SetWriteDeadline(hsDeadline)
	if _, err := io.WriteString(nc, resp); err != nil {
		s.m.handshakeErrors[hsWrite].Inc()
		nc.Close()
		return
	}
	ws := &wsConn{Conn: nc, br: brw.Reader, wdl: hsDeadline, controlTimeout: s.wsControlTimeout}
	notIdeal := r.Header.Get("Ideal-Node") != ""
	// The DERP handshake reads through a small reader on top of the
	// WebSocket stream; what it buffers past ClientInfo is handed on.
	// fastStart=true: the 101 is already written; only the ServerKey frame
	// goes into the stream.
	s.serveConn(r.Context(), ws, bufio.NewReaderSize(ws, 512), true, notIdeal, r.RemoteAddr, tlsVersionOf(r))
}

// wsConn is a net.Conn carrying a byte stream in WebSocket binary
// messages. Reads happen on one goroutine; writes (data from the writer,
// Pong/Close answers from the reader) are serialised by wmu.
type wsConn struct {
	net.Conn
	br *bufio.Reader

	// Reader state.
	remaining uint64
	mask      [4]byte
	maskPos   int
	inMessage bool // a binary message is open (continuations allowed)
	readErr   error

	wmu       sync.Mutex
	hdr       [14]byte
	closeSent bool
	// wdl is the write deadline the connection's user (its writer) set.
	// A Pong answered from the reader's goroutine gets controlTimeout of
	// its own and then puts wdl back, so the writer never inherits it.
	wdl            time.Time
	controlTimeout time.Duration
}

// SetWriteDeadline records d as the user's write deadline and applies it.
func (c *wsConn) SetWriteDeadline(d time.Time) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wdl = d
	return c.Conn.SetWriteDeadline(d)
}

// SetDeadline is SetWriteDeadline plus the read deadline.
func (c *wsConn) SetDeadline(d time.Time) error {
	if err := c.Conn.SetReadDeadline(d); err != nil {
		return err
	}
	return c.SetWriteDeadline(d)
}

// Read returns payload bytes of binary messages, answering control frames
// on the way.
func (c *wsConn) Read(p []byte) (int, error) {
	if c.readErr != nil {
		return 0, c.readErr
	}
	for c.remaining == 0 {
		if err := c.readFrameHeader(); err != nil {
			c.readErr = err
			return 0, err
		}
	}
	if len(p) == 0 {
		return 0, nil
	}
	n := len(p)
	if uint64(n) > c.remaining {
		n = int(c.remaining)
	}
	n, err := c.br.Read(p[:n])
	for i := range n {
		p[i] ^= c.mask[c.maskPos&3]
		c.maskPos++
	}
	c.remaining -= uint64(n)
	if err == io.EOF && c.remaining > 0 {
		err = io.ErrUnexpectedEOF
	}
	if err != nil {
		c.readErr = err
	}
	return n, err
}

// readFrameHeader reads frame headers until a data frame with payload is
// next (or an error), handling control frames.
func (c *wsConn) readFrameHeader() error {
	var h [2]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return err
	}
	fin := h[0]&0x80 != 0
	if h[0]&0x70 != 0 {
		return c.fail(wsCloseProtocol, "reserved bits set (no extension negotiated)")
	}
	op := h[0] & 0x0f
	if h[1]&0x80 == 0 {
		return c.fail(wsCloseProtocol, "unmasked client frame")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var b [2]byte
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return err
		}
		n = uint64(binary.BigEndian.Uint16(b[:]))
	case 127:
		var b [8]byte
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return err
		}
		n = binary.BigEndian.Uint64(b[:])
	}
	if _, err := io.ReadFull(c.br, c.mask[:]); err != nil {
		return err
	}
	c.maskPos = 0
	switch op {
	case wsBinary, wsContinuation:
		if op == wsBinary && c.inMessage {
			return c.fail(wsCloseProtocol, "new message inside a fragmented one")
		}
		if op == wsContinuation && !c.inMessage {
			return c.fail(wsCloseProtocol, "continuation without a message")
		}
		if n > wsMaxFrame {
			return c.fail(wsCloseTooBig, "frame too large")
		}
		c.inMessage = !fin
		c.remaining = n
		return nil
	case wsText:
		return c.fail(wsCloseUnsupported, "text messages are not DERP")
	case wsPing, wsPong, wsClose:
		if !fin || n > 125 {
			return c.fail(wsCloseProtocol, "bad control frame")
		}
		var body [125]byte
		b := body[:n]
		if _, err := io.ReadFull(c.br, b); err != nil {
			return err
		}
		for i := range b {
			b[i] ^= c.mask[i&3]
		}
		switch op {
		case wsPing:
			if err := c.writePong(b); err != nil {
				return err
			}
		case wsClose:
			code := uint16(wsCloseNormal)
			if len(b) >= 2 {
				code = binary.BigEndian.Uint16(b)
			}
			c.sendClose(code, "")
			return errWSClosed
		}
		return nil
	default:
		return c.fail(wsCloseProtocol, fmt.Sprintf("unknown opcode %#x", op))
	}
}

// fail sends a Close frame and returns an error for the reader.
func (c *wsConn) fail(code uint16, reason string) error {
	c.sendClose(code, reason)
	return fmt.Errorf("%w: websocket: %s", errProtocol, reason)
}

func (c *wsConn) sendClose(code uint16, reason string) {
	c.wmu.Lock()
	sent := c.closeSent
	c.closeSent = true
	c.wmu.Unlock()
	if sent {
		return
	}
	b := binary.BigEndian.AppendUint16(nil, code)
	b = append(b, reason...)
	c.writeFrameForce(wsClose, b)
}

// wsMaxMessage is the largest binary message the server sends. Tailscale's
// WebSocket client (coder/websocket with its default read limit) refuses
// messages over 32 KiB, so longer writes are split; message boundaries
// carry no meaning in the DERP stream.
const wsMaxMessage = 32 << 10

// Write sends p as binary messages of at most wsMaxMessage bytes, in one
// vectored write.
func (c *wsConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closeSent {
		return 0, net.ErrClosed
	}
	if len(p) <= wsMaxMessage {
		if err := c.writeLocked(wsBinary, p); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	k := (len(p) + wsMaxMessage - 1) / wsMaxMessage
	hdrs := make([]byte, 0, 4*k)
	bufs := make(net.Buffers, 0, 2*k)
	for off := 0; off < len(p); off += wsMaxMessage {
		piece := p[off:min(off+wsMaxMessage, len(p))]
		start := len(hdrs)
		hdrs = append(hdrs, 0x80|wsBinary)
		if len(piece) <= 125 {
			hdrs = append(hdrs, byte(len(piece)))
		} else {
			hdrs = append(hdrs, 126)
			hdrs = binary.BigEndian.AppendUint16(hdrs, uint16(len(piece)))
		}
		bufs = append(bufs, hdrs[start:len(hdrs):len(hdrs)], piece)
	}
	if _, err := bufs.WriteTo(c.Conn); err != nil {
		return 0, err
	}
	return len(p), nil
}

// writePong answers a Ping, from the reader's goroutine, within
// controlTimeout, and then restores the writer's deadline.
func (c *wsConn) writePong(p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closeSent {
		return net.ErrClosed
	}
	c.Conn.SetWriteDeadline(timeNowPlus(c.controlTimeout))
	err := c.writeLocked(wsPong, p)
	c.Conn.SetWriteDeadline(c.wdl)
	return err
}

func (c *wsConn) writeFrameForce(op byte, p []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.Conn.SetWriteDeadline(timeNowPlus(c.controlTimeout))
	c.writeLocked(op, p)
}

func (c *wsConn) writeLocked(op byte, p []byte) error {
	h := c.hdr[:0]
	h = append(h, 0x80|op)
	switch n := len(p); {
	case n <= 125:
		h = append(h, byte(n))
	case n <= 0xffff:
		h = append(h, 126)
		h = binary.BigEndian.AppendUint16(h, uint16(n))
	default:
		h = append(h, 127)
		h = binary.BigEndian.AppendUint64(h, uint64(n))
	}
	bufs := net.Buffers{h, p}
	_, err := bufs.WriteTo(c.Conn)
	return err
}

// CloseWrite sends a Close frame (going away) and half-closes the socket
// if it can, so a client reads everything written before.
func (c *wsConn) CloseWrite() error {
	c.sendClose(wsCloseGoingAway, "server shutting down")
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
