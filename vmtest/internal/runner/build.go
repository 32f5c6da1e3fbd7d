package runner

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// TestBinary is one package's compiled test binary.
type TestBinary struct {
	ImportPath string // e.g. github.com/xderp/xderp/bpf
	Dir        string // the package's source directory on the host
	Name       string // unique short name, used for files and in reports
	Path       string // the binary on the host
	// RelDir is Dir relative to the module root (slash separated); in a
	// guest the binary runs in /src/RelDir, as go test runs it in Dir.
	RelDir string
}

// BuildTests compiles the tests of the packages matching patterns (go list
// patterns, relative to moduleRoot) as static binaries in outDir. Patterns
// that match no package, and packages without tests, are reported on log
// and left out; it is an error if nothing is left.
func BuildTests(ctx context.Context, moduleRoot, outDir string, patterns []string, log func(format string, args ...any)) ([]TestBinary, error) {
	var bins []TestBinary
	names := map[string]bool{}
	for _, pat := range patterns {
		cmd := exec.CommandContext(ctx, "go", "list", "-e", "-f",
			"{{.ImportPath}}\t{{.Dir}}\t{{len .TestGoFiles}}\t{{len .XTestGoFiles}}\t{{if .Error}}{{.Error}}{{end}}", pat)
		cmd.Dir = moduleRoot
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil && bytes.Contains(stderr.Bytes(), []byte("no such file or directory")) {
			log("vmtest: pattern %s matched no packages (no such directory yet)", pat)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("go list %s: %w: %s", pat, err, bytes.TrimSpace(stderr.Bytes()))
		}
		matched := 0
		sc := bufio.NewScanner(bytes.NewReader(out))
		for sc.Scan() {
			f := strings.Split(sc.Text(), "\t")
			if len(f) != 5 {
				continue
			}
			if f[4] != "" {
				// Patterns like ./bpf/... that match nothing land here.
				if strings.Contains(f[4], "matched no packages") || strings.Contains(f[4], "no Go files") || strings.Contains(f[4], "no such file or directory") {
					continue
				}
				return nil, fmt.Errorf("go list %s: %s", pat, f[4])
			}
			matched++
			if f[2] == "0" && f[3] == "0" {
				log("vmtest: %s has no tests, skipping it", f[0])
				continue
			}
			name := uniqueName(f[0], names)
			rel, err := moduleRel(moduleRoot, f[1])
			if err != nil {
				return nil, err
			}
			bins = append(bins, TestBinary{ImportPath: f[0], Dir: f[1], Name: name, Path: filepath.Join(outDir, name+".test"), RelDir: rel})
		}
		if matched == 0 {
			log("vmtest: pattern %s matched no packages", pat)
		}
	}
	if len(bins) == 0 {
		return nil, fmt.Errorf("no test packages to run in %s", strings.Join(patterns, ","))
	}
	// One go test -c per package: the build cache keeps repeats cheap and
	// each binary gets its own name even when packages share a base name.
	for _, b := range bins {
		cmd := exec.CommandContext(ctx, "go", "test", "-c", "-ldflags=-s -w", "-o", b.Path, b.ImportPath)
		cmd.Dir = moduleRoot
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("build test binary for %s: %w\n%s", b.ImportPath, err, bytes.TrimSpace(out))
		}
	}
	return bins, nil
}

// uniqueName derives a short file-system-safe name from the import path's
// last elements, unique among names.
func uniqueName(importPath string, names map[string]bool) string {
	parts := strings.Split(importPath, "/")
	for n := 1; n <= len(parts); n++ {
		name := strings.Join(parts[len(parts)-n:], "-")
		name = strings.Map(func(r rune) rune {
			if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
				return r
			}
			return '_'
		}, name)
		if !names[name] {
			names[name] = true
			return name
		}
	}
	name := fmt.Sprintf("pkg%d", len(names))
	names[name] = true
	return name
}

// moduleRel returns dir relative to moduleRoot, slash separated, or an error
// if dir lies outside the module.
func moduleRel(moduleRoot, dir string) (string, error) {
	rel, err := filepath.Rel(moduleRoot, dir)
	if err != nil || rel == ".." || strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return "", fmt.Errorf("package directory %s is outside the module %s", dir, moduleRoot)
	}
	return filepath.ToSlash(rel), nil
}

// SourceDirs lists, relative to moduleRoot, the directories of the test
// packages and of every package of this module they import (tests read
// files such as ../bpf/xderp.h or testdata/ relative to their directory).
func SourceDirs(ctx context.Context, moduleRoot string, bins []TestBinary) ([]string, error) {
	args := []string{"list", "-deps", "-test", "-f", "{{.Dir}}"}
	for _, b := range bins {
		args = append(args, b.ImportPath)
	}
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = moduleRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go list -deps: %w: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	seen := map[string]bool{}
	var dirs []string
	for _, d := range strings.Split(string(out), "\n") {
		if d == "" {
			continue
		}
		rel, err := moduleRel(moduleRoot, d)
		if err != nil || seen[rel] {
			continue // the standard library and other modules
		}
		seen[rel] = true
		dirs = append(dirs, rel)
	}
	return dirs, nil
}
