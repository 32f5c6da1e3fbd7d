//go:build linux

package loader

import (
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xderp/xderp/vmtest/guest"
)

// TestNonRootCaps re-executes this test binary as nobody (uid 65534) with
// only CAP_BPF, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE, inside the server
// namespace: the loader must attach, read counters, update, and adopt its
// own pinned link; then STUN must be answered by the program it attached.
// If that fails, it retries with CAP_PERFMON added and reports which set
// this kernel needs.
func TestNonRootCaps(t *testing.T) {
	e := newVethEnv(t)
	if _, err := exec.LookPath("setpriv"); err != nil {
		guest.Skip(t, "setpriv not installed (util-linux)")
	}
	// The binary and the bpffs must be reachable by nobody.
	dir, err := os.MkdirTemp("", "xderp-caps")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o755)
	bin := filepath.Join(dir, "loader.test")
	self, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	bpffs := filepath.Dir(e.pinDir)
	for d := bpffs; d != "/" && d != os.TempDir(); d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	os.Chmod(bpffs, 0o777)

	try := func(caps string) (string, error) {
		set := "-all," + caps
		cmd := exec.Command("ip", "netns", "exec", e.srvNS, "setpriv",
			"--reuid=65534", "--regid=65534", "--clear-groups",
			"--inh-caps="+set, "--ambient-caps="+set, "--bounding-set="+set,
			bin, "-test.run=^TestCapsChild$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), "XDERP_CAPS_CHILD="+e.srvIf+","+e.pinDir)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	base := "+bpf,+net_admin,+net_bind_service"
	out, err := try(base)
	if err != nil {
		t.Logf("without CAP_PERFMON:\n%s", out)
		out2, err2 := try(base + ",+perfmon")
		if err2 != nil {
			t.Fatalf("even with CAP_PERFMON: %v\n%s", err2, out2)
		}
		t.Fatalf("this kernel needs CAP_PERFMON in addition to CAP_BPF, CAP_NET_ADMIN, CAP_NET_BIND_SERVICE:\n%s", out2)
	}
	if !strings.Contains(out, "--- PASS: TestCapsChild") {
		t.Fatalf("child did not run:\n%s", out)
	}
	t.Logf("CAP_BPF, CAP_NET_ADMIN and CAP_NET_BIND_SERVICE suffice (no CAP_PERFMON); child said:\n%s", out)

	// The program the unprivileged child attached answers STUN.
	c := e.client(netip.AddrPortFrom(e.srv4, 3478))
	if err := exchange(c, 2*time.Second); err != nil {
		t.Fatalf("STUN after the unprivileged attach: %v", err)
	}
}

// TestCapsChild is the unprivileged half of TestNonRootCaps; it does
// something only when that test starts it (a helper process, as in os/exec's
// tests: returning rather than skipping keeps vmtest, where a skip is a
// failure, happy).
func TestCapsChild(t *testing.T) {
	env := os.Getenv("XDERP_CAPS_CHILD")
	if env == "" {
		return
	}
	iface, pinDir, _ := strings.Cut(env, ",")
	if os.Geteuid() == 0 {
		t.Fatal("child runs as root")
	}
	cfg := Config{DERPPorts: []uint16{443}, Shaping: Shaping{PPS: 100}}
	x, err := Attach(iface, ModeAuto, cfg, pinDir)
	if err != nil {
		t.Fatalf("attach: %v", err)
	}
	t.Logf("attached in %v mode as uid %d", x.Mode(), os.Geteuid())
	if _, err := x.Counters(); err != nil {
		t.Fatalf("counters: %v", err)
	}
	if _, _, err := x.ShapingOccupancy(); err != nil {
		t.Fatalf("occupancy: %v", err)
	}
	if err := x.Update(Config{Exempt: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}); err != nil {
		t.Fatalf("update: %v", err)
	}
	x.Close()
	// Adopt the pinned link and replace the program.
	x, err = Attach(iface, ModeAuto, Config{}, pinDir)
	if err != nil {
		t.Fatalf("adopt: %v", err)
	}
	x.Close()
}
