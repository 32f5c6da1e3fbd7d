package daemon

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync/atomic"

	"github.com/xderp/xderp/userspace/certs"
	"github.com/xderp/xderp/userspace/config"
	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

func newCertProvider(cfg *config.Config, key derp.PrivateKey, log *slog.Logger, reg *metrics.Registry) (*certs.Provider, error) {
	p, err := certs.New(certs.Config{
		Mode:          cfg.CertMode,
		Dir:           cfg.CertDir,
		Hostname:      cfg.Hostname,
		ACMEDirectory: cfg.ACMEDirectory,
		ACMEEmail:     cfg.ACMEEmail,
		ACMEIPCerts:   cfg.ACMEIPCerts,
		EABKeyID:      cfg.EABKeyID,
		EABKey:        cfg.EABKey,
		DERPPublicKey: key.Public(),
		Logger:        log.With("component", "tls"),
		Metrics:       reg,
	})
	if err != nil {
		return nil, fmt.Errorf("-certmode=%s: %w", cfg.CertMode, err)
	}
	return p, nil
}

// DERPMapJSON returns this node's DERP map (one region, one node) for
// -print-derpmap: host name, addresses, ports and, for a self-signed
// certificate, the CertName that pins it.
func DERPMapJSON(cfg *config.Config) ([]byte, error) {
	key, err := loadKey(cfg)
	if err != nil {
		return nil, err
	}
	info := certs.NodeInfo{IPs: nodeAddrs(cfg), STUNPort: cfg.STUNPort, HTTPPort: cfg.HTTPPort}
	if !cfg.RunSTUN && cfg.XDP == config.XDPOff {
		info.STUNPort = -1
	}
	_, port, _ := net.SplitHostPort(cfg.Addr)
	info.DERPPort, _ = strconv.Atoi(port)
	if !cfg.TLS() {
		// A plain-HTTP lab node: clients reach it only with InsecureForTests.
		node := map[string]any{"Name": "900a", "RegionID": 900, "HostName": cfg.ListenHost(), "DERPPort": info.DERPPort,
			"STUNPort": info.STUNPort, "InsecureForTests": true}
		for _, a := range info.IPs {
			if a.Is4() {
				node["IPv4"] = a.String()
			} else {
				node["IPv6"] = a.String()
			}
		}
		return json.MarshalIndent(map[string]any{"Regions": map[string]any{"900": map[string]any{
			"RegionID": 900, "RegionCode": "xderp", "RegionName": "xderp (plain HTTP, tests only)", "Nodes": []any{node}}}}, "", "  ")
	}
	p, err := newCertProvider(cfg, key, slog.New(slog.DiscardHandler), metrics.NewRegistry())
	if err != nil {
		return nil, err
	}
	defer p.Close()
	return certs.DERPMapJSON(p.DERPMapNode(info), "", "")
}

// nodeAddrs returns the addresses clients should dial: the -a host if it
// names one, else this machine's global unicast addresses.
func nodeAddrs(cfg *config.Config) []netip.Addr {
	if a, err := netip.ParseAddr(cfg.ListenHost()); err == nil && !a.IsUnspecified() {
		return []netip.Addr{a}
	}
	var out []netip.Addr
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil && p.Addr().IsGlobalUnicast() {
			out = append(out, p.Addr())
		}
	}
	return out
}

// tlsVersionCounts are derper's derper_tls_request_version (HTTPS requests
// by negotiated TLS version) and derper_tls_active_version (requests in
// progress plus established DERP connections, which in derper stay inside
// their request), so dashboards built for derper keep working.
type tlsVersionCounts struct {
	requests [5]*metrics.Counter // by version-tls.VersionTLS10; the last: unknown
	inFlight [4]atomic.Int64     // by version-tls.VersionTLS10
}

func newTLSVersionCounts(reg *metrics.Registry, derpConns func(uint16) int64) *tlsVersionCounts {
	t := &tlsVersionCounts{}
	req := reg.CounterVec("derper_tls_request_version", "HTTPS requests by negotiated TLS version", "version")
	for i := range t.requests {
		t.requests[i] = req.With(certs.VersionLabel(uint16(tls.VersionTLS10 + i))) // past 1.3: "unknown"
	}
	reg.Register("derper_tls_active_version", "HTTPS requests in progress plus established DERP connections over TLS, by TLS version", metrics.KindGauge, []string{"version"}, func() []metrics.Sample {
		var out []metrics.Sample
		for i := range t.inFlight {
			v := uint16(tls.VersionTLS10 + i)
			n := t.inFlight[i].Load()
			if derpConns != nil {
				n += derpConns(v)
			}
			if n != 0 || v >= tls.VersionTLS12 { // the versions served always appear
				out = append(out, metrics.Sample{Labels: []string{certs.VersionLabel(v)}, Value: float64(n)})
			}
		}
		return out
	})
	return t
}

// wrap counts every request that arrived over TLS.
func (t *tlsVersionCounts) wrap(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil {
			i := int(r.TLS.Version) - tls.VersionTLS10
			if i < 0 || i >= len(t.inFlight) {
				t.requests[len(t.requests)-1].Inc()
			} else {
				t.requests[i].Inc()
				t.inFlight[i].Add(1)
				defer t.inFlight[i].Add(-1)
			}
		}
		h.ServeHTTP(w, r)
	})
}
