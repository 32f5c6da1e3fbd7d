package runner

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// CacheDir is where downloaded kernels live: outside the source tree, so a
// second run downloads nothing and git never sees a kernel.
func CacheDir() (string, error) {
	if d := os.Getenv("XDERP_VMTEST_CACHE"); d != "" {
		return d, nil
	}
	base := os.Getenv("XDG_CACHE_HOME")
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("find cache dir: %w", err)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "xderp", "vmtest"), nil
}

// Prepared is a kernel ready to boot.
type Prepared struct {
	Kernel
	Vmlinuz string // path to the bzImage
	// ModRoot is the directory that holds lib/modules/<Release>, as passed
	// to depmod -b and modprobe -d. Empty when the kernel ships no modules.
	ModRoot string
	Release string // the lib/modules directory name
}

// Fetcher downloads (once) and verifies (every time) the kernels of a matrix.
type Fetcher struct {
	Cache string
	Log   io.Writer // progress messages; never nil
}

// Prepare makes k bootable, downloading it into the cache if needed and
// verifying the pinned checksum of the artefact on every use.
func (f *Fetcher) Prepare(ctx context.Context, k Kernel) (*Prepared, error) {
	switch k.Source.Type {
	case SourceApt:
		return f.prepareApt(ctx, k)
	case SourceGoMod:
		return f.prepareGoMod(ctx, k)
	case SourceHost:
		return &Prepared{Kernel: k}, nil
	}
	return nil, fmt.Errorf("kernel %s: unknown source type %q", k.Name, k.Source.Type)
}

func (f *Fetcher) prepareApt(ctx context.Context, k Kernel) (*Prepared, error) {
	s := k.Source
	dir := filepath.Join(f.Cache, k.Name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
	}
	// apt-get download names the file pkg_version_arch.deb, with ':' in an
	// epoch escaped; find it by prefix rather than predicting the name.
	deb, err := findDeb(dir, s.Package)
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
	}
	if deb == "" {
		fmt.Fprintf(f.Log, "vmtest: %s: downloading %s=%s (apt-get download)\n", k.Name, s.Package, s.Version)
		cmd := exec.CommandContext(ctx, "apt-get", "download", s.Package+"="+s.Version)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("kernel %s: apt-get download %s=%s: %w\n%s\n"+
				"(is the suite %q in the apt sources, and has apt-get update run? Debian drops superseded kernels "+
				"from the archive: if this version is gone, pick a current one with apt-cache policy and update "+
				"package, version and sha256 in the kernel matrix together)",
				k.Name, s.Package, s.Version, err, bytes.TrimSpace(out), s.Suite)
		}
		if deb, err = findDeb(dir, s.Package); err != nil || deb == "" {
			return nil, fmt.Errorf("kernel %s: apt-get download left no .deb for %s in %s", k.Name, s.Package, dir)
		}
	}
	if err := verifySHA256(deb, s.SHA256); err != nil {
		return nil, fmt.Errorf("kernel %s: %w (delete it to download again)", k.Name, err)
	}

	root := filepath.Join(dir, "root")
	stamp := filepath.Join(dir, "unpacked.sha256")
	if b, err := os.ReadFile(stamp); err != nil || strings.TrimSpace(string(b)) != s.SHA256 {
		fmt.Fprintf(f.Log, "vmtest: %s: unpacking %s (dpkg -x, depmod)\n", k.Name, filepath.Base(deb))
		if err := os.RemoveAll(root); err != nil {
			return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
		}
		if out, err := exec.CommandContext(ctx, "dpkg", "-x", deb, root).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("kernel %s: dpkg -x: %w\n%s", k.Name, err, out)
		}
		rel, err := onlyRelease(root)
		if err != nil {
			return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
		}
		// The .deb carries no modules.dep; busybox and modprobe need it.
		if out, err := exec.CommandContext(ctx, "depmod", "-b", root, rel).CombinedOutput(); err != nil {
			return nil, fmt.Errorf("kernel %s: depmod -b %s %s (package kmod): %w\n%s", k.Name, root, rel, err, out)
		}
		if err := os.WriteFile(stamp, []byte(s.SHA256+"\n"), 0o644); err != nil {
			return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
		}
	}
	rel, err := onlyRelease(root)
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
	}
	vmlinuz := filepath.Join(root, "boot", "vmlinuz-"+rel)
	if _, err := os.Stat(vmlinuz); err != nil {
		return nil, fmt.Errorf("kernel %s: no kernel image in the package: %w", k.Name, err)
	}
	return &Prepared{Kernel: k, Vmlinuz: vmlinuz, ModRoot: root, Release: rel}, nil
}

func findDeb(dir, pkg string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), pkg+"_") && strings.HasSuffix(e.Name(), ".deb") {
			return filepath.Join(dir, e.Name()), nil
		}
	}
	return "", nil
}

// onlyRelease returns the single lib/modules/<release> directory under root.
func onlyRelease(root string) (string, error) {
	ents, err := os.ReadDir(filepath.Join(root, "lib", "modules"))
	if err != nil {
		return "", fmt.Errorf("find module directory: %w", err)
	}
	var rels []string
	for _, e := range ents {
		if e.IsDir() {
			rels = append(rels, e.Name())
		}
	}
	if len(rels) != 1 {
		return "", fmt.Errorf("want one directory in %s/lib/modules, found %v", root, rels)
	}
	return rels[0], nil
}

func (f *Fetcher) prepareGoMod(ctx context.Context, k Kernel) (*Prepared, error) {
	s := k.Source
	// Run outside any module (so go.mod is never touched) with the module
	// cache as the store: a cached module is not downloaded again, and the
	// go command checks it against the checksum database on first download.
	tmp, err := os.MkdirTemp("", "xderp-vmtest-gomod-")
	if err != nil {
		return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
	}
	defer os.RemoveAll(tmp)
	var info struct {
		Dir, Sum, Error string
	}
	var stderr bytes.Buffer
	download := func(extraEnv ...string) error {
		cmd := exec.CommandContext(ctx, "go", "mod", "download", "-json", s.Module+"@"+s.Version)
		cmd.Dir = tmp
		cmd.Env = append(append(os.Environ(), "GO111MODULE=on", "GOWORK=off", "GOFLAGS=-mod=mod"), extraEnv...)
		stderr.Reset()
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		info.Error = ""
		if jerr := json.Unmarshal(out, &info); jerr == nil && info.Error != "" {
			err = errors.New(info.Error)
		}
		return err
	}
	// The module cache first, without the network; download only if absent.
	err = download("GOPROXY=off")
	if err != nil {
		fmt.Fprintf(f.Log, "vmtest: %s: downloading %s@%s (go mod download)\n", k.Name, s.Module, s.Version)
		err = download()
	}
	if err != nil {
		return nil, fmt.Errorf("kernel %s: go mod download %s@%s: %w\n%s", k.Name, s.Module, s.Version, err, bytes.TrimSpace(stderr.Bytes()))
	}
	if info.Sum != s.Sum {
		return nil, fmt.Errorf("kernel %s: module %s@%s has hash %s, the matrix pins %s", k.Name, s.Module, s.Version, info.Sum, s.Sum)
	}
	vmlinuz := filepath.Join(info.Dir, "vmlinuz")
	if err := verifySHA256(vmlinuz, s.SHA256); err != nil {
		return nil, fmt.Errorf("kernel %s: %w", k.Name, err)
	}
	p := &Prepared{Kernel: k, Vmlinuz: vmlinuz}
	if rel, err := onlyRelease(info.Dir); err == nil {
		p.ModRoot, p.Release = info.Dir, rel
	}
	return p, nil
}

func verifySHA256(path, want string) error {
	fh, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("verify checksum: %w", err)
	}
	defer fh.Close()
	h := sha256.New()
	if _, err := io.Copy(h, fh); err != nil {
		return fmt.Errorf("verify checksum of %s: %w", path, err)
	}
	if got := hex.EncodeToString(h.Sum(nil)); got != want {
		return fmt.Errorf("checksum mismatch for %s: sha256 %s, the matrix pins %s", path, got, want)
	}
	return nil
}
