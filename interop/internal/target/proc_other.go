//go:build !linux

package target

import "os/exec"

// bindLifetime is a no-op where there is no parent-death signal.
func bindLifetime(*exec.Cmd) {}
