package mesh

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/xderp/xderp/userspace/derp"
)

// clientConn is an established, authenticated mesh connection to one DERP
// server: the HTTP upgrade and the DERP handshake are done and WatchConns
// has been sent.
type clientConn struct {
	nc        net.Conn
	br        *bufio.Reader
	fr        *derp.FrameReader
	serverKey derp.PublicKey
}

// errSelf reports that the remote server has our own key.
var errSelf = errors.New("remote server is this node (self-connection)")

// dialMesh connects to addr (host:port), upgrades to DERP via t's URL,
// authenticates with priv and meshKey (none if zero), and, if watch is set,
// subscribes with WatchConns. self is our own server key: when the remote
// announces it, the connection is closed and errSelf returned before any
// privileged frame is sent.
// The whole exchange must finish within ctx (callers bound it with a
// timeout).
func dialMesh(ctx context.Context, t *target, addr string, tlsConf *tls.Config, priv derp.PrivateKey, self derp.PublicKey, meshKey derp.MeshKey, watch bool) (*clientConn, error) {
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			nc.Close()
		}
	}()
	if dl, has := ctx.Deadline(); has {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if t.tls {
		var conf *tls.Config
		if tlsConf != nil {
			conf = tlsConf.Clone()
		} else {
			conf = new(tls.Config)
		}
		if conf.ServerName == "" {
			conf.ServerName = t.host
		}
		conf.NextProtos = []string{"http/1.1"}
		tc := tls.Client(nc, conf)
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("tls: %w", err)
		}
		nc = tc
	}

	req := "GET " + t.path + " HTTP/1.1\r\n" +
		"Host: " + t.hostPort + "\r\n" +
		"User-Agent: xderp-mesh\r\n" +
		"Connection: Upgrade\r\n" +
		"Upgrade: DERP\r\n\r\n"
	if _, err := io.WriteString(nc, req); err != nil {
		return nil, fmt.Errorf("write upgrade request: %w", err)
	}
	br := bufio.NewReaderSize(nc, 64<<10)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, fmt.Errorf("read upgrade response: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, fmt.Errorf("upgrade refused: %s", resp.Status)
	}

	fr := derp.NewFrameReader(br, derp.MaxFrameSize)
	ft, p, err := fr.ReadFrame()
	if err != nil {
		return nil, fmt.Errorf("read server key: %w", err)
	}
	if ft != derp.FrameServerKey || len(p) > derp.MaxServerKeyLen {
		return nil, fmt.Errorf("first frame is %v of %d bytes, want ServerKey", ft, len(p))
	}
	serverKey, err := derp.ParseServerKey(p)
	if err != nil {
		return nil, err
	}
	if serverKey == self {
		return nil, errSelf
	}

	out, err := derp.AppendClientInfo(nil, priv, serverKey, &derp.ClientInfo{
		MeshKey:     meshKey,
		Version:     derp.ProtocolVersion,
		CanAckPings: true,
	})
	if err != nil {
		return nil, err
	}
	if watch {
		out = derp.AppendWatchConns(out)
	}
	if _, err := nc.Write(out); err != nil {
		return nil, fmt.Errorf("write client info: %w", err)
	}
	ft, p, err = fr.ReadFrame()
	if err != nil {
		return nil, fmt.Errorf("read server info: %w", err)
	}
	if ft != derp.FrameServerInfo {
		return nil, fmt.Errorf("got %v, want ServerInfo", ft)
	}
	if _, err := derp.OpenServerInfo(priv, serverKey, p); err != nil {
		return nil, err
	}
	// Unhook the cancellation first: if stop keeps it from running,
	// clearing the deadline is final; if it has run, the context ended.
	// (Checking ctx.Err after clearing left a window in which a
	// cancellation could still set the 1970 deadline on the connection
	// being returned.)
	if !stop() {
		return nil, ctx.Err()
	}
	nc.SetDeadline(time.Time{})
	ok = true
	return &clientConn{nc: nc, br: br, fr: fr, serverKey: serverKey}, nil
}
