package mesh

import "github.com/xderp/xderp/userspace/derp"

// Forwarder is what the relay calls to hand a packet to a mesh peer. It has
// the method set of derpserver.PacketForwarder.
type Forwarder interface {
	// ForwardPacket queues pkt (copied) for delivery to dst via the peer.
	// It never blocks.
	ForwardPacket(src, dst derp.PublicKey, pkt []byte) error
	String() string
}

// Relay is the part of the relay core the mesh drives: its forwarder
// table. A key may be registered by several peers at once.
type Relay interface {
	AddPacketForwarder(dst derp.PublicKey, fwd Forwarder)
	RemovePacketForwarder(dst derp.PublicKey, fwd Forwarder)
}
