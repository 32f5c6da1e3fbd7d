package derp

import (
	"crypto/rand"
	"crypto/subtle"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/curve25519"
)

// Text prefixes used by Tailscale for typed keys.
const (
	privateKeyPrefix = "privkey:"
	publicKeyPrefix  = "nodekey:"
)

// PublicKey is a Curve25519 public key (a node key or a server key).
type PublicKey [KeyLen]byte

// PrivateKey is a clamped Curve25519 private key.
type PrivateKey [KeyLen]byte

// NewPrivateKey returns a fresh random private key, clamped as X25519
// requires.
func NewPrivateKey() (PrivateKey, error) {
	var k PrivateKey
	if _, err := rand.Read(k[:]); err != nil {
		return PrivateKey{}, fmt.Errorf("derp: generate private key: %w", err)
	}
	k.clamp()
	return k, nil
}

func (k *PrivateKey) clamp() {
	k[0] &= 248
	k[31] = (k[31] & 127) | 64
}

// IsZero reports whether k is all zeros (no key).
func (k PrivateKey) IsZero() bool { return k == PrivateKey{} }

// Public returns the public key of k.
func (k PrivateKey) Public() PublicKey {
	var pub PublicKey
	out, err := curve25519.X25519(k[:], curve25519.Basepoint)
	if err != nil {
		// Only a low-order result can fail, which a basepoint
		// multiplication never produces.
		panic("derp: X25519 basepoint multiplication failed: " + err.Error())
	}
	copy(pub[:], out)
	return pub
}

// Equal compares two private keys in constant time.
func (k PrivateKey) Equal(o PrivateKey) bool { return subtle.ConstantTimeCompare(k[:], o[:]) == 1 }

// MarshalText encodes k as "privkey:<64 hex>" (the derper key file form).
func (k PrivateKey) MarshalText() ([]byte, error) {
	return []byte(privateKeyPrefix + hex.EncodeToString(k[:])), nil
}

// UnmarshalText parses "privkey:<64 hex>".
func (k *PrivateKey) UnmarshalText(b []byte) error {
	p, err := ParsePrivateKey(string(b))
	if err != nil {
		return err
	}
	*k = p
	return nil
}

// String hides the key material.
func (k PrivateKey) String() string { return "privkey:<redacted>" }

// ParsePrivateKey parses "privkey:<64 hex>" (the prefix is required, as in
// derper's key file).
func ParsePrivateKey(s string) (PrivateKey, error) {
	var k PrivateKey
	rest, ok := strings.CutPrefix(s, privateKeyPrefix)
	if !ok {
		return k, errors.New(`derp: private key must start with "privkey:"`)
	}
	if err := decodeHexKey(k[:], rest); err != nil {
		return k, fmt.Errorf("derp: private key: %w", err)
	}
	return k, nil
}

// IsZero reports whether k is all zeros.
func (k PublicKey) IsZero() bool { return k == PublicKey{} }

// String returns the key as 64 lowercase hex digits.
func (k PublicKey) String() string { return hex.EncodeToString(k[:]) }

// ShortString returns the first five hex digits in brackets, for logs.
func (k PublicKey) ShortString() string { return "[" + hex.EncodeToString(k[:3])[:5] + "]" }

// MarshalText encodes k as "nodekey:<64 hex>".
func (k PublicKey) MarshalText() ([]byte, error) {
	return []byte(publicKeyPrefix + hex.EncodeToString(k[:])), nil
}

// UnmarshalText accepts "nodekey:<64 hex>" or bare 64 hex digits.
func (k *PublicKey) UnmarshalText(b []byte) error {
	p, err := ParsePublicKey(string(b))
	if err != nil {
		return err
	}
	*k = p
	return nil
}

// ParsePublicKey parses 64 hex digits, optionally prefixed with "nodekey:".
func ParsePublicKey(s string) (PublicKey, error) {
	var k PublicKey
	s = strings.TrimPrefix(s, publicKeyPrefix)
	if err := decodeHexKey(k[:], s); err != nil {
		return k, fmt.Errorf("derp: public key: %w", err)
	}
	return k, nil
}

func decodeHexKey(dst []byte, s string) error {
	if len(s) != 2*len(dst) {
		return fmt.Errorf("want %d hex digits, got %d characters", 2*len(dst), len(s))
	}
	if _, err := hex.Decode(dst, []byte(s)); err != nil {
		return fmt.Errorf("invalid hex: %w", err)
	}
	return nil
}

// keyFile is derper's -c file: {"PrivateKey":"privkey:<64 hex>"}.
type keyFile struct {
	PrivateKey PrivateKey
}

// LoadOrCreateKeyFile reads a derper-compatible key file. If the file does
// not exist it generates a key and creates the file atomically (temporary
// file in the same directory, fsync, rename) with mode 0600, creating the
// directory (0700) if needed. Errors name the file and the problem.
func LoadOrCreateKeyFile(path string) (PrivateKey, error) {
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return createKeyFile(path)
	case err != nil:
		return PrivateKey{}, fmt.Errorf("key file %s: %w", path, err)
	}
	var kf struct {
		PrivateKey *string
	}
	if err := json.Unmarshal(b, &kf); err != nil {
		return PrivateKey{}, fmt.Errorf("key file %s: not JSON: %w", path, err)
	}
	if kf.PrivateKey == nil {
		return PrivateKey{}, fmt.Errorf("key file %s: no PrivateKey field", path)
	}
	k, err := ParsePrivateKey(*kf.PrivateKey)
	if err != nil {
		return PrivateKey{}, fmt.Errorf("key file %s: PrivateKey: %w", path, err)
	}
	if k.IsZero() {
		return PrivateKey{}, fmt.Errorf("key file %s: PrivateKey is all zeros", path)
	}
	return k, nil
}

func createKeyFile(path string) (PrivateKey, error) {
	k, err := NewPrivateKey()
	if err != nil {
		return PrivateKey{}, err
	}
	b, err := json.MarshalIndent(keyFile{PrivateKey: k}, "", "\t")
	if err != nil {
		return PrivateKey{}, fmt.Errorf("key file %s: encode: %w", path, err)
	}
	if err := writeFileAtomic(path, append(b, '\n'), 0o600); err != nil {
		return PrivateKey{}, fmt.Errorf("key file %s: create: %w", path, err)
	}
	return k, nil
}

func writeFileAtomic(path string, data []byte, mode os.FileMode) (err error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if err = f.Chmod(mode); err != nil {
		return err
	}
	if _, err = f.Write(data); err != nil {
		return err
	}
	if err = f.Sync(); err != nil {
		return err
	}
	if err = f.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp, path); err != nil {
		return err
	}
	if d, derr := os.Open(dir); derr == nil {
		d.Sync() // best effort: make the rename durable
		d.Close()
	}
	return nil
}
