package derpserver

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"testing"

	"github.com/xderp/xderp/userspace/derp"
)

func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// TestConnReaderSplits sends a stream of frames cut at random points
// (including inside headers, keys and large payloads) and checks that the
// reader reassembles every frame, over a raw TCP socket and over a pipe,
// with and without initial buffered bytes, and reports a clean EOF.
func TestConnReaderSplits(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var stream []byte
	var want [][]byte
	for i := range 300 {
		n := rng.IntN(3000)
		if i%50 == 0 {
			n = derp.MaxPacketSize - rng.IntN(10)
		}
		p := randBytes(n)
		want = append(want, p)
		stream = derp.AppendSendPacket(stream, derp.PublicKey{byte(i)}, p)
	}
	for _, mode := range []string{"tcp", "pipe", "tcp+initial"} {
		t.Run(mode, func(t *testing.T) {
			var cw, sr net.Conn
			if mode == "pipe" {
				cw, sr = net.Pipe()
				defer cw.Close()
			} else {
				cw, sr = tcpPair(t)
			}
			var initial []byte
			rest := stream
			if mode == "tcp+initial" {
				initial, rest = stream[:1000], stream[1000:]
			}
			go func() {
				r := rand.New(rand.NewPCG(3, 4))
				for len(rest) > 0 {
					k := min(len(rest), 1+r.IntN(20000))
					if _, err := cw.Write(rest[:k]); err != nil {
						return
					}
					rest = rest[k:]
				}
				cw.Close()
			}()
			cr := newConnReader(sr, initial)
			if mode != "pipe" && cr.rc == nil {
				t.Fatal("raw reads not used on a TCP socket")
			}
			for i, w := range want {
				h, err := cr.next(derp.FrameHeaderLen)
				if err != nil {
					t.Fatalf("frame %d header: %v", i, err)
				}
				typ, n := derp.ParseFrameHeader(h)
				if typ != derp.FrameSendPacket || int(n) != derp.KeyLen+len(w) {
					t.Fatalf("frame %d: %v %d", i, typ, n)
				}
				k, err := cr.next(derp.KeyLen)
				if err != nil || k[0] != byte(i) {
					t.Fatalf("frame %d key %x %v", i, k, err)
				}
				got := make([]byte, len(w))
				if err := cr.readFull(got); err != nil {
					t.Fatalf("frame %d payload: %v", i, err)
				}
				if !bytes.Equal(got, w) {
					t.Fatalf("frame %d payload differs", i)
				}
			}
			if _, err := cr.next(derp.FrameHeaderLen); !errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("end of stream: %v, want io.EOF", err)
			}
			cr.close()
		})
	}
}

func TestConnReaderTruncated(t *testing.T) {
	cw, sr := tcpPair(t)
	cw.Write([]byte{4, 0, 0})
	cw.Close()
	cr := newConnReader(sr, nil)
	if _, err := cr.next(derp.FrameHeaderLen); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("truncated header: %v", err)
	}
}

func TestPktRing(t *testing.T) {
	var q pktRing
	ps := make([]*packet, 5)
	for i := range ps {
		ps[i] = &packet{enq: int64(i)}
	}
	for i := range 3 {
		if d := q.push(ps[i], 3); d != nil {
			t.Fatalf("drop while not full at %d", i)
		}
	}
	if d := q.push(ps[3], 3); d != ps[0] {
		t.Fatal("full ring must drop the oldest")
	}
	got := q.takeAll(nil)
	if len(got) != 3 || got[0] != ps[1] || got[2] != ps[3] || q.n != 0 {
		t.Fatalf("takeAll %v", got)
	}
	q.push(ps[4], 3)
	if got := q.takeAll(nil); len(got) != 1 || got[0] != ps[4] {
		t.Fatal("reuse after takeAll")
	}
}
