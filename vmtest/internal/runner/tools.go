package runner

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// hostFile is a host file placed at a path in the guest.
type hostFile struct {
	Guest string // absolute path in the guest
	Host  string // the file on the host (symlinks resolved)
	Mode  uint32
}

// ResolveTools finds host programs (for example ethtool, or iproute2's ip,
// which is fuller than busybox's) and the shared libraries they need, so
// tests that run them work in the guest. Programs go to /usr/sbin, which
// comes before busybox's /bin on the guest's PATH.
func ResolveTools(ctx context.Context, tools []string) ([]hostFile, error) {
	var files []hostFile
	seen := map[string]bool{}
	add := func(guest, host string, mode uint32) error {
		if seen[guest] {
			return nil
		}
		real, err := filepath.EvalSymlinks(host)
		if err != nil {
			return fmt.Errorf("resolve %s: %w", host, err)
		}
		seen[guest] = true
		files = append(files, hostFile{Guest: guest, Host: real, Mode: mode})
		return nil
	}
	for _, tool := range tools {
		path, err := exec.LookPath(tool)
		if err != nil {
			return nil, fmt.Errorf("guest tool %s is not installed on the host (apt-get install the package that has it): %w", tool, err)
		}
		if err := add("/usr/sbin/"+tool, path, 0o755); err != nil {
			return nil, err
		}
		libs, err := sharedLibs(ctx, path)
		if err != nil {
			return nil, fmt.Errorf("guest tool %s: %w", tool, err)
		}
		for _, lib := range libs {
			if err := add(lib, lib, 0o755); err != nil {
				return nil, err
			}
		}
	}
	return files, nil
}

// sharedLibs lists the shared objects (the dynamic loader included) that
// ldd says path loads; nil for a static program.
func sharedLibs(ctx context.Context, path string) ([]string, error) {
	out, err := exec.CommandContext(ctx, "ldd", path).CombinedOutput()
	if err != nil {
		if bytes.Contains(out, []byte("not a dynamic executable")) {
			return nil, nil
		}
		return nil, fmt.Errorf("ldd %s: %w: %s", path, err, bytes.TrimSpace(out))
	}
	return parseLdd(out), nil
}

func parseLdd(out []byte) []string {
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) >= 3 && f[1] == "=>" && strings.HasPrefix(f[2], "/"):
			libs = append(libs, f[2])
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			libs = append(libs, f[0])
		}
	}
	return libs
}
