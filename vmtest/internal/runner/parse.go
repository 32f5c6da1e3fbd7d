package runner

import (
	"bufio"
	"regexp"
	"strconv"
	"strings"
)

// BinaryResult is what one test binary did on one kernel.
type BinaryResult struct {
	Name     string
	Finished bool // the binary ran to its end and reported an exit status
	Exit     int
	Output   string
	Passed   int // tests and subtests that passed
	Failed   int
	Skipped  int // skips for a feature the matrix says the kernel lacks
	// BadSkips are tests that skipped for any other reason: inside vmtest a
	// skip is a failure unless the kernel is expected to lack the feature.
	BadSkips []string
}

// OK reports whether the binary passed.
func (b *BinaryResult) OK() bool { return b.Finished && b.Exit == 0 && len(b.BadSkips) == 0 }

// GuestReport is what the guest said on its result port.
type GuestReport struct {
	Release      string // uname -r as seen in the guest
	Booted       bool
	Done         bool // the guest ran every binary
	ModuleErrors []string
	Binaries     []BinaryResult
}

// ParseGuest reads the guest's result stream.
func ParseGuest(out string, missing []string) GuestReport {
	var r GuestReport
	var cur *BinaryResult
	var buf strings.Builder
	finish := func(exit int, finished bool) {
		cur.Output = buf.String()
		cur.Finished = finished
		cur.Exit = exit
		ScoreTestOutput(cur, missing)
		r.Binaries = append(r.Binaries, *cur)
		cur = nil
		buf.Reset()
	}
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 1<<16), 1<<24)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		// A marker normally starts a line, but a binary's last line may lack
		// its newline; find the marker wherever it is.
		if i := strings.Index(line, "@@XDERP-"); i >= 0 {
			if cur != nil && i > 0 {
				buf.WriteString(line[:i] + "\n")
			}
			line = line[i:]
			f := strings.Fields(line)
			switch f[0] {
			case markBoot:
				r.Booted = true
				if len(f) > 1 {
					r.Release = f[1]
				}
				continue
			case markModule:
				if len(f) > 1 {
					r.ModuleErrors = append(r.ModuleErrors, f[1])
				}
				continue
			case markBegin:
				if cur != nil {
					finish(-1, false)
				}
				if len(f) > 1 {
					cur = &BinaryResult{Name: f[1]}
				}
				continue
			case markEnd:
				if cur != nil && len(f) == 3 && f[1] == cur.Name {
					exit, err := strconv.Atoi(f[2])
					if err == nil {
						finish(exit, true)
					} else {
						finish(-1, false)
					}
				}
				continue
			case markDone:
				if cur != nil {
					finish(-1, false)
				}
				r.Done = true
				continue
			}
		}
		if cur != nil {
			buf.WriteString(line + "\n")
		}
	}
	if cur != nil {
		finish(-1, false)
	}
	return r
}

var (
	resultRE  = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+)`)
	runRE     = regexp.MustCompile(`^=== (?:RUN|CONT|NAME|PAUSE)\s+(\S+)`)
	lacksRE   = regexp.MustCompile(`kernel lacks ([A-Za-z0-9_.-]+):`)
	logLineRE = regexp.MustCompile(`^\s+\S+\.go:\d+: `)
)

// ScoreTestOutput counts passes, fails and skips in a test binary's -test.v
// output and sorts the skips: a skip whose message says "kernel lacks F:"
// (guest.SkipMissingFeature) for an F in missing is expected, any other skip
// is a bad skip.
func ScoreTestOutput(b *BinaryResult, missing []string) {
	miss := map[string]bool{}
	for _, m := range missing {
		miss[strings.ToLower(m)] = true
	}
	logs := map[string][]string{}
	current := ""
	sc := bufio.NewScanner(strings.NewReader(b.Output))
	sc.Buffer(make([]byte, 1<<16), 1<<24)
	for sc.Scan() {
		line := sc.Text()
		if m := runRE.FindStringSubmatch(line); m != nil {
			current = m[1]
			continue
		}
		if m := resultRE.FindStringSubmatch(line); m != nil {
			switch m[1] {
			case "PASS":
				b.Passed++
			case "FAIL":
				b.Failed++
			case "SKIP":
				expected := false
				for _, l := range logs[m[2]] {
					if lm := lacksRE.FindStringSubmatch(l); lm != nil && miss[strings.ToLower(lm[1])] {
						expected = true
					}
				}
				if expected {
					b.Skipped++
				} else {
					b.BadSkips = append(b.BadSkips, m[2])
				}
			}
			continue
		}
		if current != "" && logLineRE.MatchString(line) {
			logs[current] = append(logs[current], line)
		}
	}
}
