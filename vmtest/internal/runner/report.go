package runner

import (
	"fmt"
	"strings"
	"time"
)

// Markdown renders the report as the table the README includes.
func (r *Report) Markdown() string {
	var b strings.Builder
	b.WriteString("| Kernel | Release | Source | Expected to lack | Result | Tests passed / skipped / failed | Time |\n")
	b.WriteString("|---|---|---|---|---|---|---|\n")
	floor := ""
	for i := range r.Results {
		kr := &r.Results[i]
		k := kr.Kernel
		name := k.Name
		if k.Floor {
			name += " (floor)"
			floor = fmt.Sprintf("%s, Linux %s", k.Name, kr.Release)
		}
		missing := "—"
		if len(k.Missing) > 0 {
			missing = strings.Join(k.Missing, ", ")
		}
		result := "PASS"
		if !kr.OK() {
			result = "**FAIL**"
		}
		p, s, f := kr.Totals()
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s | %d / %d / %d | %s |\n",
			name, kr.Release, sourceText(k.Source), missing, result, p, s, f, kr.Elapsed.Round(100*time.Millisecond))
	}
	if floor != "" {
		fmt.Fprintf(&b, "\nKernel floor: %s (the oldest kernel the matrix tests).\n", floor)
	}
	if len(r.Packages) > 0 {
		fmt.Fprintf(&b, "Packages: %s. Whole run: %s.\n", strings.Join(r.Packages, ", "), r.Elapsed.Round(time.Second))
	}
	return b.String()
}

func sourceText(s Source) string {
	switch s.Type {
	case SourceApt:
		return fmt.Sprintf("`%s` %s (%s)", s.Package, s.Version, s.Suite)
	case SourceGoMod:
		return fmt.Sprintf("`%s@%s`", s.Module, s.Version)
	case SourceHost:
		return "host, run directly as root"
	}
	return s.Type
}
