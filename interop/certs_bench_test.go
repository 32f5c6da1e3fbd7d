package interop

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"tailscale.com/derp/derpserver"
	"tailscale.com/types/key"

	"github.com/xderp/xderp/userspace/certs"
	"github.com/xderp/xderp/userspace/metrics"
)

// BenchmarkCertsTLSConnVsDerper compares new TLS connections per second
// (full handshake + one /derp/probe request, no resumption, no keep-alive)
// between xderp's TLS front (certs.Provider + WrapListener) and derper's
// (http.Server.ServeTLS with derpserver's meta-cert hook), both serving the
// same self-signed ECDSA P-256 certificate on loopback. The two are
// exercised alternately so machine noise hits both; it reports each rate
// and the ratio xderp/derper.
func BenchmarkCertsTLSConnVsDerper(b *testing.B) {
	for _, v := range []struct {
		name string
		v    uint16
	}{{"TLS1.3", tls.VersionTLS13}, {"TLS1.2", tls.VersionTLS12}} {
		b.Run(v.name, func(b *testing.B) {
			priv := key.NewNode()
			srv := derpserver.New(priv, certsQuietLogf)
			defer srv.Close()
			probe := http.HandlerFunc(derpserver.ProbeHandler)

			// xderp
			p, err := certs.New(certs.Config{Mode: certs.ModeManual, Dir: b.TempDir(), Hostname: "127.0.0.1",
				DERPPublicKey: priv.Public().Raw32(), Metrics: metrics.NewRegistry()})
			if err != nil {
				b.Fatal(err)
			}
			defer p.Close()
			xln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			xsrv := &http.Server{Handler: probe}
			go xsrv.Serve(p.WrapListener(xln))
			defer xsrv.Close()

			// derper: same certificate, derper's TLS setup.
			cert, err := p.GetCertificate(&tls.ClientHelloInfo{})
			if err != nil {
				b.Fatal(err)
			}
			plain := *cert
			plain.Certificate = plain.Certificate[:len(plain.Certificate)-1] // derper adds its own meta cert
			dcfg := &tls.Config{MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"},
				GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return &plain, nil }}
			srv.ModifyTLSConfigToAddMetaCert(dcfg)
			dln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			dsrv := &http.Server{Handler: probe, TLSConfig: dcfg}
			go dsrv.ServeTLS(dln, "", "")
			defer dsrv.Close()

			tr := &http.Transport{DisableKeepAlives: true,
				TLSClientConfig: &tls.Config{InsecureSkipVerify: true, MinVersion: v.v, MaxVersion: v.v}}
			client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			get := func(addr string) time.Duration {
				start := time.Now()
				resp, err := client.Get("https://" + addr + "/derp/probe")
				if err != nil {
					b.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK || resp.TLS.Version != v.v {
					b.Fatalf("status %d version %x", resp.StatusCode, resp.TLS.Version)
				}
				return time.Since(start)
			}
			var xt, dt time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				xt += get(xln.Addr().String())
				dt += get(dln.Addr().String())
			}
			b.StopTimer()
			xr := float64(b.N) / xt.Seconds()
			dr := float64(b.N) / dt.Seconds()
			b.ReportMetric(xr, "xderp_conns/s")
			b.ReportMetric(dr, "derper_conns/s")
			b.ReportMetric(xr/dr, "ratio")
		})
	}
}
