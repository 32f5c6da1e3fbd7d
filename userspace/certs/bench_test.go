package certs

import (
	"crypto/tls"
	"net"
	"testing"
	"time"
)

// BenchmarkTLSHandshake measures full (non-resumed) handshakes per second
// with a self-signed ECDSA P-256 certificate plus the meta certificate,
// client and server in this process over loopback (so the figure includes
// the client's work). "wrapped" goes through WrapListener (accounting,
// bounded concurrency); "stdlib" is tls.NewListener with the same config,
// for the overhead ratio.
func BenchmarkTLSHandshake(b *testing.B) {
	for _, v := range []struct {
		name string
		v    uint16
	}{{"TLS1.3", tls.VersionTLS13}, {"TLS1.2", tls.VersionTLS12}} {
		for _, wrapped := range []bool{true, false} {
			name := v.name + "/stdlib"
			if wrapped {
				name = v.name + "/wrapped"
			}
			b.Run(name, func(b *testing.B) {
				cfg, _, _ := baseConfig(b, b.TempDir(), "127.0.0.1")
				p, err := New(cfg)
				if err != nil {
					b.Fatal(err)
				}
				defer p.Close()
				ln, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				var sl net.Listener
				if wrapped {
					sl = p.WrapListener(ln)
				} else {
					sl = tls.NewListener(ln, p.TLSConfig())
				}
				defer sl.Close()
				go func() {
					for {
						c, err := sl.Accept()
						if err != nil {
							return
						}
						go func() {
							c.(*tls.Conn).Handshake() // no-op when wrapped
							c.Close()
						}()
					}
				}()
				ccfg := &tls.Config{InsecureSkipVerify: true, MinVersion: v.v, MaxVersion: v.v}
				b.ResetTimer()
				start := time.Now()
				for i := 0; i < b.N; i++ {
					c, err := tls.Dial("tcp", ln.Addr().String(), ccfg)
					if err != nil {
						b.Fatal(err)
					}
					c.Close()
				}
				b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "handshakes/s")
			})
		}
	}
}
