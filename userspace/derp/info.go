package derp

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/crypto/nacl/box"
)

// MeshKey is the pre-shared key that grants mesh privileges. In JSON it is
// a string of 64 hex digits; any other length is an error, which makes the
// whole ClientInfo invalid (as with the reference server).
type MeshKey [32]byte

// ErrInvalidMeshKey reports a mesh key that is not 64 hex digits.
var ErrInvalidMeshKey = errors.New("derp: invalid mesh key")

// ParseMeshKey parses 64 hex digits, ignoring surrounding white space.
func ParseMeshKey(s string) (MeshKey, error) {
	var k MeshKey
	s = strings.TrimSpace(s)
	if len(s) != 64 {
		return k, fmt.Errorf("%w: want 64 hex digits, got %d characters", ErrInvalidMeshKey, len(s))
	}
	if _, err := hex.Decode(k[:], []byte(s)); err != nil {
		return k, fmt.Errorf("%w: %v", ErrInvalidMeshKey, err)
	}
	return k, nil
}

// IsZero reports whether k is unset.
func (k MeshKey) IsZero() bool { return k == MeshKey{} }

// Equal compares two mesh keys in constant time.
func (k MeshKey) Equal(o MeshKey) bool { return subtle.ConstantTimeCompare(k[:], o[:]) == 1 }

// String returns 64 hex digits.
func (k MeshKey) String() string { return hex.EncodeToString(k[:]) }

// MarshalJSON encodes k as a hex string.
func (k MeshKey) MarshalJSON() ([]byte, error) { return json.Marshal(k.String()) }

// UnmarshalJSON decodes a 64-hex-digit string. JSON null leaves k unset.
func (k *MeshKey) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("%w: not a string", ErrInvalidMeshKey)
	}
	if len(s) != 64 {
		return fmt.Errorf("%w: want 64 hex digits, got %d characters", ErrInvalidMeshKey, len(s))
	}
	p, err := ParseMeshKey(s)
	if err != nil {
		return err
	}
	*k = p
	return nil
}

// ClientInfo is the JSON document a client seals into its ClientInfo frame.
// Field names match what Tailscale clients send; encoding/json matches them
// case-insensitively when decoding, as the reference server does.
type ClientInfo struct {
	// MeshKey is set only by privileged (mesh) clients.
	MeshKey MeshKey `json:"meshKey,omitzero"`
	// Version is the client's protocol version (2 for current clients).
	Version int `json:"version,omitempty"`
	// CanAckPings says the client answers server Pings with Pongs.
	CanAckPings bool
	// IsProber marks monitoring clients.
	IsProber bool `json:",omitempty"`
	// AppName is an opaque label for statistics.
	AppName string `json:",omitempty"`
}

// ServerInfo is the JSON document the server seals into its ServerInfo
// frame.
type ServerInfo struct {
	Version int `json:"version,omitempty"`
	// TokenBucketBytesPerSecond, if non-zero, asks the client to limit its
	// sending to this rate (counting frame overhead).
	TokenBucketBytesPerSecond int `json:",omitempty"`
	// TokenBucketBytesBurst is the bucket size for the above.
	TokenBucketBytesBurst int `json:",omitempty"`
}

// Seal encrypts plaintext from priv to peer with a random nonce and returns
// nonce || box (BoxOverhead + len(plaintext) bytes).
func Seal(priv PrivateKey, peer PublicKey, plaintext []byte) ([]byte, error) {
	var nonce [NonceLen]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return nil, fmt.Errorf("derp: nonce: %w", err)
	}
	return SealWithNonce(nil, priv, peer, nonce, plaintext), nil
}

// SealWithNonce appends nonce || box to b using the given nonce. Callers
// must never reuse a nonce with the same key pair; it exists for
// reproducible tests.
func SealWithNonce(b []byte, priv PrivateKey, peer PublicKey, nonce [NonceLen]byte, plaintext []byte) []byte {
	b = append(b, nonce[:]...)
	pk, sk := [32]byte(peer), [32]byte(priv)
	return box.Seal(b, plaintext, &nonce, &pk, &sk)
}

// Open authenticates and decrypts a nonce || box message sent by peer to
// priv. It fails with ErrBoxOpen.
func Open(priv PrivateKey, peer PublicKey, sealed []byte) ([]byte, error) {
	if len(sealed) < BoxOverhead {
		return nil, fmt.Errorf("%w: %d bytes, shorter than %d", ErrBoxOpen, len(sealed), BoxOverhead)
	}
	nonce := [NonceLen]byte(sealed[:NonceLen])
	pk, sk := [32]byte(peer), [32]byte(priv)
	out, ok := box.Open(nil, sealed[NonceLen:], &nonce, &pk, &sk)
	if !ok {
		return nil, ErrBoxOpen
	}
	return out, nil
}

// AppendServerKey appends a ServerKey frame announcing pub.
func AppendServerKey(b []byte, pub PublicKey) []byte {
	b = AppendFrameHeader(b, FrameServerKey, uint32(len(Magic)+KeyLen))
	return append(append(b, Magic...), pub[:]...)
}

// ParseServerKey checks the magic of a ServerKey payload and returns the
// server key. Bytes after the key are ignored.
func ParseServerKey(p []byte) (PublicKey, error) {
	if len(p) < len(Magic)+KeyLen {
		return PublicKey{}, malformed("ServerKey payload of %d bytes, want at least %d", len(p), len(Magic)+KeyLen)
	}
	if string(p[:len(Magic)]) != Magic {
		return PublicKey{}, ErrBadMagic
	}
	return PublicKey(p[len(Magic) : len(Magic)+KeyLen]), nil
}

// AppendClientInfo appends a ClientInfo frame: the client's public key and
// info sealed from client to server.
func AppendClientInfo(b []byte, client PrivateKey, server PublicKey, info *ClientInfo) ([]byte, error) {
	msg, err := json.Marshal(info)
	if err != nil {
		return nil, fmt.Errorf("derp: encode client info: %w", err)
	}
	sealed, err := Seal(client, server, msg)
	if err != nil {
		return nil, err
	}
	pub := client.Public()
	b = AppendFrameHeader(b, FrameClientInfo, uint32(KeyLen+len(sealed)))
	return append(append(b, pub[:]...), sealed...), nil
}

// OpenClientInfo authenticates a ClientInfo payload with the server's
// private key and returns the client's key and info. A box that does not
// open wraps ErrBoxOpen; anything else wrong wraps ErrMalformed.
func OpenClientInfo(server PrivateKey, p []byte) (PublicKey, *ClientInfo, error) {
	if len(p) < MinClientInfoLen {
		return PublicKey{}, nil, malformed("ClientInfo payload of %d bytes, want at least %d", len(p), MinClientInfoLen)
	}
	if len(p) > MaxClientInfoLen {
		return PublicKey{}, nil, malformed("ClientInfo payload of %d bytes, limit %d", len(p), MaxClientInfoLen)
	}
	client := PublicKey(p[:KeyLen])
	msg, err := Open(server, client, p[KeyLen:])
	if err != nil {
		return client, nil, fmt.Errorf("client info from %s: %w", client.ShortString(), err)
	}
	info := new(ClientInfo)
	if err := json.Unmarshal(msg, info); err != nil {
		return client, nil, malformed("client info JSON: %v", err)
	}
	return client, info, nil
}

// AppendServerInfo appends a ServerInfo frame sealed from server to client.
func AppendServerInfo(b []byte, server PrivateKey, client PublicKey, info *ServerInfo) ([]byte, error) {
	msg, err := json.Marshal(info)
	if err != nil {
		return nil, fmt.Errorf("derp: encode server info: %w", err)
	}
	sealed, err := Seal(server, client, msg)
	if err != nil {
		return nil, err
	}
	return AppendFrame(b, FrameServerInfo, sealed), nil
}

// OpenServerInfo authenticates a ServerInfo payload (client side).
func OpenServerInfo(client PrivateKey, server PublicKey, p []byte) (*ServerInfo, error) {
	if len(p) < MinServerInfoLen || len(p) > MaxServerInfoLen {
		return nil, malformed("ServerInfo payload of %d bytes", len(p))
	}
	msg, err := Open(client, server, p)
	if err != nil {
		return nil, fmt.Errorf("server info: %w", err)
	}
	info := new(ServerInfo)
	if err := json.Unmarshal(msg, info); err != nil {
		return nil, malformed("server info JSON: %v", err)
	}
	return info, nil
}
