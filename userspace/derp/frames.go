package derp

import (
	"encoding/binary"
	"net/netip"
	"time"
)

// AppendSendPacket appends a SendPacket frame (client to server).
func AppendSendPacket(b []byte, dst PublicKey, pkt []byte) []byte {
	b = AppendFrameHeader(b, FrameSendPacket, uint32(KeyLen+len(pkt)))
	return append(append(b, dst[:]...), pkt...)
}

// AppendRecvPacket appends a RecvPacket frame (server to client).
func AppendRecvPacket(b []byte, src PublicKey, pkt []byte) []byte {
	b = AppendFrameHeader(b, FrameRecvPacket, uint32(KeyLen+len(pkt)))
	return append(append(b, src[:]...), pkt...)
}

// AppendForwardPacket appends a ForwardPacket frame (mesh peer to server).
func AppendForwardPacket(b []byte, src, dst PublicKey, pkt []byte) []byte {
	b = AppendFrameHeader(b, FrameForwardPacket, uint32(2*KeyLen+len(pkt)))
	return append(append(append(b, src[:]...), dst[:]...), pkt...)
}

// ParseSendPacket splits a SendPacket payload (or, identically, a
// RecvPacket payload) into key and packet. The packet aliases p.
func ParseSendPacket(p []byte) (PublicKey, []byte, error) {
	if len(p) < KeyLen {
		return PublicKey{}, nil, malformed("packet frame of %d bytes, shorter than a key", len(p))
	}
	if len(p)-KeyLen > MaxPacketSize {
		return PublicKey{}, nil, malformed("packet of %d bytes, limit %d", len(p)-KeyLen, MaxPacketSize)
	}
	return PublicKey(p[:KeyLen]), p[KeyLen:], nil
}

// ParseRecvPacket splits a RecvPacket payload into source key and packet.
func ParseRecvPacket(p []byte) (src PublicKey, pkt []byte, err error) { return ParseSendPacket(p) }

// ParseForwardPacket splits a ForwardPacket payload. The packet aliases p.
func ParseForwardPacket(p []byte) (src, dst PublicKey, pkt []byte, err error) {
	if len(p) < 2*KeyLen {
		return src, dst, nil, malformed("ForwardPacket of %d bytes, shorter than two keys", len(p))
	}
	if len(p)-2*KeyLen > MaxPacketSize {
		return src, dst, nil, malformed("forwarded packet of %d bytes, limit %d", len(p)-2*KeyLen, MaxPacketSize)
	}
	return PublicKey(p[:KeyLen]), PublicKey(p[KeyLen : 2*KeyLen]), p[2*KeyLen:], nil
}

// AppendKeepAlive appends a KeepAlive frame.
func AppendKeepAlive(b []byte) []byte { return AppendFrameHeader(b, FrameKeepAlive, 0) }

// AppendNotePreferred appends a NotePreferred frame.
func AppendNotePreferred(b []byte, preferred bool) []byte {
	v := byte(0)
	if preferred {
		v = 1
	}
	return append(AppendFrameHeader(b, FrameNotePreferred, 1), v)
}

// ParseNotePreferred decodes a NotePreferred payload (exactly one byte).
func ParseNotePreferred(p []byte) (bool, error) {
	if len(p) != 1 {
		return false, malformed("NotePreferred of %d bytes, want 1", len(p))
	}
	return p[0] != 0, nil
}

// AppendPeerGone appends a PeerGone frame with a reason byte.
func AppendPeerGone(b []byte, peer PublicKey, reason PeerGoneReason) []byte {
	b = AppendFrameHeader(b, FramePeerGone, KeyLen+1)
	return append(append(b, peer[:]...), byte(reason))
}

// ParsePeerGone decodes a PeerGone payload; a missing reason means
// PeerGoneDisconnected and bytes after the reason are ignored.
func ParsePeerGone(p []byte) (PublicKey, PeerGoneReason, error) {
	if len(p) < KeyLen {
		return PublicKey{}, 0, malformed("PeerGone of %d bytes, shorter than a key", len(p))
	}
	r := PeerGoneDisconnected
	if len(p) > KeyLen {
		r = PeerGoneReason(p[KeyLen])
	}
	return PublicKey(p[:KeyLen]), r, nil
}

// PeerPresent is the content of a PeerPresent frame.
type PeerPresent struct {
	Key   PublicKey
	Addr  netip.AddrPort // zero if the sender did not include it
	Flags PeerPresentFlags
}

// AppendPeerPresent appends a 51-byte PeerPresent frame. IPv4 addresses are
// sent IPv4-mapped.
func AppendPeerPresent(b []byte, pp PeerPresent) []byte {
	b = AppendFrameHeader(b, FramePeerPresent, PeerPresentLen)
	b = append(b, pp.Key[:]...)
	var a16 [16]byte
	if pp.Addr.Addr().IsValid() {
		a16 = pp.Addr.Addr().As16()
	}
	b = append(b, a16[:]...)
	b = binary.BigEndian.AppendUint16(b, pp.Addr.Port())
	return append(b, byte(pp.Flags))
}

// ParsePeerPresent decodes a PeerPresent payload of 32 bytes (key only),
// 50 bytes (no flags) or more (bytes after the flags are ignored).
func ParsePeerPresent(p []byte) (PeerPresent, error) {
	var pp PeerPresent
	if len(p) < KeyLen {
		return pp, malformed("PeerPresent of %d bytes, shorter than a key", len(p))
	}
	pp.Key = PublicKey(p[:KeyLen])
	if len(p) >= KeyLen+18 {
		a := netip.AddrFrom16([16]byte(p[KeyLen : KeyLen+16])).Unmap()
		pp.Addr = netip.AddrPortFrom(a, binary.BigEndian.Uint16(p[KeyLen+16:]))
	}
	if len(p) >= PeerPresentLen {
		pp.Flags = PeerPresentFlags(p[KeyLen+18])
	}
	return pp, nil
}

// AppendWatchConns appends a WatchConns frame.
func AppendWatchConns(b []byte) []byte { return AppendFrameHeader(b, FrameWatchConns, 0) }

// AppendClosePeer appends a ClosePeer frame.
func AppendClosePeer(b []byte, peer PublicKey) []byte {
	return append(AppendFrameHeader(b, FrameClosePeer, KeyLen), peer[:]...)
}

// ParseClosePeer decodes a ClosePeer payload (exactly one key).
func ParseClosePeer(p []byte) (PublicKey, error) {
	if len(p) != KeyLen {
		return PublicKey{}, malformed("ClosePeer of %d bytes, want %d", len(p), KeyLen)
	}
	return PublicKey(p), nil
}

// AppendPing appends a Ping frame.
func AppendPing(b []byte, data [PingLen]byte) []byte {
	return append(AppendFrameHeader(b, FramePing, PingLen), data[:]...)
}

// AppendPong appends a Pong frame.
func AppendPong(b []byte, data [PingLen]byte) []byte {
	return append(AppendFrameHeader(b, FramePong, PingLen), data[:]...)
}

// ParsePing decodes a Ping payload as a server does: 8 to 1000 bytes, of
// which the first 8 are echoed.
func ParsePing(p []byte) ([PingLen]byte, error) {
	if len(p) < PingLen || len(p) > MaxPingLen {
		return [PingLen]byte{}, malformed("Ping of %d bytes, want %d..%d", len(p), PingLen, MaxPingLen)
	}
	return [PingLen]byte(p[:PingLen]), nil
}

// ParsePong decodes a Pong payload (at least 8 bytes).
func ParsePong(p []byte) ([PingLen]byte, error) {
	if len(p) < PingLen {
		return [PingLen]byte{}, malformed("Pong of %d bytes, want %d", len(p), PingLen)
	}
	return [PingLen]byte(p[:PingLen]), nil
}

// AppendHealth appends a Health frame; an empty problem means healthy.
func AppendHealth(b []byte, problem string) []byte {
	return append(AppendFrameHeader(b, FrameHealth, uint32(len(problem))), problem...)
}

// AppendRestarting appends a Restarting frame. Durations are sent in whole
// milliseconds, clamped to the uint32 range.
func AppendRestarting(b []byte, reconnectIn, tryFor time.Duration) []byte {
	b = AppendFrameHeader(b, FrameRestarting, 8)
	b = binary.BigEndian.AppendUint32(b, durationMillis(reconnectIn))
	return binary.BigEndian.AppendUint32(b, durationMillis(tryFor))
}

func durationMillis(d time.Duration) uint32 {
	ms := d.Milliseconds()
	switch {
	case ms < 0:
		return 0
	case ms > 1<<32-1:
		return 1<<32 - 1
	}
	return uint32(ms)
}

// ParseRestarting decodes a Restarting payload (at least 8 bytes).
func ParseRestarting(p []byte) (reconnectIn, tryFor time.Duration, err error) {
	if len(p) < 8 {
		return 0, 0, malformed("Restarting of %d bytes, want 8", len(p))
	}
	reconnectIn = time.Duration(binary.BigEndian.Uint32(p)) * time.Millisecond
	tryFor = time.Duration(binary.BigEndian.Uint32(p[4:])) * time.Millisecond
	return reconnectIn, tryFor, nil
}
