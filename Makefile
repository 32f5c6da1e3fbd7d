# xderp: build, run and test the DERP relay appliance.
#   make run    - build and run a relay on loopback (plain HTTP 127.0.0.1:3340, STUN 127.0.0.1:3478)
#   make test   - install what the tests need, then run the whole test suite
#   make bench  - print the benchmark tables (relay vs Tailscale's derper, XDP vs userspace STUN)
#   make soak   - Tailscale clients against the real daemon for SOAK (5m): HTTP, TLS, mesh

SHELL       := /bin/bash
GO          ?= go
VERSION     ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS     := -X github.com/xderp/xderp/userspace/daemon.Version=$(VERSION)
# A count, not a duration: Go 1.26's fuzz coordinator can report a bare
# "context deadline exceeded" failure when a duration runs out while a worker
# is mid-call (go.dev/issue/75804, fixed in Go 1.27). A count has no deadline.
FUZZTIME    ?= 100000x
RUN_FLAGS   ?= -dev
# Debian packages the tests need (installed by `make deps` when missing).
APT_PKGS    := clang llvm libbpf-dev bpftool iproute2 ethtool util-linux libcap2-bin \
               qemu-system-x86 busybox-static kmod cpio xz-utils zstd \
               mmdebstrap mtools dosfstools fdisk systemd-boot-efi e2fsprogs ovmf python3
export GOTOOLCHAIN := local

.PHONY: all build run test unit fuzz interop soak vmtest vmtest-selftest image image-test bench lint generate check-generated deps clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/xderpd ./cmd/xderpd

run: build
	./bin/xderpd $(RUN_FLAGS)

# The whole suite: formatting and vet, unit and kernel tests of the main
# module, a short run of every fuzz target, the interop module against real
# Tailscale code, and the kernel matrix under QEMU.
test: deps lint unit fuzz interop vmtest vmtest-selftest image-test

unit:
	$(GO) test -count=1 ./...

# Every Fuzz target in the main module, briefly (FUZZTIME executions each). The seed
# corpora also run as plain tests in `unit`.
fuzz:
	@set -e; for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz' || true); do \
	    echo "fuzz $$pkg $$f ($(FUZZTIME))"; \
	    out=$$($(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg 2>&1) || { \
	      echo "$$out"; exit 1; }; \
	  done; \
	done

interop:
	cd interop && $(GO) test -count=1 ./...
	cd interop && $(GO) test -count=1 -tags ts_debug_websockets -run '^TestWebSocket$$' .

# Not part of `make test`: Tailscale's clients against the real daemon for
# SOAK (bursts, single packets, quiet spells past the 60 s keepalive).
SOAK ?= 5m
soak:
	cd interop && XDERP_SOAK=$(SOAK) $(GO) test -count=1 -timeout 0 -parallel 3 -run '^TestSoak$$' -v .

# The kernel-facing tests on every kernel of vmtest/kernels.json (KERNEL=name
# for one), the README's result table refreshed; then the runner's own QEMU
# tests (a broken program and a hung guest must fail a run).
KERNEL      ?= all
VMTEST_PKGS ?= ./bpf/...,./loader/...,./vmtest/internal/selftest
vmtest:
	$(GO) run ./vmtest -kernel $(KERNEL) -pkgs $(VMTEST_PKGS) -readme README.md

vmtest-selftest:
	XDERP_VMTEST_BOOT=1 $(GO) test -count=1 ./vmtest/...

# The appliance: a raw GPT disk image (and a zstd copy) in appliance-image/out/,
# and its boot test under QEMU (see appliance-image/README.md).
image: build
	appliance-image/build.sh

image-test: image
	appliance-image/test.sh

# Figures side by side with Tailscale's code (printed, never asserted):
# relay and STUN against derper, XDP per-packet cost against Tailscale's XDP
# object, XDP against the userspace STUN server over veth (an in-kernel
# closed-loop generator, whose own per-request cost is printed too), new TLS
# connections, and mesh forwarding against meshed derpers.
bench: build
	cd interop && $(GO) run ./bench
	cd interop && $(GO) test -count=1 -run '^$$' -bench 'XDPvsTailscale' -benchtime 20000x -v . | grep -v '^=== RUN'
	cd interop && $(GO) test -count=1 -run '^$$' -bench 'XDPvsUserspaceSTUN' -benchtime 1x -v . | grep -v '^=== RUN'
	$(GO) test -count=1 -run '^$$' -bench 'VethSTUNBounce' -benchtime 1x -v ./loader | grep -v '^=== RUN'
	$(GO) test -count=1 -run '^$$' -bench '^BenchmarkXDP(Empty|Bounce)?$$' -benchtime 200000x ./loader | grep 'ns/pkt'
	cd interop && $(GO) test -count=1 -run '^$$' -bench 'CertsTLSConnVsDerper' -benchtime 1000x -v . | grep -v '^=== RUN'
	cd interop && $(GO) test -count=1 -run '^$$' -bench 'MeshForward' -benchtime 1x -v . | grep -v '^=== RUN'

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	cd interop && $(GO) vet ./...
	cd interop && $(GO) vet -tags ts_debug_websockets .
	GOOS=darwin $(GO) build ./...

generate:
	$(GO) generate ./bpf/...

# Fails when the committed BPF objects differ from what `make generate` builds.
check-generated: generate
	@git diff --exit-code -- bpf/ || { echo "bpf/: generated files are stale; run 'make generate' and commit"; exit 1; }

# Installs the Debian packages the tests need, if any is missing.
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $$missing; \
	fi

clean:
	rm -rf bin
