// Command xderpd is the xderp DERP relay daemon: a DERP server for Tailscale
// clients with STUN answered in the kernel by XDP where possible. Its flags
// follow derper's names and meanings; run it with -h for the list.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/xderp/xderp/userspace/config"
	"github.com/xderp/xderp/userspace/daemon"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	cfg, err := config.Parse(args, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "xderpd:", err)
		return 2
	}
	if cfg.PrintVersion {
		fmt.Println(daemon.Version)
		return 0
	}
	if cfg.PrintDERPMap {
		js, err := daemon.DERPMapJSON(cfg)
		if err != nil {
			fmt.Fprintln(os.Stderr, "xderpd: -print-derpmap:", err)
			return 1
		}
		fmt.Println(string(js))
		return 0
	}
	if cfg.XDPDetach {
		iface, err := daemon.DetachXDP(cfg)
		if err != nil {
			fmt.Fprintln(os.Stderr, "xderpd: -xdp-detach:", err)
			return 1
		}
		fmt.Printf("xderpd: XDP program detached from %s and unpinned\n", iface)
		return 0
	}
	var level slog.Level
	level.UnmarshalText([]byte(cfg.LogLevel))
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	d, err := daemon.New(cfg, daemon.Options{Logger: log})
	if err != nil {
		fmt.Fprintln(os.Stderr, "xderpd:", err)
		return 1
	}
	if err := d.Start(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "xderpd:", err)
		return 1
	}
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	code := 0
loop:
	for {
		select {
		case <-ctx.Done():
			log.Info("shutting down", "reason", "signal")
			break loop
		case <-hup:
			next, err := config.Parse(args, io.Discard)
			if err != nil {
				log.Error("reload refused, the running configuration stays", "err", err)
				continue
			}
			d.Reload(next)
		case err := <-d.Err():
			log.Error("serving failed", "err", err)
			code = 1
			break loop
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := d.Shutdown(sctx); err != nil {
		log.Warn("shutdown", "err", err)
	}
	return code
}
