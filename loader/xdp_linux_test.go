//go:build linux

package loader

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/rlimit"

	"github.com/xderp/xderp/bpf"
	"github.com/xderp/xderp/userspace/stun"
	"github.com/xderp/xderp/vmtest/guest"
)

// loadTest loads the program unattached and unpinned with cfg.
func loadTest(t testing.TB, cfg Config) *XDP {
	t.Helper()
	guest.RequireRoot(t)
	if err := rlimit.RemoveMemlock(); err != nil {
		guest.SkipMissingFeature(t, "bpf", err.Error())
	}
	cfg, err := cfg.validate()
	if err != nil {
		t.Fatal(err)
	}
	x := &XDP{}
	if err := x.load(cfg); err != nil {
		if errors.Is(err, ebpf.ErrNotSupported) {
			guest.SkipMissingFeature(t, "bpf", err.Error())
		}
		t.Fatal(err)
	}
	if err := x.writeExempt(cfg.Exempt); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { x.objs.Close() })
	return x
}

// run runs frame through the program and returns action and output frame.
func run(t testing.TB, x *XDP, frame []byte) (uint32, []byte) {
	t.Helper()
	return runProg(t, x.objs.XderpXdp, frame)
}

// runProg runs frame through any XDP program with BPF_PROG_TEST_RUN and
// returns action and output frame (room for the frame to grow by 256 bytes).
func runProg(t testing.TB, prog *ebpf.Program, frame []byte) (uint32, []byte) {
	t.Helper()
	opts := &ebpf.RunOptions{Data: frame, DataOut: make([]byte, len(frame)+256)}
	ret, err := prog.Run(opts)
	if err != nil {
		t.Fatalf("run %x: %v", frame, err)
	}
	return ret, opts.DataOut
}

func counterMap(t testing.TB, x *XDP) map[string]Counter {
	t.Helper()
	cs, err := x.Counters()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]Counter{}
	for _, c := range cs {
		m[c.AF+"/"+c.Verdict+"/"+c.Reason] = c
	}
	return m
}

var (
	cli4 = netip.MustParseAddrPort("192.0.2.1:1025")
	srv4 = netip.MustParseAddrPort("198.51.100.7:3478")
	cli6 = netip.MustParseAddrPort("[2001:db8::1]:1025")
	srv6 = netip.MustParseAddrPort("[2001:db8:1::7]:3478")
)

func tsRequest() []byte {
	return stun.AppendRequest(nil, stun.TxID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12})
}

func withPort(ap netip.AddrPort, p uint16) netip.AddrPort { return netip.AddrPortFrom(ap.Addr(), p) }

type pktCase struct {
	name    string
	frame   []byte
	verdict string
	reason  string
}

func packetTable() []pktCase {
	req := tsRequest()
	mut := func(f func([]byte) []byte) []byte { return f(bytes.Clone(req)) }
	var cases []pktCase
	for _, fam := range []struct {
		name     string
		cli, srv netip.AddrPort
	}{{"v4", cli4, srv4}, {"v6", cli6, srv6}} {
		for _, vlan := range []bool{false, true} {
			p := fam.name
			if vlan {
				p += "/vlan"
			}
			f := func(fr frame) []byte {
				fr.vlan = vlan
				if fr.src == (netip.AddrPort{}) {
					fr.src, fr.dst = fam.cli, fam.srv
				}
				return fr.build()
			}
			add := func(name string, b []byte, verdict, reason string) {
				cases = append(cases, pktCase{p + "/" + name, b, verdict, reason})
			}
			add("stun", f(frame{payload: req}), "tx", "stun_answered")
			add("stun padded", f(frame{payload: req, pad: 6}), "tx", "stun_answered")
			add("stun extra optional attr", f(frame{payload: stunWith(0x8023, "abc")}), "tx", "stun_answered")
			add("bad udp csum", f(frame{payload: req, badCsum: true}), "pass", "udp_csum")
			if fam.name == "v4" {
				add("zero udp csum", f(frame{payload: req, zeroCsum: true}), "tx", "stun_answered")
				add("bad ip csum", f(frame{payload: req, badIPCsum: true}), "pass", "ip_csum")
				add("ip options", f(frame{payload: req, ipOptions: 4}), "pass", "ip_options")
				add("fragment", f(frame{payload: req, frag: 0x2000}), "pass", "fragment")
				add("tcp with options to derp shaped off", f(frame{proto: 6, ipOptions: 8, dst: withPort(fam.srv, 443), src: fam.cli}), "pass", "shaping_off")
			} else {
				add("zero udp csum", f(frame{payload: req, zeroCsum: true}), "pass", "udp_csum")
				add("udp behind ext header", f(frame{payload: req, ext: []byte{60}}), "pass", "ipv6_ext")
				add("fragment header", f(frame{payload: req, ext: []byte{0, 44}}), "pass", "fragment")
				add("tcp behind ext headers", f(frame{proto: 6, ext: []byte{0, 60}, dst: withPort(fam.srv, 443), src: fam.cli}), "pass", "shaping_off")
			}
			add("wrong port", f(frame{payload: req, dst: withPort(fam.srv, 3479), src: fam.cli}), "pass", "udp_other_port")
			add("tcp other port", f(frame{proto: 6, dst: withPort(fam.srv, 22), src: fam.cli}), "pass", "tcp_other_port")
			add("tcp derp port", f(frame{proto: 6, dst: withPort(fam.srv, 443), src: fam.cli}), "pass", "shaping_off")
			add("icmp", f(frame{proto: 1, payload: []byte{8, 0, 0, 0}}), "pass", "other_proto")
			add("not stun", f(frame{payload: []byte("hello, world")}), "pass", "stun_not_stun")
			add("empty", f(frame{}), "pass", "stun_not_stun")
			add("cookie", f(frame{payload: mut(func(b []byte) []byte { b[5] ^= 1; return b })}), "pass", "stun_not_stun")
			add("response type", f(frame{payload: mut(func(b []byte) []byte { b[0] = 1; b[1] = 1; return b })}), "pass", "stun_not_binding")
			add("length field", f(frame{payload: mut(func(b []byte) []byte { b[3] = 24; return b })}), "pass", "stun_malformed")
			add("length mod 4", f(frame{payload: append(bytes.Clone(req), 0, 0)}), "pass", "stun_malformed")
			add("max size, general path", f(frame{payload: stunWith(0x8050, strings.Repeat("y", stun.MaxRequestLen-44))}), "tx", "stun_answered")
			add("too big", f(frame{payload: stunWith(0x8050, strings.Repeat("x", stun.MaxRequestLen-40+4))}), "pass", "stun_malformed")
			add("attr overrun", f(frame{payload: mut(func(b []byte) []byte { b[23] = 0x30; return b })}), "pass", "stun_malformed")
			add("no attributes", f(frame{payload: func() []byte { b := bytes.Clone(req[:20]); b[3] = 0; return b }()}), "pass", "stun_not_tailscale")
			add("one empty attribute", f(frame{payload: func() []byte { b := append(bytes.Clone(req[:20]), 0x80, 0x01, 0, 0); b[3] = 4; return b }()}), "pass", "stun_not_tailscale")
			add("software only", f(frame{payload: func() []byte { b := bytes.Clone(req[:32]); b[3] = 12; return b }()}), "pass", "stun_fingerprint")
			add("required attr", f(frame{payload: stunWith(0x0006, "user")}), "pass", "stun_unknown_attr")
			add("wrong software", f(frame{payload: mut(func(b []byte) []byte { b[31] = 'f'; return b })}), "pass", "stun_not_tailscale")
			add("bad fingerprint", f(frame{payload: mut(func(b []byte) []byte { b[39] ^= 1; return b })}), "pass", "stun_fingerprint")
			full := f(frame{payload: req})
			iphdr := 20
			if fam.name == "v6" {
				iphdr = 40
			}
			add("truncated ip", full[:len(full)-len(req)-8-iphdr+10], "pass", "truncated")
			l3 := 14
			if vlan {
				l3 = 18
			}
			add("truncated udp", func() []byte {
				b := f(frame{payload: req})
				if fam.name == "v4" {
					b[l3+3] = 24 // tot_len: 4 bytes of UDP header
				} else {
					b[l3+5] = 4 // payload_len
				}
				return b
			}(), "pass", "truncated")
			add("udp len", func() []byte { b := f(frame{payload: req, pad: 4}); b[len(b)-4-len(req)-8+5] += 4; return b }(), "pass", "udp_len")
			add("ip length past frame", full[:len(full)-1], "pass", "bad_ip")
		}
	}
	cases = append(cases,
		pktCase{"arp", append(append(append([]byte{}, macB...), macA...), 0x08, 0x06, 0, 1), "pass", "not_ip"},
		pktCase{"runt", bytes.Repeat([]byte{0xff}, 14)[:14], "pass", "not_ip"},
		pktCase{"truncated vlan", append(append(append([]byte{}, macB...), macA...), 0x81, 0x00, 0), "pass", "truncated"},
		pktCase{"qinq", append(append(append([]byte{}, macB...), macA...), 0x88, 0xa8, 0, 1, 0x08, 0x00), "pass", "not_ip"},
	)
	return cases
}

// stunWith builds a Tailscale-like request with one extra attribute before
// SOFTWARE, and a correct FINGERPRINT.
func stunWith(typ uint16, val string) []byte {
	a := attr(typ, val)
	req := tsRequest()
	m := append(append(append([]byte{}, req[:20]...), a...), req[20:32]...)
	return fixFingerprint(m)
}

func TestPacketTable(t *testing.T) {
	cfg := Config{DERPPorts: []uint16{443}}
	x := loadTest(t, cfg)
	seen := map[string]bool{}
	for _, tc := range packetTable() {
		t.Run(tc.name, func(t *testing.T) {
			want := oracle(tc.frame, cfg)
			if want.verdict() != tc.verdict || want.reason != tc.reason {
				t.Fatalf("oracle says %s/%s, table says %s/%s", want.verdict(), want.reason, tc.verdict, tc.reason)
			}
			before := counterMap(t, x)
			ret, out := run(t, x, tc.frame)
			if ret != want.action {
				var moved []string
				for k, c := range counterMap(t, x) {
					if c.Packets != before[k].Packets {
						moved = append(moved, k)
					}
				}
				t.Fatalf("action %d, want %d (%s); counted %v", ret, want.action, tc.reason, moved)
			}
			if !bytes.Equal(out, want.out) {
				t.Fatalf("output\n got %x\nwant %x", out, want.out)
			}
			after := counterMap(t, x)
			key := want.af + "/" + tc.verdict + "/" + tc.reason
			seen[tc.verdict+"/"+tc.reason] = true
			for k, c := range after {
				d := c.Packets - before[k].Packets
				db := c.Bytes - before[k].Bytes
				if k == key {
					if d != 1 || db != uint64(len(tc.frame)) {
						t.Fatalf("counter %s: +%d packets +%d bytes, want +1 +%d", k, d, db, len(tc.frame))
					}
				} else if d != 0 {
					t.Fatalf("counter %s moved by %d", k, d)
				}
			}
			if _, ok := after[key]; !ok {
				t.Fatalf("counter %s not incremented", key)
			}
		})
	}
	_ = seen
}

// TestLabelTables checks the Go label tables against the enums of xderp.h.
func TestLabelTables(t *testing.T) {
	h := bpf.Header
	for _, tc := range []struct {
		prefix string
		labels []string
	}{{"XDERP_AF_", afLabels}, {"XDERP_VERDICT_", verdictLabels}, {"XDERP_REASON_", reasonLabels}} {
		re := regexp.MustCompile(`(?m)^\s*` + tc.prefix + `([A-Z0-9_]+),`)
		var got []string
		for _, m := range re.FindAllStringSubmatch(h, -1) {
			got = append(got, strings.ToLower(m[1]))
		}
		if len(got) == 0 || got[len(got)-1] != "max" {
			t.Fatalf("%s: no _MAX sentinel in %v", tc.prefix, got)
		}
		if fmt.Sprint(got[:len(got)-1]) != fmt.Sprint(tc.labels) {
			t.Errorf("%s: header %v, Go %v", tc.prefix, got[:len(got)-1], tc.labels)
		}
	}
}
