package runner

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ResolveModules returns, in load order and without duplicates, the module
// files (host paths) that load names and their dependencies on kernel p.
// Built-in modules need nothing and are left out. It uses the host's kmod
// modprobe against the kernel's own module tree.
func ResolveModules(ctx context.Context, p *Prepared, names []string) ([]string, error) {
	if p.ModRoot == "" || len(names) == 0 {
		return nil, nil
	}
	var files []string
	seen := map[string]bool{}
	for _, name := range names {
		cmd := exec.CommandContext(ctx, "modprobe", "-S", p.Release, "-d", p.ModRoot, "--show-depends", name)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return nil, fmt.Errorf("kernel %s: module %s is neither built in nor loadable (modprobe --show-depends: %w: %s)",
				p.Name, name, err, bytes.TrimSpace(out))
		}
		paths, err := parseShowDepends(out)
		if err != nil {
			return nil, fmt.Errorf("kernel %s: module %s: %w", p.Name, name, err)
		}
		for _, path := range paths {
			if !seen[path] {
				seen[path] = true
				files = append(files, path)
			}
		}
	}
	return files, nil
}

// parseShowDepends reads modprobe --show-depends output: "insmod PATH [args]"
// for each module to load, "builtin NAME" for built-in ones.
func parseShowDepends(out []byte) ([]string, error) {
	var paths []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 0:
		case f[0] == "insmod" && len(f) >= 2:
			paths = append(paths, f[1])
		case f[0] == "builtin":
		default:
			return nil, fmt.Errorf("unexpected modprobe output line %q", sc.Text())
		}
	}
	return paths, sc.Err()
}

// readModule returns the uncompressed module at path (.ko, .ko.gz, .ko.xz,
// .ko.zst), so that busybox insmod can load it on any kernel.
func readModule(ctx context.Context, path string) ([]byte, error) {
	switch {
	case strings.HasSuffix(path, ".ko"):
		return os.ReadFile(path)
	case strings.HasSuffix(path, ".ko.gz"):
		fh, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer fh.Close()
		zr, err := gzip.NewReader(fh)
		if err != nil {
			return nil, fmt.Errorf("decompress %s: %w", path, err)
		}
		return io.ReadAll(zr)
	case strings.HasSuffix(path, ".ko.xz"):
		return runDecompress(ctx, "xz", path)
	case strings.HasSuffix(path, ".ko.zst"):
		return runDecompress(ctx, "zstd", path)
	}
	return nil, fmt.Errorf("module %s: unknown file type", filepath.Base(path))
}

func runDecompress(ctx context.Context, tool, path string) ([]byte, error) {
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, "-dc", path)
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("decompress %s with %s: %w: %s", path, tool, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}

// moduleBaseName is the module file name without directory and compression
// suffix: ".../veth.ko.xz" -> "veth.ko".
func moduleBaseName(path string) string {
	b := filepath.Base(path)
	if i := strings.Index(b, ".ko"); i >= 0 {
		return b[:i] + ".ko"
	}
	return b
}
