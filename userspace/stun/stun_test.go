package stun

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"net/netip"
	"strings"
	"testing"
)

func unhex(t testing.TB, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var exampleTx = TxID{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}

// The worked example of the protocol notes (§10.5), as a Tailscale client
// sends it.
const exampleRequest = "0001 0014 2112a442 0102030405060708090a0b0c 8022 0008 7461696c6e6f6465 8028 0004 b32c370f"

func TestWorkedExample(t *testing.T) {
	req := unhex(t, exampleRequest)
	if got := AppendRequest(nil, exampleTx); !bytes.Equal(got, req) {
		t.Fatalf("AppendRequest = %x, want %x", got, req)
	}
	tx, err := ParseBindingRequest(req)
	if err != nil {
		t.Fatalf("ParseBindingRequest: %v", err)
	}
	if tx != exampleTx {
		t.Fatalf("tx = %x", tx)
	}
	for _, tc := range []struct {
		addr string
		want string
	}{
		{"192.0.2.1:1025", "0101 000c 2112a442 0102030405060708090a0b0c 0020 0008 00 01 2513 e112a643"},
		{"[::ffff:192.0.2.1]:1025", "0101 000c 2112a442 0102030405060708090a0b0c 0020 0008 00 01 2513 e112a643"},
		{"[2001:db8::1]:1025", "0101 0018 2112a442 0102030405060708090a0b0c 0020 0014 00 02 2513 0113a9fa 0102030405060708090a0b0d"},
	} {
		ap := netip.MustParseAddrPort(tc.addr)
		got := AppendResponse([]byte("prefix"), tx, ap)
		want := append([]byte("prefix"), unhex(t, tc.want)...)
		if !bytes.Equal(got, want) {
			t.Errorf("%s: response %x, want %x", tc.addr, got, want)
		}
		if n := ResponseLen(ap.Addr()); n != len(want)-len("prefix") {
			t.Errorf("%s: ResponseLen %d", tc.addr, n)
		}
	}
	if got := AppendResponse(nil, tx, netip.AddrPort{}); len(got) != 0 {
		t.Errorf("invalid address appended %x", got)
	}
}

// build assembles a binding request from attributes; fp appends a correct
// FINGERPRINT.
func build(typ uint16, attrs [][]byte, fp bool) []byte {
	b := binary.BigEndian.AppendUint16(nil, typ)
	b = append(b, 0, 0)
	b = binary.BigEndian.AppendUint32(b, MagicCookie)
	b = append(b, exampleTx[:]...)
	for _, a := range attrs {
		b = append(b, a...)
	}
	n := len(b) - HeaderLen
	if fp {
		n += 8
	}
	binary.BigEndian.PutUint16(b[2:], uint16(n))
	if fp {
		c := crc32.ChecksumIEEE(b) ^ FingerprintXOR
		b = binary.BigEndian.AppendUint16(b, AttrFingerprint)
		b = binary.BigEndian.AppendUint16(b, 4)
		b = binary.BigEndian.AppendUint32(b, c)
	}
	return b
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

func TestAcceptanceRule(t *testing.T) {
	sw := attr(AttrSoftware, Software)
	good := build(TypeBindingRequest, [][]byte{sw}, true)
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(good)) }
	many := make([][]byte, 0, MaxAttributes)
	many = append(many, sw)
	for len(many) < MaxAttributes-1 {
		many = append(many, attr(0x8001, ""))
	}
	tooMany := append(append([][]byte(nil), many...), attr(0x8001, ""))
	big := build(TypeBindingRequest, [][]byte{sw, attr(0x8050, strings.Repeat("x", MaxRequestLen-HeaderLen-12-4-8))}, true)
	tooBig := build(TypeBindingRequest, [][]byte{sw, attr(0x8050, strings.Repeat("x", MaxRequestLen-HeaderLen-12-4-8+4))}, true)

	for _, tc := range []struct {
		name string
		b    []byte
		want error
	}{
		{"tailscale", good, nil},
		{"software after other optional attrs", build(TypeBindingRequest, [][]byte{attr(0x8023, "abc"), sw}, true), nil},
		{"max attributes", build(TypeBindingRequest, many, true), nil},
		{"max length", big, nil},
		{"empty", nil, ErrNotSTUN},
		{"short header", good[:19], ErrNotSTUN},
		{"top bits", mut(func(b []byte) []byte { b[0] |= 0x40; return b }), ErrNotSTUN},
		{"cookie", mut(func(b []byte) []byte { b[7] ^= 1; return b }), ErrNotSTUN},
		{"success type", mut(func(b []byte) []byte { b[1] = 0x01; b[0] = 0x01; return b }), ErrNotBindingRequest},
		{"indication", mut(func(b []byte) []byte { b[1] = 0x11; return b }), ErrNotBindingRequest},
		{"length too long", mut(func(b []byte) []byte { b[3] += 4; return b }), ErrMalformed},
		{"length too short", mut(func(b []byte) []byte { b[3] -= 4; return b }), ErrMalformed},
		{"trailing byte", append(bytes.Clone(good), 0), ErrMalformed},
		{"length not multiple of 4", mut(func(b []byte) []byte { b = append(b, 0, 0); b[3] += 2; return b }), ErrMalformed},
		{"too big", tooBig, ErrMalformed},
		{"too many attributes", build(TypeBindingRequest, tooMany, true), ErrMalformed},
		{"attribute overruns", mut(func(b []byte) []byte { b[HeaderLen+3] = 40; return b }), ErrMalformed},
		{"truncated attribute header", build(TypeBindingRequest, [][]byte{sw, {0x80, 0x01}}, false), ErrMalformed},
		{"no attributes", build(TypeBindingRequest, nil, false), ErrNotTailscale},
		{"comprehension-required", build(TypeBindingRequest, [][]byte{sw, attr(0x0006, "user")}, true), ErrUnknownAttribute},
		{"wrong software", build(TypeBindingRequest, [][]byte{attr(AttrSoftware, "tailnodf")}, true), ErrNotTailscale},
		{"software prefix", build(TypeBindingRequest, [][]byte{attr(AttrSoftware, "tailnode1")}, true), ErrNotTailscale},
		{"no fingerprint", build(TypeBindingRequest, [][]byte{sw}, false), ErrFingerprint},
		{"fingerprint not last", append(bytes.Clone(good[:HeaderLen]), append(good[HeaderLen+12:], good[HeaderLen:HeaderLen+12]...)...), ErrFingerprint},
		{"bad fingerprint", mut(func(b []byte) []byte { b[len(b)-1] ^= 1; return b }), ErrFingerprint},
		{"fingerprint covers txid", mut(func(b []byte) []byte { b[10] ^= 1; return b }), ErrFingerprint},
		{"fingerprint length 8", build(TypeBindingRequest, [][]byte{sw, attr(AttrFingerprint, "12345678")}, false), ErrFingerprint},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tx, err := ParseBindingRequest(tc.b)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if err == nil && tx != exampleTx {
				t.Fatalf("tx = %x", tx)
			}
			if err != nil && tx != (TxID{}) {
				t.Fatalf("tx %x returned with error", tx)
			}
		})
	}
}

func FuzzParseBindingRequest(f *testing.F) {
	f.Add(unhex(f, exampleRequest))
	f.Add(build(TypeBindingRequest, [][]byte{attr(0x8023, "abc"), attr(AttrSoftware, Software)}, true))
	f.Add(build(TypeBindingRequest, [][]byte{attr(0x0006, "user")}, true))
	f.Add(build(TypeBindingRequest, nil, false))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		tx, err := ParseBindingRequest(b)
		if err != nil {
			return
		}
		// Whatever is accepted is well formed by the rule.
		if len(b) > MaxRequestLen || len(b)%4 != 0 || !bytes.Equal(tx[:], b[8:20]) {
			t.Fatalf("accepted %x", b)
		}
		if !bytes.Contains(b, []byte(Software)) {
			t.Fatalf("accepted without software: %x", b)
		}
		for _, a := range []string{"192.0.2.1:1", "[2001:db8::7]:65535"} {
			ap := netip.MustParseAddrPort(a)
			r := AppendResponse(nil, tx, ap)
			if len(r) != ResponseLen(ap.Addr()) {
				t.Fatalf("response length %d", len(r))
			}
		}
	})
}
