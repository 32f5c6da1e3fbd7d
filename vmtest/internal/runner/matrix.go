// Package runner owns the vmtest machinery: the kernel matrix, fetching and
// caching kernels, building test binaries, packing the initramfs, booting
// QEMU, and turning what the guest reports into per-kernel results.
package runner

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Source types a kernel entry may name.
const (
	SourceApt   = "apt"   // a Debian linux-image package fetched with apt-get download
	SourceGoMod = "gomod" // a Go module carrying a vmlinuz (gokrazy)
	SourceHost  = "host"  // the running kernel: binaries run directly, no VM
)

// Matrix is the kernel matrix file (vmtest/kernels.json).
type Matrix struct {
	Comment string `json:"comment,omitempty"`
	// Modules are loaded in every guest whose kernel has them as loadable
	// modules, with their dependencies; built-in ones need nothing.
	Modules []string `json:"modules"`
	// Tools are host programs copied into every guest with their shared
	// libraries (for tests that run ethtool or iproute2's ip).
	Tools   []string `json:"tools,omitempty"`
	Kernels []Kernel `json:"kernels"`
}

// Kernel is one entry of the matrix.
type Kernel struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// Floor marks the oldest kernel we test: the supported floor.
	Floor  bool   `json:"floor,omitempty"`
	Source Source `json:"source"`
	// Missing lists kernel features this kernel is expected to lack
	// (passed to the guest as XDERP_VMTEST_MISSING).
	Missing []string `json:"missing"`
}

// Source says where a kernel comes from and pins it.
type Source struct {
	Type string `json:"type"`
	// apt: package and exact version, the suite it lives in (for messages),
	// and the sha256 of the .deb.
	Package string `json:"package,omitempty"`
	Version string `json:"version,omitempty"`
	Suite   string `json:"suite,omitempty"`
	// gomod: module path, exact version (also Version), the go.sum "h1:"
	// hash of the module zip, and the sha256 of its vmlinuz (SHA256).
	Module string `json:"module,omitempty"`
	Sum    string `json:"sum,omitempty"`
	SHA256 string `json:"sha256,omitempty"`
}

var (
	nameRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]*$`)
	sha256RE = regexp.MustCompile(`^[0-9a-f]{64}$`)
)

// LoadMatrix reads and validates a matrix file.
func LoadMatrix(path string) (*Matrix, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read kernel matrix: %w", err)
	}
	m, err := ParseMatrix(b)
	if err != nil {
		return nil, fmt.Errorf("kernel matrix %s: %w", path, err)
	}
	return m, nil
}

// ParseMatrix decodes and validates a matrix; errors name the offending field.
func ParseMatrix(b []byte) (*Matrix, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var m Matrix
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if err := m.validate(); err != nil {
		return nil, err
	}
	return &m, nil
}

func (m *Matrix) validate() error {
	if len(m.Kernels) == 0 {
		return fmt.Errorf("kernels: empty")
	}
	for i, mod := range m.Modules {
		if !nameRE.MatchString(mod) {
			return fmt.Errorf("modules[%d]: bad module name %q", i, mod)
		}
	}
	for i, tool := range m.Tools {
		if !nameRE.MatchString(tool) {
			return fmt.Errorf("tools[%d]: bad program name %q", i, tool)
		}
	}
	seen := map[string]bool{}
	floors := 0
	for i, k := range m.Kernels {
		f := fmt.Sprintf("kernels[%d]", i)
		if !nameRE.MatchString(k.Name) {
			return fmt.Errorf("%s.name: bad or empty name %q (lower case letters, digits, . _ -)", f, k.Name)
		}
		f = fmt.Sprintf("kernels[%d] (%s)", i, k.Name)
		if seen[k.Name] {
			return fmt.Errorf("%s.name: duplicate", f)
		}
		seen[k.Name] = true
		if k.Floor {
			floors++
		}
		for j, feat := range k.Missing {
			if feat == "" || strings.ContainsAny(feat, ", \t") {
				return fmt.Errorf("%s.missing[%d]: bad feature name %q", f, j, feat)
			}
		}
		s := k.Source
		switch s.Type {
		case SourceApt:
			if s.Package == "" {
				return fmt.Errorf("%s.source.package: empty", f)
			}
			if s.Version == "" {
				return fmt.Errorf("%s.source.version: empty (pin an exact version)", f)
			}
			if !sha256RE.MatchString(s.SHA256) {
				return fmt.Errorf("%s.source.sha256: want 64 lower-case hex digits, got %q", f, s.SHA256)
			}
		case SourceGoMod:
			if s.Module == "" {
				return fmt.Errorf("%s.source.module: empty", f)
			}
			if s.Version == "" || strings.Contains(s.Version, "latest") {
				return fmt.Errorf("%s.source.version: pin an exact module version, got %q", f, s.Version)
			}
			if !strings.HasPrefix(s.Sum, "h1:") {
				return fmt.Errorf("%s.source.sum: want the go.sum h1: hash, got %q", f, s.Sum)
			}
			if !sha256RE.MatchString(s.SHA256) {
				return fmt.Errorf("%s.source.sha256: want 64 lower-case hex digits, got %q", f, s.SHA256)
			}
		case SourceHost:
		default:
			return fmt.Errorf("%s.source.type: %q is not one of apt, gomod, host", f, s.Type)
		}
	}
	if floors > 1 {
		return fmt.Errorf("kernels: %d entries are marked floor, want at most one", floors)
	}
	return nil
}

// Select returns the kernels named in names (comma separated; empty or "all"
// means every kernel), in matrix order.
func (m *Matrix) Select(names string) ([]Kernel, error) {
	if names == "" || names == "all" {
		return m.Kernels, nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(names, ",") {
		if n = strings.TrimSpace(n); n != "" {
			want[n] = true
		}
	}
	var out []Kernel
	for _, k := range m.Kernels {
		if want[k.Name] {
			out = append(out, k)
			delete(want, k.Name)
		}
	}
	if len(want) > 0 {
		var unknown, known []string
		for n := range want {
			unknown = append(unknown, n)
		}
		for _, k := range m.Kernels {
			known = append(known, k.Name)
		}
		return nil, fmt.Errorf("unknown kernel %s (the matrix has: %s)", strings.Join(unknown, ", "), strings.Join(known, ", "))
	}
	return out, nil
}
