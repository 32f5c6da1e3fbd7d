// Package stun owns xderp's STUN codec: it decides whether a datagram is a
// binding request xderp answers, and builds the Binding Success Response.
//
// It is pure (no I/O) and exact: the XDP program in bpf/ implements the same
// acceptance rule and must produce byte-identical responses, and the BPF tests
// use this package as their oracle.
//
// # Acceptance rule
//
// A datagram b is answered if and only if all of the following hold, checked
// in this order (the first failing check decides the error):
//
//  1. len(b) >= 20, the top two bits of b[0] are zero and b[4:8] is the magic
//     cookie 0x2112A442. Otherwise [ErrNotSTUN].
//  2. The message type b[0:2] is 0x0001 (Binding Request). Otherwise
//     [ErrNotBindingRequest].
//  3. len(b) <= [MaxRequestLen], the header length field equals len(b)-20 and
//     is a multiple of 4. Otherwise [ErrMalformed].
//  4. The attributes walk cleanly: each has a 4-byte header and a value padded
//     to 4 bytes that fits in the message, and there are at most
//     [MaxAttributes] of them. Otherwise [ErrMalformed].
//  5. No attribute is comprehension-required (type < 0x8000): xderp knows none
//     in a request (it cannot check MESSAGE-INTEGRITY or USERNAME) and sends no
//     error responses, so it ignores such requests. Otherwise
//     [ErrUnknownAttribute]. Steps 4 and 5 are applied attribute by attribute,
//     in message order.
//  6. Some attribute is SOFTWARE (0x8022) with the exact value "tailnode".
//     Otherwise [ErrNotTailscale]. A request without attributes fails here.
//  7. The last attribute is FINGERPRINT (0x8028) with length 4 and value
//     CRC-32(b[:len(b)-8]) XOR 0x5354554E. Otherwise [ErrFingerprint].
//
// Every request a Tailscale client sends (40 bytes: SOFTWARE "tailnode" then
// FINGERPRINT) passes. Other comprehension-optional attributes are allowed
// anywhere before FINGERPRINT.
package stun

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
)

// TxID is a STUN transaction ID.
type TxID [12]byte

const (
	// HeaderLen is the size of the STUN message header.
	HeaderLen = 20
	// MaxRequestLen is the largest binding request answered, header included.
	// (A Tailscale request is 40 bytes; the bound keeps the XDP program's
	// verification cheap.)
	MaxRequestLen = 128
	// MaxAttributes is the largest number of attributes in an answered request.
	MaxAttributes = 16

	// MagicCookie is the RFC 5389 magic cookie.
	MagicCookie = 0x2112A442
	// FingerprintXOR is XORed into the CRC-32 of a FINGERPRINT attribute.
	FingerprintXOR = 0x5354554E

	// TypeBindingRequest and TypeBindingSuccess are message types.
	TypeBindingRequest = 0x0001
	TypeBindingSuccess = 0x0101

	// Attribute types.
	AttrXORMappedAddress = 0x0020
	AttrSoftware         = 0x8022
	AttrFingerprint      = 0x8028

	// Software is the SOFTWARE value Tailscale clients send.
	Software = "tailnode"
)

// Sentinel errors of ParseBindingRequest, one per step of the acceptance rule.
var (
	ErrNotSTUN           = errors.New("stun: not a stun message")
	ErrNotBindingRequest = errors.New("stun: not a binding request")
	ErrMalformed         = errors.New("stun: malformed binding request")
	ErrUnknownAttribute  = errors.New("stun: comprehension-required attribute in request")
	ErrNotTailscale      = errors.New("stun: no SOFTWARE attribute \"tailnode\"")
	ErrFingerprint       = errors.New("stun: missing or wrong FINGERPRINT")
)

// ParseBindingRequest validates b as a STUN binding request by the acceptance
// rule in the package documentation and returns its transaction ID.
func ParseBindingRequest(b []byte) (TxID, error) {
	var tx TxID
	if len(b) < HeaderLen || b[0]&0xC0 != 0 || binary.BigEndian.Uint32(b[4:8]) != MagicCookie {
		return tx, ErrNotSTUN
	}
	if binary.BigEndian.Uint16(b[0:2]) != TypeBindingRequest {
		return tx, ErrNotBindingRequest
	}
	n := len(b) - HeaderLen
	if len(b) > MaxRequestLen || int(binary.BigEndian.Uint16(b[2:4])) != n || n%4 != 0 {
		return tx, ErrMalformed
	}
	var (
		software bool
		lastType uint16
		lastOff  int
	)
	off := HeaderLen
	for i := 0; off < len(b); i++ {
		if i == MaxAttributes || len(b)-off < 4 {
			return tx, ErrMalformed
		}
		typ := binary.BigEndian.Uint16(b[off:])
		alen := int(binary.BigEndian.Uint16(b[off+2:]))
		padded := (alen + 3) &^ 3
		if padded > len(b)-off-4 {
			return tx, ErrMalformed
		}
		if typ < 0x8000 {
			return tx, ErrUnknownAttribute
		}
		if typ == AttrSoftware && alen == len(Software) && string(b[off+4:off+4+alen]) == Software {
			software = true
		}
		lastType, lastOff = typ, off
		off += 4 + padded
	}
	if !software {
		return tx, ErrNotTailscale
	}
	if lastType != AttrFingerprint || binary.BigEndian.Uint16(b[lastOff+2:]) != 4 ||
		binary.BigEndian.Uint32(b[lastOff+4:]) != crc32.ChecksumIEEE(b[:lastOff])^FingerprintXOR {
		return tx, ErrFingerprint
	}
	copy(tx[:], b[8:20])
	return tx, nil
}

// ResponseLen returns the length of the response AppendResponse builds for
// addr: 32 bytes for IPv4 (and IPv4-mapped IPv6), 44 for IPv6, 0 if invalid.
func ResponseLen(addr netip.Addr) int {
	switch {
	case !addr.IsValid():
		return 0
	case addr.Unmap().Is4():
		return HeaderLen + 12
	default:
		return HeaderLen + 24
	}
}

// AppendResponse appends the Binding Success Response for tx with an
// XOR-MAPPED-ADDRESS for addr; an IPv4-mapped IPv6 address is unmapped to the
// IPv4 family. The response carries no other attribute. An invalid addr
// appends nothing.
func AppendResponse(dst []byte, tx TxID, addr netip.AddrPort) []byte {
	ip := addr.Addr().Unmap()
	if !ip.IsValid() {
		return dst
	}
	fam, alen := byte(1), 4
	if ip.Is6() {
		fam, alen = 2, 16
	}
	dst = binary.BigEndian.AppendUint16(dst, TypeBindingSuccess)
	dst = binary.BigEndian.AppendUint16(dst, uint16(8+alen))
	dst = binary.BigEndian.AppendUint32(dst, MagicCookie)
	dst = append(dst, tx[:]...)
	dst = binary.BigEndian.AppendUint16(dst, AttrXORMappedAddress)
	dst = binary.BigEndian.AppendUint16(dst, uint16(4+alen))
	dst = append(dst, 0, fam)
	dst = binary.BigEndian.AppendUint16(dst, addr.Port()^uint16(MagicCookie>>16))
	var key [16]byte
	binary.BigEndian.PutUint32(key[:4], MagicCookie)
	copy(key[4:], tx[:])
	a16 := ip.As16()
	raw := a16[16-alen:]
	for i, b := range raw {
		dst = append(dst, b^key[i])
	}
	return dst
}

// AppendRequest appends a binding request as a Tailscale client sends it:
// SOFTWARE "tailnode" then FINGERPRINT, 40 bytes. Tests and tools use it.
func AppendRequest(dst []byte, tx TxID) []byte {
	start := len(dst)
	dst = binary.BigEndian.AppendUint16(dst, TypeBindingRequest)
	dst = binary.BigEndian.AppendUint16(dst, 20)
	dst = binary.BigEndian.AppendUint32(dst, MagicCookie)
	dst = append(dst, tx[:]...)
	dst = binary.BigEndian.AppendUint16(dst, AttrSoftware)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(Software)))
	dst = append(dst, Software...)
	fp := crc32.ChecksumIEEE(dst[start:]) ^ FingerprintXOR
	dst = binary.BigEndian.AppendUint16(dst, AttrFingerprint)
	dst = binary.BigEndian.AppendUint16(dst, 4)
	return binary.BigEndian.AppendUint32(dst, fp)
}
