package meshbench

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"
)

// nodeProc is a node running in a meshnode child process.
type nodeProc struct {
	cmd  *exec.Cmd
	addr string
}

func (p *nodeProc) address() string { return p.addr }

func (p *nodeProc) counters() string {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get("http://" + p.addr + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return ""
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return ""
	}
	return filterCounters(string(b))
}

func (p *nodeProc) close() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

// startProcesses runs two meshed nodes, each in its own process.
func startProcesses(bin string, kind Kind) (*nodeProc, *nodeProc, error) {
	aAddr, bAddr, err := twoPorts()
	if err != nil {
		return nil, nil, err
	}
	a, err := startProcess(bin, kind, aAddr, "http://"+bAddr+"/derp")
	if err != nil {
		return nil, nil, err
	}
	b, err := startProcess(bin, kind, bAddr, "http://"+aAddr+"/derp")
	if err != nil {
		a.close()
		return nil, nil, err
	}
	return a, b, nil
}

func startProcess(bin string, kind Kind, addr, peer string) (*nodeProc, error) {
	cmd := exec.Command(bin, "-kind", string(kind), "-listen", addr, "-mesh-with", peer)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &nodeProc{cmd: cmd}
	line := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(out)
		for s.Scan() {
			if a, ok := strings.CutPrefix(s.Text(), "LISTEN "); ok {
				line <- a
			}
		}
		close(line)
	}()
	select {
	case a, ok := <-line:
		if !ok {
			p.close()
			return nil, fmt.Errorf("meshbench: %s exited before listening", bin)
		}
		p.addr = a
		return p, nil
	case <-time.After(10 * time.Second):
		p.close()
		return nil, fmt.Errorf("meshbench: %s did not start listening", bin)
	}
}
