// Command meshnode runs one in-process-equivalent region node (xderp's
// derpserver with userspace/mesh, or Tailscale's derpserver with its mesh
// client) for the mesh benchmark, so that each node of the benchmarked
// region has its own process. It prints "LISTEN <addr>" once serving and
// stops on SIGTERM or SIGINT.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/xderp/xderp/interop/internal/meshbench"
)

func main() {
	kind := flag.String("kind", "xderp", "xderp or derper")
	listen := flag.String("listen", "127.0.0.1:0", "loopback address to serve /derp on")
	meshWith := flag.String("mesh-with", "", "comma-separated peer URLs")
	flag.Parse()
	var peers []string
	if *meshWith != "" {
		peers = strings.Split(*meshWith, ",")
	}
	n, err := meshbench.StartNode(meshbench.Kind(*kind), *listen, peers)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("LISTEN %s\n", n.Addr())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	n.Close()
}
