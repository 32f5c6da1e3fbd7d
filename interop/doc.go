// Package interop holds the interoperability tests that run Tailscale's own
// client, STUN, prober and Prometheus parser code against a running xderpd
// (or, for validating the tests themselves, against Tailscale's derper).
// It is a separate, test-only module so that the main module never depends
// on tailscale.com or Prometheus.
package interop
