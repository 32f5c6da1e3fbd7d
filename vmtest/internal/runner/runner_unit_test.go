package runner

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func repoMatrix(t *testing.T) (*Matrix, string) {
	t.Helper()
	root, err := filepath.Abs("../../..")
	if err != nil {
		t.Fatal(err)
	}
	m, err := LoadMatrix(filepath.Join(root, "vmtest", "kernels.json"))
	if err != nil {
		t.Fatalf("the committed kernel matrix does not load: %v", err)
	}
	return m, root
}

func TestCommittedMatrix(t *testing.T) {
	m, _ := repoMatrix(t)
	byType := map[string][]string{}
	floor := ""
	for _, k := range m.Kernels {
		byType[k.Source.Type] = append(byType[k.Source.Type], k.Name)
		if k.Floor {
			floor = k.Name
		}
	}
	if floor != "debian-6.1" {
		t.Errorf("floor is %q, want debian-6.1", floor)
	}
	if len(byType[SourceApt]) != 2 || len(byType[SourceGoMod]) != 1 || len(byType[SourceHost]) != 1 {
		t.Errorf("kernels by source type = %v, want 2 apt, 1 gomod, 1 host", byType)
	}
	hasVeth := false
	for _, mod := range m.Modules {
		hasVeth = hasVeth || mod == "veth"
	}
	if !hasVeth {
		t.Errorf("modules %v lack veth", m.Modules)
	}
}

func TestParseMatrixErrorsNameTheField(t *testing.T) {
	good := `{"modules":["veth"],"kernels":[{"name":"a","source":{"type":"apt","package":"p","version":"1","sha256":"` + strings.Repeat("a", 64) + `"},"missing":[]}]}`
	if _, err := ParseMatrix([]byte(good)); err != nil {
		t.Fatalf("good matrix refused: %v", err)
	}
	cases := []struct{ name, in, want string }{
		{"empty", `{"kernels":[]}`, "kernels: empty"},
		{"unknown field", `{"kernels":[{"name":"a","source":{"type":"host"}}],"extra":1}`, `unknown field "extra"`},
		{"bad name", `{"kernels":[{"name":"A B","source":{"type":"host"}}]}`, "kernels[0].name"},
		{"duplicate", `{"kernels":[{"name":"a","source":{"type":"host"}},{"name":"a","source":{"type":"host"}}]}`, "kernels[1] (a).name: duplicate"},
		{"bad type", `{"kernels":[{"name":"a","source":{"type":"ftp"}}]}`, "kernels[0] (a).source.type"},
		{"apt no version", `{"kernels":[{"name":"a","source":{"type":"apt","package":"p","sha256":"` + strings.Repeat("a", 64) + `"}}]}`, "source.version"},
		{"apt bad sha", `{"kernels":[{"name":"a","source":{"type":"apt","package":"p","version":"1","sha256":"abc"}}]}`, "source.sha256"},
		{"gomod latest", `{"kernels":[{"name":"a","source":{"type":"gomod","module":"m","version":"latest","sum":"h1:x","sha256":"` + strings.Repeat("a", 64) + `"}}]}`, "source.version"},
		{"gomod no sum", `{"kernels":[{"name":"a","source":{"type":"gomod","module":"m","version":"v1.0.0","sha256":"` + strings.Repeat("a", 64) + `"}}]}`, "source.sum"},
		{"bad feature", `{"kernels":[{"name":"a","source":{"type":"host"},"missing":["btf,jit"]}]}`, "missing[0]"},
		{"two floors", `{"kernels":[{"name":"a","floor":true,"source":{"type":"host"}},{"name":"b","floor":true,"source":{"type":"host"}}]}`, "floor"},
		{"bad module", `{"modules":["../x"],"kernels":[{"name":"a","source":{"type":"host"}}]}`, "modules[0]"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseMatrix([]byte(tc.in))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

func TestSelect(t *testing.T) {
	m, _ := repoMatrix(t)
	all, err := m.Select("all")
	if err != nil || len(all) != len(m.Kernels) {
		t.Fatalf("Select(all) = %d kernels, %v", len(all), err)
	}
	two, err := m.Select("host, debian-6.1")
	if err != nil {
		t.Fatal(err)
	}
	if len(two) != 2 || two[0].Name != "debian-6.1" || two[1].Name != "host" {
		t.Errorf("Select = %v, want debian-6.1 then host (matrix order)", two)
	}
	if _, err := m.Select("debian-5.10"); err == nil || !strings.Contains(err.Error(), "debian-5.10") || !strings.Contains(err.Error(), "debian-6.1") {
		t.Errorf("unknown kernel error = %v, want it to name the kernel and list the known ones", err)
	}
}

// cpioEntry is one entry read back by readNewc.
type cpioEntry struct {
	name             string
	mode             uint32
	data             string
	rdevMaj, rdevMin uint32
}

// readNewc parses a newc archive independently of the writer.
func readNewc(t *testing.T, b []byte) []cpioEntry {
	t.Helper()
	var out []cpioEntry
	off := 0
	field := func(i int) uint32 {
		v, err := strconv.ParseUint(string(b[off+6+8*i:off+14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("bad header field %d at %d: %v", i, off, err)
		}
		return uint32(v)
	}
	for {
		if off%4 != 0 {
			t.Fatalf("header at %d is not 4-byte aligned", off)
		}
		if string(b[off:off+6]) != "070701" {
			t.Fatalf("bad magic %q at %d", b[off:off+6], off)
		}
		mode, size, maj, min, nsize := field(1), field(6), field(9), field(10), field(11)
		name := string(b[off+110 : off+110+int(nsize)-1])
		if b[off+110+int(nsize)-1] != 0 {
			t.Fatalf("name %q not NUL terminated", name)
		}
		off += 110 + int(nsize)
		off = (off + 3) &^ 3
		data := string(b[off : off+int(size)])
		off += int(size)
		off = (off + 3) &^ 3
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return out
		}
		out = append(out, cpioEntry{name, mode, data, maj, min})
	}
}

func TestCPIOWriterRoundTrip(t *testing.T) {
	host := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(host, []byte("12345"), 0o644); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	c := newCPIOWriter(&buf)
	c.Dir("bin", 0o755)
	c.File("bin/a", 0o755, []byte("abc"))
	c.CopyFile("bin/b", 0o644, host)
	c.Symlink("bin/sh", "busybox")
	c.Dir("dev", 0o755)
	c.CharDev("dev/console", 0o600, 5, 1)
	c.File("init", 0o755, nil)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	got := readNewc(t, buf.Bytes())
	want := []cpioEntry{
		{"bin", cpioDir | 0o755, "", 0, 0},
		{"bin/a", cpioFile | 0o755, "abc", 0, 0},
		{"bin/b", cpioFile | 0o644, "12345", 0, 0},
		{"bin/sh", cpioSymlink | 0o777, "busybox", 0, 0},
		{"dev", cpioDir | 0o755, "", 0, 0},
		{"dev/console", cpioChar | 0o600, "", 5, 1},
		{"init", cpioFile | 0o755, "", 0, 0},
	}
	if len(got) != len(want) {
		t.Fatalf("read %d entries, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("entry %d = %+v, want %+v", i, got[i], want[i])
		}
	}
	// Cross-check with GNU cpio where it is installed.
	if _, err := exec.LookPath("cpio"); err == nil {
		cmd := exec.Command("cpio", "-it", "--quiet")
		cmd.Stdin = bytes.NewReader(buf.Bytes())
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cpio -it: %v", err)
		}
		if names := strings.Fields(string(out)); len(names) != len(want) || names[2] != "bin/b" {
			t.Errorf("cpio -it lists %v", names)
		}
	}
}

func TestCPIOWriterRefusesOrphan(t *testing.T) {
	c := newCPIOWriter(&bytes.Buffer{})
	c.File("nodir/a", 0o644, []byte("x"))
	if err := c.Close(); err == nil || !strings.Contains(err.Error(), "nodir/a") {
		t.Errorf("Close = %v, want an error naming the entry without a parent", err)
	}
}

func TestParseGuest(t *testing.T) {
	stream := strings.Join([]string{
		"@@XDERP-BOOT 6.1.0-50-amd64\r",
		"@@XDERP-MODERR 00-veth.ko",
		"@@XDERP-BEGIN bpf",
		"=== RUN   TestA",
		"--- PASS: TestA (0.00s)",
		"=== RUN   TestB",
		"    b_test.go:9: kernel lacks btf: /sys/kernel/btf/vmlinux does not exist",
		"--- SKIP: TestB (0.00s)",
		"PASS",
		"@@XDERP-END bpf 0",
		"@@XDERP-BEGIN loader",
		"=== RUN   TestC",
		"    c_test.go:3: boom",
		"--- FAIL: TestC (0.01s)",
		"FAIL@@XDERP-END loader 1",
		"@@XDERP-BEGIN hung",
		"=== RUN   TestD",
		"",
	}, "\n")
	r := ParseGuest(stream, []string{"btf"})
	if !r.Booted || r.Release != "6.1.0-50-amd64" || r.Done {
		t.Errorf("booted %v release %q done %v, want true, 6.1.0-50-amd64, false", r.Booted, r.Release, r.Done)
	}
	if len(r.ModuleErrors) != 1 || r.ModuleErrors[0] != "00-veth.ko" {
		t.Errorf("module errors = %v", r.ModuleErrors)
	}
	if len(r.Binaries) != 3 {
		t.Fatalf("parsed %d binaries, want 3: %+v", len(r.Binaries), r.Binaries)
	}
	bpf, loader, hung := r.Binaries[0], r.Binaries[1], r.Binaries[2]
	if !bpf.OK() || bpf.Passed != 1 || bpf.Skipped != 1 || len(bpf.BadSkips) != 0 {
		t.Errorf("bpf = %+v, want ok with 1 pass and 1 expected skip", bpf)
	}
	if loader.OK() || !loader.Finished || loader.Exit != 1 || loader.Failed != 1 || !strings.HasSuffix(loader.Output, "FAIL\n") {
		t.Errorf("loader = %+v, want finished, exit 1, 1 failure, output ending in FAIL", loader)
	}
	if hung.OK() || hung.Finished {
		t.Errorf("hung = %+v, want unfinished", hung)
	}
}

func TestScoreTestOutputSkips(t *testing.T) {
	out := strings.Join([]string{
		"=== RUN   TestFeat",
		"=== RUN   TestFeat/jit",
		"    f_test.go:1: kernel lacks jit: no sysctl",
		"=== RUN   TestFeat/btf",
		"    f_test.go:1: kernel lacks btf: no file",
		"=== RUN   TestShort",
		"    s_test.go:2: skipping in short mode",
		"--- SKIP: TestShort (0.00s)",
		"--- PASS: TestFeat (0.00s)",
		"    --- SKIP: TestFeat/jit (0.00s)",
		"    --- SKIP: TestFeat/btf (0.00s)",
	}, "\n")
	b := BinaryResult{Output: out, Finished: true}
	ScoreTestOutput(&b, []string{"JIT"})
	if b.Passed != 1 || b.Skipped != 1 {
		t.Errorf("passed %d skipped %d, want 1 and 1", b.Passed, b.Skipped)
	}
	if strings.Join(b.BadSkips, ",") != "TestShort,TestFeat/btf" {
		t.Errorf("bad skips = %v, want TestShort and TestFeat/btf (btf is not declared missing)", b.BadSkips)
	}
	if b.OK() {
		t.Error("a binary with bad skips is OK")
	}
}

func TestInitScriptQuotesEnvironment(t *testing.T) {
	tricky := `it's "quoted" $HOME; $(false) \n`
	script := InitScript(GuestPlan{
		Modules:  []string{"00-veth.ko"},
		Env:      map[string]string{"XDERP_TRICKY": tricky, "XDERP_VMTEST": "1"},
		Binaries: []TestBinary{{Name: "selftest", RelDir: "vmtest/internal/selftest"}},
		TestArgs: []string{"-test.run=Test(A|B) x"},
	})
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh on this machine to check the script with")
	}
	if out, err := exec.Command(sh, "-n", "-c", script).CombinedOutput(); err != nil {
		t.Fatalf("init script is not valid sh: %v\n%s\n%s", err, out, script)
	}
	var exports []string
	for _, l := range strings.Split(script, "\n") {
		if strings.HasPrefix(l, "export XDERP_") {
			exports = append(exports, l)
		}
	}
	out, err := exec.Command(sh, "-c", strings.Join(exports, "\n")+"\nprintf %s \"$XDERP_TRICKY\"").Output()
	if err != nil {
		t.Fatal(err)
	}
	if string(out) != tricky {
		t.Errorf("value in the guest = %q, want %q", out, tricky)
	}
	for _, want := range []string{"insmod /modules/00-veth.ko", "/tests/selftest.test -test.v '-test.run=Test(A|B) x'", "cd '/src/vmtest/internal/selftest'", markDone, "reboot -f"} {
		if !strings.Contains(script, want) {
			t.Errorf("init script lacks %q:\n%s", want, script)
		}
	}
}

func TestParseShowDepends(t *testing.T) {
	got, err := parseShowDepends([]byte("insmod /k/lib/modules/6.1/kernel/a.ko \ninsmod /k/b.ko.xz opt=1\nbuiltin veth\n"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != "/k/lib/modules/6.1/kernel/a.ko,/k/b.ko.xz" {
		t.Errorf("paths = %v", got)
	}
	if _, err := parseShowDepends([]byte("modprobe: FATAL: Module x not found\n")); err == nil {
		t.Error("an unexpected line was accepted")
	}
	if moduleBaseName("/x/veth.ko.xz") != "veth.ko" {
		t.Errorf("moduleBaseName = %q", moduleBaseName("/x/veth.ko.xz"))
	}
}

func TestVerifySHA256(t *testing.T) {
	p := filepath.Join(t.TempDir(), "k")
	if err := os.WriteFile(p, []byte("kernel"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := verifySHA256(p, strings.Repeat("0", 64)); err == nil || !strings.Contains(err.Error(), "checksum mismatch") {
		t.Errorf("wrong checksum accepted or unclear error: %v", err)
	}
	sum := sha256.Sum256([]byte("kernel"))
	if err := verifySHA256(p, hex.EncodeToString(sum[:])); err != nil {
		t.Errorf("right checksum refused: %v", err)
	}
}

func TestReplaceTable(t *testing.T) {
	doc := "# X\n\nintro\n" + TableBegin + "\nold table\n" + TableEnd + "\n\nafter\n"
	got, err := ReplaceTable(doc, "| new |\n")
	if err != nil {
		t.Fatal(err)
	}
	want := "# X\n\nintro\n" + TableBegin + "\n| new |\n" + TableEnd + "\n\nafter\n"
	if got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	if _, err := ReplaceTable("no markers", "t"); err == nil {
		t.Error("a document without markers was accepted")
	}
	// Markers quoted in prose are not markers.
	prose := "use `" + TableBegin + "` and `" + TableEnd + "`\n"
	got, err = ReplaceTable(prose+doc, "| new |\n")
	if err != nil {
		t.Fatal(err)
	}
	if got != prose+want {
		t.Errorf("with markers in prose: got %q, want %q", got, prose+want)
	}
	if _, err := ReplaceTable(prose, "t"); err == nil {
		t.Error("markers only in prose were accepted")
	}
}

func TestMarkdownTable(t *testing.T) {
	rep := &Report{
		Packages: []string{"example.com/bpf"},
		Results: []KernelResult{
			{Kernel: Kernel{Name: "old", Floor: true, Source: Source{Type: SourceApt, Package: "linux-image-x", Version: "1", Suite: "bookworm"}},
				Release: "6.1.0", Elapsed: 5 * time.Second,
				Binaries: []BinaryResult{{Name: "bpf", Finished: true, Passed: 3}}},
			{Kernel: Kernel{Name: "nojit", Missing: []string{"jit"}, Source: Source{Type: SourceHost}},
				Release: "7.1", Elapsed: time.Second,
				Binaries: []BinaryResult{{Name: "bpf", Finished: true, Exit: 1, Passed: 2, Failed: 1}}},
		},
	}
	md := rep.Markdown()
	for _, want := range []string{
		"| old (floor) | 6.1.0 | `linux-image-x` 1 (bookworm) | — | PASS | 3 / 0 / 0 | 5s |",
		"| nojit | 7.1 | host, run directly as root | jit | **FAIL** | 2 / 0 / 1 | 1s |",
		"Kernel floor: old, Linux 6.1.0",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("table lacks %q:\n%s", want, md)
		}
	}
	if rep.OK() {
		t.Error("a report with a failing kernel is OK")
	}
}

func TestTextPatchPanic(t *testing.T) {
	crash := errors.New("the guest stopped before running every test binary")
	dispatcher := "[   30.554747] ---[ end trace 0000000000000000 ]---\n" +
		"[   30.554841] RIP: 0010:bpf_dispatcher_xdp_func+0xa/0x10\n" +
		"[   30.555229] Kernel panic - not syncing: Fatal exception in interrupt\n"
	other := "[    9.1] RIP: 0010:xdp_do_redirect+0x1a/0x300\n[    9.2] Kernel panic - not syncing: Fatal exception\n"
	for _, tc := range []struct {
		name string
		kr   KernelResult
		want string
	}{
		{"dispatcher panic", KernelResult{Err: crash, Console: dispatcher}, "in bpf_dispatcher_xdp_func+0xa/0x10"},
		{"udp hash panic", KernelResult{Err: crash, Console: strings.Replace(dispatcher, "bpf_dispatcher_xdp_func+0xa/0x10", "udp_ehashfn+0x3/0x90", 1)}, "in udp_ehashfn+0x3/0x90"},
		{"panic elsewhere", KernelResult{Err: crash, Console: other}, ""},
		{"site named without a panic", KernelResult{Err: crash, Console: "RIP: 0010:bpf_dispatcher_xdp_func+0xa/0x10\n"}, ""},
		{"guest came back", KernelResult{Console: dispatcher}, ""},
	} {
		if got := textPatchPanic(tc.kr); got != tc.want {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
