package mesh

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strings"
)

// target is one parsed -mesh-with entry. It names a node (or, for a DNS
// name with several addresses, a set of nodes) by URL; the addresses to
// dial come from dialHost, which is either an IP literal or a name that is
// resolved (and re-resolved) to one peer per address.
type target struct {
	raw      string // the entry as configured, for logs and errors
	tls      bool   // https
	host     string // host name for the Host header, SNI and certificate check
	hostPort string // Host header value (host[:port], port omitted if default)
	dialHost string // name or IP literal to dial
	port     string // TCP port to dial
	path     string // request path, normally /derp
}

// literal returns the dial address if dialHost is an IP literal.
func (t *target) literal() (netip.Addr, bool) {
	a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(t.dialHost, "["), "]"))
	if err != nil {
		return netip.Addr{}, false
	}
	return a.Unmap(), true
}

// parseTarget parses one -mesh-with entry:
//
//	host                  https://host/derp, dial host (derper's form)
//	host/dialhost         https://host/derp, dial dialhost (derper's form)
//	http://ip:port/derp   a full URL (http or https); the path defaults to /derp
//
// host may carry a port (host:port); dialhost may too, else the URL's port
// is used.
func parseTarget(s string) (*target, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, fmt.Errorf("empty entry")
	}
	t := &target{raw: s, path: "/derp"}
	if strings.Contains(s, "://") {
		u, err := url.Parse(s)
		if err != nil {
			return nil, fmt.Errorf("bad URL: %w", err)
		}
		switch u.Scheme {
		case "http":
		case "https":
			t.tls = true
		default:
			return nil, fmt.Errorf("URL scheme %q, want http or https", u.Scheme)
		}
		if u.User != nil || u.RawQuery != "" || u.Fragment != "" {
			return nil, fmt.Errorf("URL must not carry user info, query or fragment")
		}
		if u.Hostname() == "" {
			return nil, fmt.Errorf("URL has no host")
		}
		t.host, t.port = u.Hostname(), u.Port()
		t.hostPort = u.Host
		if u.Path != "" && u.Path != "/" {
			t.path = u.Path
		}
		t.dialHost = t.host
	} else {
		host, dial, hasDial := strings.Cut(s, "/")
		if strings.Contains(dial, "/") {
			return nil, fmt.Errorf("too many components, want host or host/dialhost")
		}
		if host == "" || (hasDial && dial == "") {
			return nil, fmt.Errorf("empty host, want host or host/dialhost")
		}
		t.tls = true
		t.hostPort = host
		t.host = host
		if h, p, err := net.SplitHostPort(host); err == nil {
			t.host, t.port = h, p
		}
		t.dialHost = t.host
		if hasDial {
			t.dialHost = dial
			if h, p, err := net.SplitHostPort(dial); err == nil {
				t.dialHost = h
				if t.port != "" && p != t.port {
					return nil, fmt.Errorf("dialhost port %s differs from host port %s", p, t.port)
				}
				t.port = p
			}
		}
	}
	if t.port == "" {
		t.port = "443"
		if !t.tls {
			t.port = "80"
		}
	}
	if strings.ContainsAny(t.host, " \t,") || strings.ContainsAny(t.dialHost, " \t,/") {
		return nil, fmt.Errorf("invalid host name")
	}
	return t, nil
}
