//go:build linux

package loader

import (
	"net/netip"
	"testing"
	"time"
)

// runN runs frame n times and counts the actions.
func runN(t *testing.T, x *XDP, frame []byte, n int) map[uint32]int {
	t.Helper()
	got := map[uint32]int{}
	for range n {
		ret, _ := run(t, x, frame)
		got[ret]++
	}
	return got
}

func TestShapingTable(t *testing.T) {
	cfg := Config{
		DERPPorts: []uint16{443},
		Shaping:   Shaping{PPS: 10, Burst: 5, SYNPPS: 2, SYNBurst: 2, STUNPPS: 1, STUNBurst: 1},
		Exempt:    []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("2001:db8:ee::/48")},
	}
	x := loadTest(t, cfg)
	derp4 := withPort(srv4, 443)
	derp6 := withPort(srv6, 443)
	const ack, syn, rst = 0x10, 0x02, 0x04
	tcp := func(src, dst netip.AddrPort, flags byte) []byte {
		return frame{src: src, dst: dst, proto: 6, tcpFlags: flags, payload: make([]byte, 100)}.build()
	}
	// budget returns how many packets a bucket admits within elapsed.
	budget := func(burst, rate uint64, elapsed time.Duration) int {
		return int(burst) + int(float64(rate)*elapsed.Seconds()+0.999)
	}
	check := func(name string, before map[string]Counter, key string, want int) {
		t.Helper()
		after := counterMap(t, x)
		if d := int(after[key].Packets - before[key].Packets); d != want {
			t.Errorf("%s: counter %s moved by %d, want %d", name, key, d, want)
		}
	}

	for _, fam := range []struct {
		name      string
		src, dst  netip.AddrPort
		src2      netip.AddrPort // same shaping key as src
		exempt    netip.AddrPort
		synSource netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddrPort("192.0.2.10:5000"), derp4, netip.MustParseAddrPort("192.0.2.10:5001"), netip.MustParseAddrPort("203.0.113.9:5000"), netip.MustParseAddrPort("192.0.2.11:5000")},
		{"ipv6", netip.MustParseAddrPort("[2001:db8:aa::1]:5000"), derp6, netip.MustParseAddrPort("[2001:db8:aa::2]:5000"), netip.MustParseAddrPort("[2001:db8:ee:1::9]:5000"), netip.MustParseAddrPort("[2001:db8:bb::1]:5000")},
	} {
		t.Run(fam.name, func(t *testing.T) {
			before := counterMap(t, x)
			start := time.Now()
			got := runN(t, x, tcp(fam.src, fam.dst, ack), 10)
			// A second address with the same key (same /32, or same /64) shares the bucket.
			got2 := runN(t, x, tcp(fam.src2, fam.dst, ack), 10)
			max := budget(5, 10, time.Since(start))
			if got[xdpPass]+got2[xdpPass] < 5 || got[xdpPass]+got2[xdpPass] > max {
				t.Errorf("passed %d of 20, want 5..%d", got[xdpPass]+got2[xdpPass], max)
			}
			if got[xdpDrop]+got2[xdpDrop]+got[xdpPass]+got2[xdpPass] != 20 {
				t.Errorf("actions %v %v", got, got2)
			}
			check("over", before, fam.name+"/drop/shape_over", got[xdpDrop]+got2[xdpDrop])
			check("ok", before, fam.name+"/pass/shape_ok", got[xdpPass]+got2[xdpPass])

			before = counterMap(t, x)
			if g := runN(t, x, tcp(fam.src, fam.dst, rst|ack), 5); g[xdpPass] != 5 {
				t.Errorf("RST over budget: %v, want all passed", g)
			}
			check("rst", before, fam.name+"/pass/tcp_rst", 5)

			before = counterMap(t, x)
			if g := runN(t, x, tcp(fam.exempt, fam.dst, ack), 30); g[xdpPass] != 30 {
				t.Errorf("exempt source: %v, want all passed", g)
			}
			check("exempt", before, fam.name+"/pass/exempt", 30)

			before = counterMap(t, x)
			start = time.Now()
			g := runN(t, x, tcp(fam.synSource, fam.dst, syn), 6)
			if max := budget(2, 2, time.Since(start)); g[xdpPass] < 2 || g[xdpPass] > max {
				t.Errorf("SYN: %v, want 2..%d passed", g, max)
			}
			check("syn", before, fam.name+"/drop/syn_over", g[xdpDrop])
			// SYN+ACK is not a new connection: it uses the ordinary bucket.
			if ret, _ := run(t, x, tcp(fam.synSource, fam.dst, syn|ack)); ret != xdpPass {
				t.Errorf("SYN+ACK from a fresh source: action %d", ret)
			}

			// Other TCP ports are never shaped.
			before = counterMap(t, x)
			if g := runN(t, x, tcp(fam.src, withPort(fam.dst, 22), ack), 5); g[xdpPass] != 5 {
				t.Errorf("other port: %v", g)
			}
			check("other port", before, fam.name+"/pass/tcp_other_port", 5)

			// STUN: one per second per source, here.
			stunSrc := withPort(fam.synSource, 7000)
			stunDst := withPort(fam.dst, 3478)
			req := frame{src: stunSrc, dst: stunDst, payload: tsRequest()}.build()
			before = counterMap(t, x)
			start = time.Now()
			g = runN(t, x, req, 3)
			if max := budget(1, 1, time.Since(start)); g[xdpTX] < 1 || g[xdpTX] > max || g[xdpTX]+g[xdpDrop] != 3 {
				t.Errorf("STUN limit: %v", g)
			}
			check("stun rate", before, fam.name+"/drop/stun_rate", g[xdpDrop])
			ex := frame{src: withPort(fam.exempt, 7000), dst: stunDst, payload: tsRequest()}.build()
			if g := runN(t, x, ex, 3); g[xdpTX] != 3 {
				t.Errorf("STUN from an exempt source: %v", g)
			}
		})
	}
	v4, v6, err := x.ShapingOccupancy()
	if err != nil {
		t.Fatal(err)
	}
	// ipv4: 192.0.2.10, 192.0.2.11; ipv6: 2001:db8:aa::/64, 2001:db8:bb::/64.
	if v4 != 2 || v6 != 2 {
		t.Errorf("occupancy v4=%d v6=%d, want 2 and 2", v4, v6)
	}

	// Run-time update: drop STUN, shaping off.
	if err := x.Update(Config{DERPPorts: []uint16{443}, DropSTUN: true}); err != nil {
		t.Fatal(err)
	}
	before := counterMap(t, x)
	req := frame{src: cli4, dst: srv4, payload: tsRequest()}.build()
	if ret, _ := run(t, x, req); ret != xdpDrop {
		t.Errorf("drop-stun: action %d", ret)
	}
	check("drop stun", before, "ipv4/drop/stun_dropped", 1)
	if ret, _ := run(t, x, tcp(netip.MustParseAddrPort("192.0.2.10:5000"), derp4, ack)); ret != xdpPass {
		t.Errorf("shaping off after update: action %d", ret)
	}
	// Exemptions were replaced by none.
	if n, _ := countKeys[struct {
		P uint32
		A [4]byte
	}](x.objs.XderpExemptV4); n != 0 {
		t.Errorf("exempt v4 entries after update: %d", n)
	}
}

func TestConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"too many stun ports", Config{STUNPorts: []uint16{1, 2, 3, 4, 5}}, "STUNPorts"},
		{"derp port 0", Config{DERPPorts: []uint16{0}}, "DERPPorts"},
		{"burst without rate", Config{DERPPorts: []uint16{443}, Shaping: Shaping{Burst: 3}}, "PPS"},
		{"shaping without ports", Config{Shaping: Shaping{PPS: 3}}, "DERPPorts"},
		{"bad prefix", Config{Exempt: []netip.Prefix{{}}}, "Exempt"},
	} {
		_, err := tc.cfg.validate()
		if err == nil || !contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one naming %s", tc.name, err, tc.want)
		}
	}
	if c, err := (Config{}).validate(); err != nil || len(c.STUNPorts) != 1 || c.STUNPorts[0] != 3478 {
		t.Errorf("defaults: %+v %v", c, err)
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
