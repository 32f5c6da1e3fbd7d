package target

import (
	"os/exec"
	"syscall"
)

// bindLifetime makes the kernel kill the server if the test or bench
// process dies without stopping it (a panic, a timeout), so no daemon is
// left holding loopback ports.
func bindLifetime(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
