package derpserver

import (
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// packet is one queued RecvPacket. Its buffer comes from a size-class pool
// and goes back as soon as the writer has copied it into its batch.
type packet struct {
	src      derp.PublicKey
	srcEntry *keyEntry // sender's registry entry, nil for forwarded-in packets
	buf      []byte    // the pooled buffer: frameHeadroom bytes, then data
	data     []byte    // the packet, buf[frameHeadroom:frameHeadroom+n]
	enq      int64     // monotonic nanoseconds at enqueue
	disco    bool
}

// frameHeadroom is room before the packet for a RecvPacket header and
// source key, so a packet can be written as one frame without a copy.
const frameHeadroom = derp.FrameHeaderLen + derp.KeyLen

// frame fills the headroom with a RecvPacket header and the source key and
// returns the whole frame.
func (p *packet) frame() []byte {
	f := p.buf[:frameHeadroom+len(p.data)]
	derp.PutFrameHeader(f, derp.FrameRecvPacket, uint32(derp.KeyLen+len(p.data)))
	copy(f[derp.FrameHeaderLen:], p.src[:])
	return f
}

// Size classes for packet buffers: small control/disco, typical WireGuard
// MTU-sized, and up to the protocol maximum.
var packetClasses = [...]int{256, 2048, 9216, derp.MaxPacketSize}

var packetPools [len(packetClasses)]sync.Pool

func init() {
	for i, size := range packetClasses {
		packetPools[i].New = func() any { return &packet{buf: make([]byte, frameHeadroom+size)} }
	}
}

func classFor(n int) int {
	for i, size := range packetClasses {
		if n <= size {
			return i
		}
	}
	return -1
}

func getPacket(n int) *packet {
	p := packetPools[classFor(n)].Get().(*packet)
	p.data = p.buf[frameHeadroom : frameHeadroom+n]
	return p
}

func putPacket(p *packet) {
	c := classFor(len(p.buf) - frameHeadroom)
	if c < 0 || packetClasses[c] != len(p.buf)-frameHeadroom {
		return
	}
	p.srcEntry = nil
	p.data = nil
	packetPools[c].Put(p)
}

// Read chunks: the reader parses frames out of one chunk per read call and
// gives the chunk back when it has consumed everything, so an idle
// connection on a plain TCP socket holds no read buffer.
const readChunkSize = 32 << 10

var readChunkPool = sync.Pool{New: func() any { b := make([]byte, readChunkSize); return &b }}

// Write buffers: one batch of frames per write call. Large enough for the
// largest frame so any frame fits after a flush.
const writeBufSize = derp.FrameHeaderLen + derp.KeyLen + derp.MaxPacketSize + 1024

var writeBufPool = sync.Pool{New: func() any { b := make([]byte, 0, writeBufSize); return &b }}

var clockBase = time.Now()

// monoNow returns monotonic nanoseconds since process start (never 0 in
// practice, so 0 can mean "never").
func monoNow() int64 { return monoAt(time.Now()) }

// monoAt is monoNow for a time already read.
func monoAt(t time.Time) int64 { return int64(t.Sub(clockBase)) }

// atomicFloat is a float64 updated with compare-and-swap.
type atomicFloat struct{ bits atomic.Uint64 }

func (f *atomicFloat) load() float64 { return math.Float64frombits(f.bits.Load()) }

// ewma folds v into the moving average with weight alpha.
func (f *atomicFloat) ewma(v, alpha float64) {
	for {
		old := f.bits.Load()
		nv := alpha*v + (1-alpha)*math.Float64frombits(old)
		if f.bits.CompareAndSwap(old, math.Float64bits(nv)) {
			return
		}
	}
}
