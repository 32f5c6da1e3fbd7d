// Package derp owns the DERP wire format (protocol version 2) as spoken by
// Tailscale clients: node and server keys, the derper-compatible key file,
// frame types and framing, the NaCl-boxed ClientInfo/ServerInfo handshake
// documents, and encoders/parsers for every frame a v2 server sends or
// receives.
//
// It is a pure codec: no sockets, no goroutines, no timers. Encoders append
// to a caller-supplied slice so hot paths can reuse buffers; parsers take a
// frame payload and never retain it. The one exception to "no I/O" is
// LoadOrCreateKeyFile, which reads or atomically writes the key file.
//
// The wire specification is docs/derp-protocol.md.
package derp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"
	"time"
)

// Protocol constants (derp-protocol.md §7).
const (
	// ProtocolVersion is the DERP protocol version this package speaks.
	ProtocolVersion = 2

	// KeyLen is the length of a node or server public key.
	KeyLen = 32
	// NonceLen is the length of the random nonce prefixing a box.
	NonceLen = 24
	// BoxOverhead is the number of bytes a box adds to its plaintext
	// (nonce plus Poly1305 tag).
	BoxOverhead = NonceLen + 16

	// FrameHeaderLen is the length of a frame header (type + length).
	FrameHeaderLen = 5

	// MaxPacketSize is the largest packet a SendPacket, RecvPacket or
	// ForwardPacket frame may carry.
	MaxPacketSize = 64 << 10
	// MaxFrameSize is the largest frame a Tailscale client accepts; it is
	// also the default limit of FrameReader.
	MaxFrameSize = 1 << 20

	// MinClientInfoLen and MaxClientInfoLen bound a ClientInfo payload as
	// the reference server does.
	MinClientInfoLen = KeyLen + NonceLen
	MaxClientInfoLen = 256 << 10
	// MinServerInfoLen and MaxServerInfoLen bound a ServerInfo payload as
	// the reference client does.
	MinServerInfoLen = NonceLen
	MaxServerInfoLen = NonceLen + 1<<20
	// MaxServerKeyLen is the largest ServerKey payload a client accepts.
	MaxServerKeyLen = 1024

	// PingLen is the length of a Ping/Pong payload; MaxPingLen is the
	// largest Ping payload a server accepts (only PingLen bytes are echoed).
	PingLen    = 8
	MaxPingLen = 1000

	// PeerPresentLen is the length of a PeerPresent payload as sent by
	// current servers (key, 16-byte IP, port, flags).
	PeerPresentLen = KeyLen + 16 + 2 + 1

	// KeepAliveInterval is the base interval between server KeepAlive
	// frames; servers add a per-connection jitter.
	KeepAliveInterval = 60 * time.Second

	// Magic starts every ServerKey payload: "DERP" and the key emoji.
	Magic = "DERP\xf0\x9f\x94\x91"

	// DiscoMagic starts every Tailscale disco message ("TS" and the speech
	// balloon emoji). DiscoMinLen is the smallest packet that can be one.
	DiscoMagic  = "TS\xf0\x9f\x92\xac"
	DiscoMinLen = len(DiscoMagic) + KeyLen + NonceLen
)

// Header names used by the HTTP upgrade.
const (
	HeaderVersion   = "Derp-Version"
	HeaderPublicKey = "Derp-Public-Key"
	HeaderFastStart = "Derp-Fast-Start"
	HeaderIdealNode = "Ideal-Node"
)

// FrameType is the first byte of a frame.
type FrameType byte

// Frame types of protocol version 2 (derp-protocol.md §5).
const (
	FrameServerKey     FrameType = 0x01
	FrameClientInfo    FrameType = 0x02
	FrameServerInfo    FrameType = 0x03
	FrameSendPacket    FrameType = 0x04
	FrameRecvPacket    FrameType = 0x05
	FrameKeepAlive     FrameType = 0x06
	FrameNotePreferred FrameType = 0x07
	FramePeerGone      FrameType = 0x08
	FramePeerPresent   FrameType = 0x09
	FrameForwardPacket FrameType = 0x0a
	FrameWatchConns    FrameType = 0x10
	FrameClosePeer     FrameType = 0x11
	FramePing          FrameType = 0x12
	FramePong          FrameType = 0x13
	FrameHealth        FrameType = 0x14
	FrameRestarting    FrameType = 0x15
)

var frameNames = map[FrameType]string{
	FrameServerKey:     "ServerKey",
	FrameClientInfo:    "ClientInfo",
	FrameServerInfo:    "ServerInfo",
	FrameSendPacket:    "SendPacket",
	FrameRecvPacket:    "RecvPacket",
	FrameKeepAlive:     "KeepAlive",
	FrameNotePreferred: "NotePreferred",
	FramePeerGone:      "PeerGone",
	FramePeerPresent:   "PeerPresent",
	FrameForwardPacket: "ForwardPacket",
	FrameWatchConns:    "WatchConns",
	FrameClosePeer:     "ClosePeer",
	FramePing:          "Ping",
	FramePong:          "Pong",
	FrameHealth:        "Health",
	FrameRestarting:    "Restarting",
}

// String returns the frame type's name, or its hex value if unassigned.
func (t FrameType) String() string {
	if n, ok := frameNames[t]; ok {
		return n
	}
	return "0x" + strconv.FormatUint(uint64(t), 16)
}

// PeerGoneReason is the optional last byte of a PeerGone frame.
type PeerGoneReason byte

// PeerGone reasons.
const (
	PeerGoneDisconnected  PeerGoneReason = 0x00 // peer disconnected from the region
	PeerGoneNotHere       PeerGoneReason = 0x01 // destination of a disco packet unknown
	PeerGoneMeshConnBroke PeerGoneReason = 0xf0 // never on the wire; internal to mesh clients
)

// PeerPresentFlags is the flags byte of a PeerPresent frame.
type PeerPresentFlags byte

// PeerPresent flag bits.
const (
	PeerPresentIsRegular  PeerPresentFlags = 0x01 // none of the other bits apply
	PeerPresentIsMeshPeer PeerPresentFlags = 0x02 // connection holds the mesh key
	PeerPresentIsProber   PeerPresentFlags = 0x04 // client declared IsProber
	PeerPresentNotIdeal   PeerPresentFlags = 0x08 // client sent an Ideal-Node header
)

// Sentinel errors callers branch on.
var (
	// ErrFrameTooLarge reports a frame whose announced length exceeds the
	// reader's limit. The stream cannot be resynchronised: close it.
	ErrFrameTooLarge = errors.New("derp: frame too large")
	// ErrMalformed reports a frame payload that violates the protocol.
	ErrMalformed = errors.New("derp: malformed frame")
	// ErrBadMagic reports a ServerKey frame without the DERP magic.
	ErrBadMagic = errors.New("derp: bad ServerKey magic")
	// ErrBoxOpen reports a box that fails authentication.
	ErrBoxOpen = errors.New("derp: box does not open")
)

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

// LooksLikeDisco reports whether a packet looks like a Tailscale disco
// message: it starts with DiscoMagic and is at least DiscoMinLen bytes.
func LooksLikeDisco(p []byte) bool {
	return len(p) >= DiscoMinLen && string(p[:len(DiscoMagic)]) == DiscoMagic
}

// AppendFrameHeader appends a frame header for a payload of n bytes.
func AppendFrameHeader(b []byte, t FrameType, n uint32) []byte {
	return binary.BigEndian.AppendUint32(append(b, byte(t)), n)
}

// PutFrameHeader writes a frame header into b[:FrameHeaderLen].
func PutFrameHeader(b []byte, t FrameType, n uint32) {
	_ = b[FrameHeaderLen-1]
	b[0] = byte(t)
	binary.BigEndian.PutUint32(b[1:], n)
}

// ParseFrameHeader decodes b[:FrameHeaderLen].
func ParseFrameHeader(b []byte) (FrameType, uint32) {
	_ = b[FrameHeaderLen-1]
	return FrameType(b[0]), binary.BigEndian.Uint32(b[1:])
}

// AppendFrame appends a whole frame.
func AppendFrame(b []byte, t FrameType, payload []byte) []byte {
	return append(AppendFrameHeader(b, t, uint32(len(payload))), payload...)
}

// WriteFrame writes a whole frame to w with a single Write call.
func WriteFrame(w io.Writer, t FrameType, payload []byte) error {
	_, err := w.Write(AppendFrame(make([]byte, 0, FrameHeaderLen+len(payload)), t, payload))
	return err
}

// ReadFrameHeader reads one frame header from r.
func ReadFrameHeader(r io.Reader) (FrameType, uint32, error) {
	var h [FrameHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return 0, 0, err
	}
	t, n := ParseFrameHeader(h[:])
	return t, n, nil
}

// SkipPayload discards an n-byte payload from r, refusing (with
// ErrFrameTooLarge, without reading) when n exceeds limit.
func SkipPayload(r io.Reader, n, limit uint32) error {
	if n > limit {
		return fmt.Errorf("%w: %d bytes to skip, limit %d", ErrFrameTooLarge, n, limit)
	}
	if n == 0 {
		return nil
	}
	m, err := io.CopyN(io.Discard, r, int64(n))
	if err == io.EOF && m < int64(n) {
		err = io.ErrUnexpectedEOF
	}
	return err
}

// FrameReader reads frames from a stream and rejects frames larger than a
// fixed maximum. It is not safe for concurrent use.
type FrameReader struct {
	r   io.Reader
	max uint32
	hdr [FrameHeaderLen]byte
	buf []byte
}

// NewFrameReader returns a reader of frames from r that refuses frames whose
// payload exceeds max bytes (0 means MaxFrameSize).
func NewFrameReader(r io.Reader, max uint32) *FrameReader {
	if max == 0 {
		max = MaxFrameSize
	}
	return &FrameReader{r: r, max: max}
}

// ReadHeader reads a frame header. A length above the maximum yields an
// error wrapping ErrFrameTooLarge; the stream is then unusable.
func (fr *FrameReader) ReadHeader() (FrameType, uint32, error) {
	if _, err := io.ReadFull(fr.r, fr.hdr[:]); err != nil {
		return 0, 0, err
	}
	t, n := ParseFrameHeader(fr.hdr[:])
	if n > fr.max {
		return t, n, fmt.Errorf("%w: %v frame of %d bytes, limit %d", ErrFrameTooLarge, t, n, fr.max)
	}
	return t, n, nil
}

// ReadPayload reads an n-byte payload (as announced by ReadHeader) into the
// reader's internal buffer. The result is valid until the next call.
func (fr *FrameReader) ReadPayload(n uint32) ([]byte, error) {
	if n > fr.max {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrFrameTooLarge, n, fr.max)
	}
	if uint32(cap(fr.buf)) < n {
		fr.buf = make([]byte, n)
	}
	b := fr.buf[:n]
	if _, err := io.ReadFull(fr.r, b); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// ReadFrame reads a whole frame. The payload is valid until the next call.
func (fr *FrameReader) ReadFrame() (FrameType, []byte, error) {
	t, n, err := fr.ReadHeader()
	if err != nil {
		return t, nil, err
	}
	b, err := fr.ReadPayload(n)
	return t, b, err
}

// Skip discards an n-byte payload, refusing lengths above limit.
func (fr *FrameReader) Skip(n, limit uint32) error { return SkipPayload(fr.r, n, limit) }
