package derp

import (
	"bytes"
	"errors"
	"io"
	"testing"
)

// FuzzFrameReader feeds arbitrary streams through the frame reader and the
// per-type parsers a server uses. It must never panic, must never return a
// payload longer than its limit, and must report over-limit frames with
// ErrFrameTooLarge.
func FuzzFrameReader(f *testing.F) {
	var seed []byte
	seed = AppendServerKey(seed, PublicKey{1})
	seed = AppendSendPacket(seed, PublicKey{2}, []byte("payload"))
	seed = AppendPing(seed, [8]byte{3})
	seed = AppendPeerGone(seed, PublicKey{4}, PeerGoneNotHere)
	seed = AppendPeerPresent(seed, PeerPresent{Key: PublicKey{5}})
	seed = AppendForwardPacket(seed, PublicKey{6}, PublicKey{7}, []byte("x"))
	seed = AppendRestarting(seed, 1, 2)
	f.Add(seed)
	f.Add(AppendFrameHeader(nil, FrameSendPacket, 0xffffffff))
	f.Add(AppendFrameHeader(nil, 0x42, 3))
	f.Add([]byte{})
	f.Add([]byte{1, 0, 0})
	const limit = 4096
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := NewFrameReader(bytes.NewReader(data), limit)
		for {
			typ, n, err := fr.ReadHeader()
			if err != nil {
				if n > limit && !errors.Is(err, ErrFrameTooLarge) {
					t.Fatalf("over-limit frame of %d bytes: %v", n, err)
				}
				return
			}
			if n > limit {
				t.Fatalf("header accepted %d > limit", n)
			}
			p, err := fr.ReadPayload(n)
			if err != nil {
				if !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("payload error %v", err)
				}
				return
			}
			if uint32(len(p)) != n {
				t.Fatalf("payload %d bytes, header said %d", len(p), n)
			}
			switch typ {
			case FrameSendPacket, FrameRecvPacket:
				if _, pkt, err := ParseSendPacket(p); err == nil && len(pkt) != len(p)-KeyLen {
					t.Fatal("packet length")
				}
			case FrameForwardPacket:
				ParseForwardPacket(p)
			case FramePing:
				ParsePing(p)
			case FramePeerGone:
				ParsePeerGone(p)
			case FramePeerPresent:
				ParsePeerPresent(p)
			case FrameNotePreferred:
				ParseNotePreferred(p)
			case FrameClosePeer:
				ParseClosePeer(p)
			case FrameServerKey:
				ParseServerKey(p)
			case FrameRestarting:
				ParseRestarting(p)
			}
		}
	})
}

// FuzzOpenClientInfo checks that arbitrary ClientInfo payloads never panic
// and that only correctly sealed ones open. Seeds include valid boxes whose
// plaintext the fuzzer may not reach, so the JSON path is fuzzed via the
// plaintext argument sealed with a fixed key.
func FuzzOpenClientInfo(f *testing.F) {
	server, _ := ParsePrivateKey("privkey:" + exServerPriv)
	client, _ := ParsePrivateKey("privkey:" + exClientPriv)
	valid, _ := AppendClientInfo(nil, client, server.Public(), &ClientInfo{Version: 2, CanAckPings: true})
	f.Add(valid[FrameHeaderLen:], []byte(`{"version":2,"CanAckPings":true}`))
	f.Add(make([]byte, 56), []byte(`{"meshKey":"`+string(bytes.Repeat([]byte("ab"), 32))+`"}`))
	f.Add([]byte{1, 2, 3}, []byte(`{"meshKey":"x"}`))
	f.Add(bytes.Repeat([]byte{0xff}, 200), []byte(`not json`))
	f.Fuzz(func(t *testing.T, payload, plaintext []byte) {
		key, info, err := OpenClientInfo(server, payload)
		if err == nil && (info == nil || key != PublicKey(payload[:KeyLen])) {
			t.Fatal("opened without info or with the wrong key")
		}
		if err == nil && !bytes.Equal(payload, valid[FrameHeaderLen:]) {
			// Forging a box is infeasible; only re-using the seed opens.
			if _, err2 := Open(server, key, payload[KeyLen:]); err2 != nil {
				t.Fatal("OpenClientInfo succeeded where Open failed")
			}
		}
		var nonce [NonceLen]byte
		cp := client.Public()
		sealed := SealWithNonce(cp[:], client, server.Public(), nonce, plaintext)
		key, info, err = OpenClientInfo(server, sealed)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("sealed plaintext %q: unexpected error class %v", plaintext, err)
			}
			return
		}
		if key != cp || info == nil {
			t.Fatal("wrong key or nil info")
		}
	})
}
