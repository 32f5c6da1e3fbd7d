package mesh

import "github.com/xderp/xderp/userspace/metrics"

type meshMetrics struct {
	connected      *metrics.Gauge
	learned        *metrics.Gauge
	fwdPackets     *metrics.Counter
	fwdBytes       *metrics.Counter
	dropPeerDown   *metrics.Counter
	dropQueueFull  *metrics.Counter
	dropWriteError *metrics.Counter
	dropTooLarge   *metrics.Counter
	updPresent     *metrics.Counter
	updGone        *metrics.Counter
	updNotHere     *metrics.Counter
	updConnBroke   *metrics.Counter
	dials          *metrics.CounterVec
	resolveErrors  *metrics.Counter
}

// forwardedInStats is implemented by relays that count ForwardPacket
// frames received from mesh peers; the mesh then reports them as
// direction="in".
type forwardedInStats interface {
	ForwardedIn() (packets, bytes uint64)
}

func newMeshMetrics(r *metrics.Registry, m *Mesh) *meshMetrics {
	mm := &meshMetrics{
		connected: r.Gauge("xderp_mesh_peers_connected", "Mesh peers with an established, watching connection"),
		learned:   r.Gauge("xderp_mesh_remote_keys", "Keys currently learned from mesh peers (a key on several peers counts once per peer)"),
	}
	r.GaugeFunc("xderp_mesh_peers", "Mesh peers configured or resolved, excluding this node", func() float64 {
		return float64(len(m.PeerAddrs()))
	})
	// direction="out" is counted here (frames written to a peer);
	// direction="in" comes from the relay when it exposes ForwardedIn.
	in, _ := m.table.(forwardedInStats)
	pk := new(metrics.Counter)
	by := new(metrics.Counter)
	mm.fwdPackets, mm.fwdBytes = pk, by
	family := func(c *metrics.Counter, bytes bool) func() []metrics.Sample {
		return func() []metrics.Sample {
			s := []metrics.Sample{{Labels: []string{"out"}, Value: float64(c.Value())}}
			if in != nil {
				p, b := in.ForwardedIn()
				v := p
				if bytes {
					v = b
				}
				s = append(s, metrics.Sample{Labels: []string{"in"}, Value: float64(v)})
			}
			return s
		}
	}
	r.Register("xderp_mesh_forwarded_packets_total", "Packets forwarded over the mesh (out: written to a peer; in: received from peers)",
		metrics.KindCounter, []string{"direction"}, family(pk, false))
	r.Register("xderp_mesh_forwarded_bytes_total", "Packet payload bytes forwarded over the mesh (excluding frame headers and keys)",
		metrics.KindCounter, []string{"direction"}, family(by, true))
	drops := r.CounterVec("xderp_mesh_forward_drops_total", "Packets for a mesh peer dropped before being written, by reason", "reason")
	mm.dropQueueFull = drops.With("queue_full")
	mm.dropPeerDown = drops.With("peer_down")
	mm.dropWriteError = drops.With("write_error")
	mm.dropTooLarge = drops.With("too_large")
	upd := r.CounterVec("xderp_mesh_watch_updates_total", "Watch updates from mesh peers, by kind (conn_broke: keys removed because their mesh connection broke)", "kind")
	mm.updPresent = upd.With("present")
	mm.updGone = upd.With("gone")
	mm.updNotHere = upd.With("not_here")
	mm.updConnBroke = upd.With("conn_broke")
	mm.dials = r.CounterVec("xderp_mesh_dials_total", "Mesh connection attempts, by result (ok, error, self)", "result")
	for _, l := range []string{"ok", "error", "self"} {
		mm.dials.With(l)
	}
	mm.resolveErrors = r.Counter("xderp_mesh_resolve_errors_total", "Failed lookups of mesh peer host names")
	return mm
}
