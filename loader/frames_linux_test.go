//go:build linux

package loader

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
	"slices"

	"github.com/xderp/xderp/userspace/stun"
)

// Test frame builder and the Go oracle of the whole XDP program (with
// shaping off): same parse order, same reasons, response bytes built with
// userspace/stun.

var (
	macA = []byte{0x02, 0, 0, 0, 0, 0xa}
	macB = []byte{0x02, 0, 0, 0, 0, 0xb}
)

type frame struct {
	vlan      bool
	src, dst  netip.AddrPort
	proto     byte // 17 UDP (default), 6 TCP, other
	payload   []byte
	ipOptions int    // IPv4 option bytes (multiple of 4)
	tcpFlags  byte   // for proto 6
	zeroCsum  bool   // UDP checksum 0
	badCsum   bool   // UDP checksum wrong
	badIPCsum bool   // IPv4 header checksum wrong
	frag      uint16 // IPv4 frag_off field
	pad       int    // bytes of Ethernet padding after the IP packet
	ext       []byte // IPv6 extension header types to insert before proto
}

func csum(sum uint32, b []byte) uint32 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	return sum
}

func fold(sum uint32) uint16 {
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

func pseudoSum(src, dst netip.Addr, proto byte, l4len int) uint32 {
	s := csum(0, src.AsSlice())
	s = csum(s, dst.AsSlice())
	return s + uint32(proto) + uint32(l4len)
}

func (f frame) build() []byte {
	if f.proto == 0 {
		f.proto = 17
	}
	b := slices.Concat(macB, macA)
	et := uint16(0x0800)
	if f.src.Addr().Is6() {
		et = 0x86dd
	}
	if f.vlan {
		b = binary.BigEndian.AppendUint16(b, 0x8100)
		b = binary.BigEndian.AppendUint16(b, 42)
	}
	b = binary.BigEndian.AppendUint16(b, et)
	// L4
	var l4 []byte
	switch f.proto {
	case 17:
		l4 = binary.BigEndian.AppendUint16(nil, f.src.Port())
		l4 = binary.BigEndian.AppendUint16(l4, f.dst.Port())
		l4 = binary.BigEndian.AppendUint16(l4, uint16(8+len(f.payload)))
		l4 = append(l4, 0, 0)
		l4 = append(l4, f.payload...)
		c := ^fold(csum(pseudoSum(f.src.Addr(), f.dst.Addr(), 17, len(l4)), l4))
		if c == 0 {
			c = 0xffff
		}
		if f.badCsum {
			c ^= 0x0101
		}
		if f.zeroCsum {
			c = 0
		}
		binary.BigEndian.PutUint16(l4[6:], c)
	case 6:
		l4 = binary.BigEndian.AppendUint16(nil, f.src.Port())
		l4 = binary.BigEndian.AppendUint16(l4, f.dst.Port())
		l4 = append(l4, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, f.tcpFlags, 0xff, 0xff, 0, 0, 0, 0)
		l4 = append(l4, f.payload...)
		c := ^fold(csum(pseudoSum(f.src.Addr(), f.dst.Addr(), 6, len(l4)), l4))
		binary.BigEndian.PutUint16(l4[16:], c)
	default:
		l4 = slices.Clone(f.payload)
	}
	if f.src.Addr().Is4() {
		ihl := 20 + f.ipOptions
		ip := []byte{byte(0x40 | ihl/4), 0, 0, 0, 0x12, 0x34, 0, 0, 7, f.proto, 0, 0}
		binary.BigEndian.PutUint16(ip[2:], uint16(ihl+len(l4)))
		binary.BigEndian.PutUint16(ip[6:], f.frag)
		ip = append(ip, f.src.Addr().AsSlice()...)
		ip = append(ip, f.dst.Addr().AsSlice()...)
		for i := 0; i < f.ipOptions; i++ {
			ip = append(ip, 1) // NOP
		}
		c := ^fold(csum(0, ip))
		if f.badIPCsum {
			c ^= 0x0101
		}
		binary.BigEndian.PutUint16(ip[10:], c)
		b = append(b, ip...)
	} else {
		var ext []byte
		next := f.proto
		for i := len(f.ext) - 1; i >= 0; i-- {
			h := make([]byte, 8)
			h[0] = next
			ext = append(h, ext...)
			next = f.ext[i]
		}
		ip := []byte{0x60, 0, 0, 0, 0, 0, next, 9}
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ext)+len(l4)))
		ip = append(ip, f.src.Addr().AsSlice()...)
		ip = append(ip, f.dst.Addr().AsSlice()...)
		b = append(b, ip...)
		b = append(b, ext...)
	}
	b = append(b, l4...)
	return append(b, make([]byte, f.pad)...)
}

// Program verdicts as XDP actions.
const (
	xdpAborted = 0
	xdpDrop    = 1
	xdpPass    = 2
	xdpTX      = 3
)

type outcome struct {
	action uint32
	af     string
	reason string
	out    []byte // frame after the program (for TX: the response)
}

func (o outcome) verdict() string {
	return map[uint32]string{xdpAborted: "aborted", xdpDrop: "drop", xdpPass: "pass", xdpTX: "tx"}[o.action]
}

func has(ports []uint16, p uint16) bool { return slices.Contains(ports, p) }

// oracle is the Go model of the program for cfg with shaping off.
func oracle(b []byte, cfg Config) outcome {
	cfg, _ = cfg.validate()
	n := len(b)
	af := "unknown"
	pass := func(r string) outcome { return outcome{xdpPass, af, r, b} }
	if n < 14 {
		return pass("truncated")
	}
	et := binary.BigEndian.Uint16(b[12:])
	l3 := 14
	if et == 0x8100 {
		if n < 18 {
			return pass("truncated")
		}
		et = binary.BigEndian.Uint16(b[16:])
		l3 = 18
	}
	var (
		l4, ipEnd int
		proto     byte
		src, dst  netip.Addr
	)
	switch et {
	case 0x0800:
		af = "ipv4"
		if n < l3+20 {
			return pass("truncated")
		}
		ihl := int(b[l3]&0xf) * 4
		tot := int(binary.BigEndian.Uint16(b[l3+2:]))
		if b[l3]>>4 != 4 || ihl < 20 || tot < ihl || l3+tot > n {
			return pass("bad_ip")
		}
		if binary.BigEndian.Uint16(b[l3+6:])&0x3fff != 0 {
			return pass("fragment")
		}
		l4, ipEnd, proto = l3+ihl, l3+tot, b[l3+9]
		src, dst = netip.AddrFrom4([4]byte(b[l3+12:])), netip.AddrFrom4([4]byte(b[l3+16:]))
		if proto == 6 {
			if l4+20 > n || l4+20 > ipEnd {
				return pass("truncated")
			}
			return tcpOracle(b, l4, cfg, pass)
		}
		if proto != 17 {
			return pass("other_proto")
		}
		if l4+8 > n || l4+8 > ipEnd {
			return pass("truncated")
		}
		if !has(cfg.STUNPorts, binary.BigEndian.Uint16(b[l4+2:])) {
			return pass("udp_other_port")
		}
		if ihl != 20 {
			return pass("ip_options")
		}
		if cfg.DropSTUN {
			return outcome{xdpDrop, af, "stun_dropped", b}
		}
		if fold(csum(0, b[l3:l3+20])) != 0xffff {
			return pass("ip_csum")
		}
		if u := int(binary.BigEndian.Uint16(b[l4+4:])); u != tot-20 || u < 8 {
			return pass("udp_len")
		}
	case 0x86dd:
		af = "ipv6"
		if n < l3+40 {
			return pass("truncated")
		}
		plen := int(binary.BigEndian.Uint16(b[l3+4:]))
		if b[l3]>>4 != 6 || l3+40+plen > n {
			return pass("bad_ip")
		}
		l4, ipEnd, proto = l3+40, l3+40+plen, b[l3+6]
		src, dst = netip.AddrFrom16([16]byte(b[l3+8:])), netip.AddrFrom16([16]byte(b[l3+24:]))
		if proto == 17 {
			if l4+8 > n || plen < 8 {
				return pass("truncated")
			}
			if !has(cfg.STUNPorts, binary.BigEndian.Uint16(b[l4+2:])) {
				return pass("udp_other_port")
			}
			if cfg.DropSTUN {
				return outcome{xdpDrop, af, "stun_dropped", b}
			}
			if u := int(binary.BigEndian.Uint16(b[l4+4:])); u != plen || u < 8 {
				return pass("udp_len")
			}
			break
		}
		for range 4 {
			if proto != 0 && proto != 43 && proto != 60 {
				break
			}
			if l4+2 > n {
				return pass("truncated")
			}
			proto = b[l4]
			l4 += (int(b[l4+1]) + 1) * 8
		}
		switch proto {
		case 44:
			return pass("fragment")
		case 6:
			if l4+20 > n || l4+20 > ipEnd {
				return pass("truncated")
			}
			return tcpOracle(b, l4, cfg, pass)
		case 17, 0, 43, 60:
			return pass("ipv6_ext")
		}
		return pass("other_proto")
	default:
		return pass("not_ip")
	}

	// The STUN path: UDP to a STUN port, IP and UDP headers valid.
	udp := b[l4:ipEnd]
	m := udp[8:]
	switch {
	case len(m) < 20 || m[0]&0xc0 != 0 || binary.BigEndian.Uint32(m[4:]) != stun.MagicCookie:
		return pass("stun_not_stun")
	case binary.BigEndian.Uint16(m) != stun.TypeBindingRequest:
		return pass("stun_not_binding")
	case len(m) > stun.MaxRequestLen || int(binary.BigEndian.Uint16(m[2:])) != len(m)-20 || len(m)%4 != 0:
		return pass("stun_malformed")
	}
	if ck := binary.BigEndian.Uint16(udp[6:]); ck != 0 || af == "ipv6" {
		if ck == 0 || fold(csum(pseudoSum(src, dst, 17, len(udp)), udp)) != 0xffff {
			return pass("udp_csum")
		}
	}
	tx, err := stun.ParseBindingRequest(m)
	switch {
	case errors.Is(err, stun.ErrMalformed):
		return pass("stun_malformed")
	case errors.Is(err, stun.ErrUnknownAttribute):
		return pass("stun_unknown_attr")
	case errors.Is(err, stun.ErrNotTailscale):
		return pass("stun_not_tailscale")
	case errors.Is(err, stun.ErrFingerprint):
		return pass("stun_fingerprint")
	case err != nil:
		panic("oracle: unexpected " + err.Error())
	}
	sport := binary.BigEndian.Uint16(udp[0:])
	dport := binary.BigEndian.Uint16(udp[2:])
	payload := stun.AppendResponse(nil, tx, netip.AddrPortFrom(src, sport))
	return outcome{xdpTX, af, "stun_answered", response(b[:l3], b[l3:l4], src, dst, sport, dport, payload)}
}

func tcpOracle(b []byte, l4 int, cfg Config, pass func(string) outcome) outcome {
	if !has(cfg.DERPPorts, binary.BigEndian.Uint16(b[l4+2:])) {
		return pass("tcp_other_port")
	}
	if cfg.Shaping.Enabled() {
		panic("oracle: shaping is not modelled")
	}
	return pass("shaping_off")
}

// response builds the expected TX frame: l2 and ip are the request's headers.
func response(l2, ip []byte, src, dst netip.Addr, sport, dport uint16, payload []byte) []byte {
	out := slices.Concat(l2[6:12], l2[0:6], l2[12:])
	if src.Is4() {
		h := slices.Clone(ip[:20])
		binary.BigEndian.PutUint16(h[2:], uint16(20+8+len(payload)))
		h[8] = 64
		copy(h[12:], dst.AsSlice())
		copy(h[16:], src.AsSlice())
		h[10], h[11] = 0, 0
		binary.BigEndian.PutUint16(h[10:], ^fold(csum(0, h)))
		out = append(out, h...)
	} else {
		h := slices.Clone(ip[:40])
		binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
		h[7] = 64
		copy(h[8:], dst.AsSlice())
		copy(h[24:], src.AsSlice())
		out = append(out, h...)
	}
	u := binary.BigEndian.AppendUint16(nil, dport)
	u = binary.BigEndian.AppendUint16(u, sport)
	u = binary.BigEndian.AppendUint16(u, uint16(8+len(payload)))
	u = append(u, 0, 0)
	u = append(u, payload...)
	c := ^fold(csum(pseudoSum(dst, src, 17, len(u)), u))
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return append(out, u...)
}

func attr(typ uint16, val string) []byte {
	b := binary.BigEndian.AppendUint16(nil, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(val)))
	b = append(b, val...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// fixFingerprint sets the header length of m (without FINGERPRINT) and
// appends a correct FINGERPRINT.
func fixFingerprint(m []byte) []byte {
	binary.BigEndian.PutUint16(m[2:], uint16(len(m)-20+8))
	c := crc32IEEE(m) ^ stun.FingerprintXOR
	m = binary.BigEndian.AppendUint16(m, stun.AttrFingerprint)
	m = binary.BigEndian.AppendUint16(m, 4)
	return binary.BigEndian.AppendUint32(m, c)
}
func crc32IEEE(b []byte) uint32 { return crc32.ChecksumIEEE(b) }
