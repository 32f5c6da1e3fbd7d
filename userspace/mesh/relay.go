package mesh

import (
	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
)

// Forwarder is what the relay calls to hand a packet to a mesh peer; each
// mesh peer is one.
type Forwarder = derpserver.PacketForwarder

// Relay is the part of the relay core the mesh drives: its forwarder
// table. A key may be registered by several peers at once.
// *derpserver.Server implements it.
type Relay interface {
	AddPacketForwarder(dst derp.PublicKey, fwd Forwarder)
	RemovePacketForwarder(dst derp.PublicKey, fwd Forwarder)
}

var _ Relay = (*derpserver.Server)(nil)
