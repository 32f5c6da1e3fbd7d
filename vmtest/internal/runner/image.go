package runner

import (
	"bufio"
	"context"
	"debug/elf"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
)

// Markers the guest writes on its result port (the second serial port),
// each on a line of its own.
const (
	markBoot   = "@@XDERP-BOOT"   // @@XDERP-BOOT <uname -r>
	markModule = "@@XDERP-MODERR" // @@XDERP-MODERR <module file>
	markBegin  = "@@XDERP-BEGIN"  // @@XDERP-BEGIN <binary name>
	markEnd    = "@@XDERP-END"    // @@XDERP-END <binary name> <exit status>
	markDone   = "@@XDERP-DONE"
)

// GuestPlan is what the guest's init does.
type GuestPlan struct {
	Modules  []string          // module file names under /modules, in load order
	Env      map[string]string // exported before the tests run
	Binaries []TestBinary
	TestArgs []string // passed to every test binary (after -test.v)
	// FullOutput sends every binary's whole output, not only the result
	// lines of binaries that passed.
	FullOutput bool
}

// shQuote quotes s for a POSIX shell.
func shQuote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// InitScript renders the guest's /init. Results go to /dev/ttyS1 (the second
// serial port), kernel messages to the console on ttyS0, so the two never
// interleave.
func InitScript(p GuestPlan) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format+"\n", args...) }
	w("#!/bin/sh")
	w("# Written by the xderp vmtest runner.")
	w("export PATH=/usr/sbin:/bin HOME=/root TMPDIR=/tmp")
	w("mount -t proc proc /proc")
	w("mount -t sysfs sysfs /sys")
	w("mount -t devtmpfs devtmpfs /dev")
	w("mkdir -p /dev/pts /dev/shm")
	w("mount -t devpts devpts /dev/pts 2>/dev/null")
	w("mount -t tmpfs tmpfs /dev/shm")
	w("mount -t tmpfs tmpfs /tmp")
	w("mount -t tmpfs tmpfs /run")
	w("mount -t bpf bpf /sys/fs/bpf")
	w("mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null")
	w("mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null")
	w("mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null")
	w("ip link set lo up")
	w("stty -F /dev/ttyS1 raw -echo 2>/dev/null")
	w("exec 3>/dev/ttyS1")
	w("echo %s \"$(uname -r)\" >&3", markBoot)
	w("echo \"vmtest init: up on $(uname -r)\"")
	for _, m := range p.Modules {
		w("insmod /modules/%s || echo %s %s >&3", m, markModule, m)
	}
	keys := make([]string, 0, len(p.Env))
	for k := range p.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		w("export %s=%s", k, shQuote(p.Env[k]))
	}
	args := []string{"-test.v"}
	for _, a := range p.TestArgs {
		args = append(args, shQuote(a))
	}
	// The serial port moves about 100 KB/s under TCG, so a binary that
	// passed without skips sends only its result lines; one that failed or
	// skipped sends everything (and FullOutput sends everything always).
	// A hung binary is ended by -test.timeout and so sends its stacks.
	filter := `grep -E '^ *--- |^=== (RUN|NAME|CONT|PAUSE) |kernel lacks |^(PASS|FAIL|ok)' /tmp/out`
	if p.FullOutput {
		filter = "cat /tmp/out"
	}
	for _, bin := range p.Binaries {
		w("cd %s", shQuote(path.Join("/src", bin.RelDir)))
		w("echo 'vmtest init: running %s'", bin.Name)
		w("echo %s %s >&3", markBegin, bin.Name)
		w("/tests/%s.test %s >/tmp/out 2>&1", bin.Name, strings.Join(args, " "))
		w("rc=$?")
		w("if [ $rc = 0 ] && ! grep -q -e '--- SKIP' /tmp/out; then %s >&3; else cat /tmp/out >&3; fi", filter)
		w("echo \"%s %s $rc\" >&3", markEnd, bin.Name)
		w("rm -f /tmp/out")
	}
	w("cd /")
	w("echo 'vmtest init: done, rebooting'")
	w("echo %s >&3", markDone)
	w("exec 3>&-")
	// With -no-reboot, a reset ends QEMU on every machine type and kernel
	// (poweroff needs ACPI support the kernel may lack).
	w("reboot -f")
	w("sleep 5")
	return b.String()
}

// busyboxApplets lists the applets of a static busybox.
func busyboxApplets(ctx context.Context, busybox string) ([]string, error) {
	f, err := elf.Open(busybox)
	if err != nil {
		return nil, fmt.Errorf("busybox %s: %w (install busybox-static)", busybox, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return nil, fmt.Errorf("busybox %s is dynamically linked; install busybox-static", busybox)
		}
	}
	out, err := exec.CommandContext(ctx, busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("busybox --list: %w", err)
	}
	var applets []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		a := strings.TrimSpace(sc.Text())
		if a != "" && a != "busybox" && !strings.Contains(a, "/") {
			applets = append(applets, a)
		}
	}
	return applets, nil
}

// Image describes one initramfs.
type Image struct {
	Busybox string     // host path of a static busybox
	Applets []string   // busybox applets to link in /bin
	Modules []string   // host paths of module files, in load order
	Tools   []hostFile // host programs and their libraries
	// SourceDirs (relative to ModuleRoot) are mirrored under /src: each
	// directory's files, and its testdata/ tree.
	ModuleRoot string
	SourceDirs []string
	Plan       GuestPlan
}

// WriteInitramfs writes an uncompressed newc initramfs to file out.
// The plan's Modules are filled in from img.Modules.
func WriteInitramfs(ctx context.Context, out string, img Image) error {
	fh, err := os.Create(out)
	if err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	bw := bufio.NewWriterSize(fh, 1<<20)
	c := newCPIOWriter(bw)
	for _, d := range []string{"bin", "dev", "etc", "proc", "sys", "tmp", "run", "root", "modules", "tests", "src", "mnt"} {
		c.Dir(d, 0o755)
	}
	c.CharDev("dev/console", 0o600, 5, 1)
	c.CharDev("dev/null", 0o666, 1, 3)
	c.CopyFile("bin/busybox", 0o755, img.Busybox)
	for _, a := range img.Applets {
		c.Symlink("bin/"+a, "busybox")
	}
	c.File("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"))
	c.File("etc/group", 0o644, []byte("root:x:0:\nnogroup:x:65534:\n"))
	c.File("etc/hosts", 0o644, []byte("127.0.0.1 localhost\n::1 localhost\n"))

	for _, f := range img.Tools {
		c.MkdirAll(path.Dir(f.Guest))
		c.CopyFile(f.Guest, f.Mode, f.Host)
	}

	plan := img.Plan
	plan.Modules = nil
	for i, m := range img.Modules {
		data, err := readModule(ctx, m)
		if err != nil {
			fh.Close()
			return err
		}
		name := fmt.Sprintf("%02d-%s", i, moduleBaseName(m))
		c.File("modules/"+name, 0o644, data)
		plan.Modules = append(plan.Modules, name)
	}
	for _, bin := range plan.Binaries {
		c.CopyFile("tests/"+bin.Name+".test", 0o755, bin.Path)
	}
	for _, rel := range img.SourceDirs {
		if err := copySourceDir(c, filepath.Join(img.ModuleRoot, filepath.FromSlash(rel)), path.Join("src", rel)); err != nil {
			fh.Close()
			return err
		}
	}
	for _, bin := range plan.Binaries {
		c.MkdirAll(path.Join("src", bin.RelDir))
	}
	c.File("init", 0o755, []byte(InitScript(plan)))
	if err := c.Close(); err != nil {
		fh.Close()
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := bw.Flush(); err != nil {
		fh.Close()
		return fmt.Errorf("write initramfs: %w", err)
	}
	if err := fh.Close(); err != nil {
		return fmt.Errorf("write initramfs: %w", err)
	}
	return nil
}

// copySourceDir mirrors a package directory's regular files (not its
// subdirectories, except testdata/) at dst.
func copySourceDir(c *cpioWriter, src, dst string) error {
	ents, err := os.ReadDir(src)
	if err != nil {
		return fmt.Errorf("copy package directory: %w", err)
	}
	c.MkdirAll(dst)
	for _, e := range ents {
		if e.Type().IsRegular() {
			c.CopyFile(dst+"/"+e.Name(), 0o644, filepath.Join(src, e.Name()))
		}
	}
	return copyTree(c, filepath.Join(src, "testdata"), dst+"/testdata")
}

// copyTree copies the directory tree at src (if it exists) to dst in the
// archive; tests find their testdata (fuzz seed corpora, packet files)
// relative to their working directory.
func copyTree(c *cpioWriter, src, dst string) error {
	if _, err := os.Stat(src); os.IsNotExist(err) {
		return nil
	}
	return filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, p)
		if err != nil {
			return err
		}
		name := dst
		if rel != "." {
			name = dst + "/" + filepath.ToSlash(rel)
		}
		switch {
		case d.IsDir():
			c.Dir(name, 0o755)
		case d.Type().IsRegular():
			c.CopyFile(name, 0o644, p)
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			c.Symlink(name, target)
		}
		return nil
	})
}
