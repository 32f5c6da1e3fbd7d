package interop

import (
	"bufio"
	"bytes"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"tailscale.com/types/key"

	xderp "github.com/xderp/xderp/userspace/derp"
)

// stuckPeer is a mesh peer that completes the handshake, announces keys,
// and then never reads again: everything sent to it piles up in socket
// buffers.
type stuckPeer struct {
	ln   net.Listener
	priv xderp.PrivateKey
	keys []xderp.PublicKey
	mu   sync.Mutex
	held []net.Conn
}

func newStuckPeer(t *testing.T, keys ...xderp.PublicKey) *stuckPeer {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	priv, err := xderp.NewPrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	p := &stuckPeer{ln: ln, priv: priv, keys: keys}
	go p.serve()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.held {
			c.Close()
		}
		p.mu.Unlock()
	})
	return p
}

func (p *stuckPeer) url() string { return "http://" + p.ln.Addr().String() + "/derp" }

func (p *stuckPeer) serve() {
	for {
		nc, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.held = append(p.held, nc)
		p.mu.Unlock()
		go p.handshake(nc)
	}
}

func (p *stuckPeer) handshake(nc net.Conn) {
	br := bufio.NewReader(nc)
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	req.Body.Close()
	out := []byte("HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
	out = xderp.AppendServerKey(out, p.priv.Public())
	if _, err := nc.Write(out); err != nil {
		return
	}
	ft, payload, err := xderp.NewFrameReader(br, 0).ReadFrame()
	if err != nil || ft != xderp.FrameClientInfo {
		return
	}
	client, _, err := xderp.OpenClientInfo(p.priv, payload)
	if err != nil {
		return
	}
	out, err = xderp.AppendServerInfo(nil, p.priv, client, &xderp.ServerInfo{Version: 2})
	if err != nil {
		return
	}
	for _, k := range p.keys {
		out = xderp.AppendPeerPresent(out, xderp.PeerPresent{Key: k})
	}
	nc.Write(out)
	// Never read again.
}

// TestMeshStuckPeer: node a is meshed with b (healthy) and with a peer that
// stops reading. A Tailscale client on a floods a key that lives on the
// stuck peer while also talking to a client on a and a client on b: that
// traffic keeps flowing, every packet delivered in order, because packets
// for the stuck peer wait in (and overflow from) its own bounded queue.
func TestMeshStuckPeer(t *testing.T) {
	onStuck := key.NewNode().Public()
	stuck := newStuckPeer(t, xderp.PublicKey(onStuck.Raw32()))
	a := newRegionNode(t, "a", nodeXderp)
	b := newRegionNode(t, "b", nodeXderp)
	a.peers = []string{b.url(), stuck.url()}
	a.startMesh()
	b.meshWith(a)

	sender := dialRegion(t, a, key.NewNode())
	local := dialRegion(t, a, key.NewNode())
	remote := dialRegion(t, b, key.NewNode())
	reach(t, sender, local, 10*time.Second)
	reach(t, sender, remote, 10*time.Second)

	// Fill the stuck peer's path: its socket buffers, then its queue.
	junk := bytes.Repeat([]byte{0xee}, 1200)
	deadline := time.Now().Add(20 * time.Second)
	for a.metric(t, `xderp_mesh_forward_drops_total{reason="queue_full"}`) == "0" {
		for range 512 {
			if err := sender.c.Send(onStuck, junk); err != nil {
				t.Fatal(err)
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the stuck peer's queue never filled")
		}
	}

	for round := range 20 {
		for i := range 16 {
			seq := round*16 + i
			for range 4 {
				sender.c.Send(onStuck, junk)
			}
			if err := sender.c.Send(local.pub, regionPayload(seq)); err != nil {
				t.Fatal(err)
			}
			if err := sender.c.Send(remote.pub, regionPayload(seq)); err != nil {
				t.Fatal(err)
			}
		}
		expectPackets(t, local, sender.pub, round*16, round*16+16)
		expectPackets(t, remote, sender.pub, round*16, round*16+16)
	}
	st := a.mesh.Peers()
	if len(st) != 2 {
		t.Fatalf("peers: %+v", st)
	}
	t.Logf("a's mesh drops: queue_full %s, write_error %s", a.metric(t, `xderp_mesh_forward_drops_total{reason="queue_full"}`), a.metric(t, `xderp_mesh_forward_drops_total{reason="write_error"}`))
}
