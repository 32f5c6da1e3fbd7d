package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/metrics"
)

// Client admission through the local tailscaled (-verify-clients), as
// derper does it: the relay's box runs tailscaled on the same tailnet, and
// a client is admitted only if tailscaled knows its node key (its own or a
// peer's in the network map). The question goes to tailscaled's LocalAPI
// over its Unix socket: GET /localapi/v0/whois?addr=nodekey:<hex>, where
// 200 means known and 404 unknown. Reading the whois answer needs only
// tailscaled's read permission, which every local user has, so the
// unprivileged daemon can ask.
//
// When tailscaled cannot be asked, clients are refused (derper's rule:
// there is no fail-open for this check), and one log line says so at most
// every admitLogEvery.

// DefaultTailscaledSocket is where tailscaled listens on Linux (-socket
// overrides it).
const DefaultTailscaledSocket = "/var/run/tailscale/tailscaled.sock"

const (
	// localAPIHost is the Host header the LocalAPI requires on its socket.
	localAPIHost = "local-tailscaled.sock"
	// whoisMaxBody bounds how much of a whois answer is read (it carries
	// the whole node record, which is not needed).
	whoisMaxBody = 1 << 20
)

type tailscaledCheck struct {
	socket  string
	client  *http.Client
	results map[string]*metrics.Counter
	outage  outageLog
}

func newTailscaledCheck(socket string, log *slog.Logger, results *metrics.CounterVec) *tailscaledCheck {
	if socket == "" {
		socket = DefaultTailscaledSocket
	}
	dialer := &net.Dialer{Timeout: admitTimeout}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, "unix", socket)
		},
		// A reconnect storm after a restart asks about thousands of keys
		// at once; a bounded set of kept-alive connections serves them.
		MaxConnsPerHost:     admitMaxConns,
		MaxIdleConnsPerHost: admitMaxConns,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &tailscaledCheck{
		socket: socket,
		client: &http.Client{
			Transport:     tr,
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		results: admissionResults(results, "tailscaled"),
		outage:  newOutageLog(log),
	}
}

// admit is the derpserver.AdmitFunc.
func (t *tailscaledCheck) admit(ctx context.Context, key derp.PublicKey, _ *derp.ClientInfo, _ netip.AddrPort) error {
	result, err := t.ask(ctx, key)
	t.results[result].Inc()
	if result == admitUnreachable {
		t.outage.warn("tailscaled unreachable; clients refused (-verify-clients)", "socket", t.socket, "err", err)
	}
	return err
}

func (t *tailscaledCheck) ask(ctx context.Context, key derp.PublicKey) (result string, err error) {
	ctx, cancel := context.WithTimeout(ctx, admitTimeout)
	defer cancel()
	res, err := t.get(ctx, "/localapi/v0/whois?addr="+url.QueryEscape("nodekey:"+key.String()))
	if err != nil {
		// The URL is always the same; the cause is what matters.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return admitUnreachable, fmt.Errorf("tailscaled at %s: %w", t.socket, err)
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, whoisMaxBody))
	switch res.StatusCode {
	case http.StatusOK:
		return admitAllowed, nil
	case http.StatusNotFound:
		return admitDenied, fmt.Errorf("peer %s not authorized (not found in local tailscaled)", key.ShortString())
	}
	msg := strings.TrimSpace(string(body))
	if res.StatusCode == http.StatusBadRequest && strings.Contains(msg, "invalid 'addr' parameter") {
		// Old releases cannot look up node keys.
		return admitBadResponse, errors.New("tailscaled is too old to look up node keys; update it for -verify-clients")
	}
	if len(msg) > 200 {
		msg = msg[:200]
	}
	return admitBadResponse, fmt.Errorf("tailscaled: whois: %s: %s", res.Status, msg)
}

func (t *tailscaledCheck) get(ctx context.Context, path string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+localAPIHost+path, nil)
	if err != nil {
		return nil, err
	}
	return t.client.Do(req)
}

// self asks tailscaled for this machine's own node: whether the socket
// answers and the node is logged in. It returns the node's DNS name, key
// and the backend state.
func (t *tailscaledCheck) self(ctx context.Context) (name string, key derp.PublicKey, state string, err error) {
	ctx, cancel := context.WithTimeout(ctx, admitTimeout)
	defer cancel()
	res, err := t.get(ctx, "/localapi/v0/status?peers=false")
	if err != nil {
		return "", key, "", err
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		return "", key, "", fmt.Errorf("status: %s", res.Status)
	}
	var st struct {
		BackendState string
		Self         *struct {
			DNSName   string
			PublicKey derp.PublicKey
		}
	}
	if err := json.NewDecoder(io.LimitReader(res.Body, whoisMaxBody)).Decode(&st); err != nil {
		return "", key, "", fmt.Errorf("status: %w", err)
	}
	if st.Self != nil {
		name, key = st.Self.DNSName, st.Self.PublicKey
	}
	return name, key, st.BackendState, nil
}

// check is /debug/check's part: the relay can verify this machine's own
// node key through tailscaled, as derper's consistency check does.
func (t *tailscaledCheck) check(ctx context.Context) error {
	_, self, state, err := t.self(ctx)
	if err != nil {
		return fmt.Errorf("tailscaled at %s: %w", t.socket, err)
	}
	if self.IsZero() {
		return fmt.Errorf("tailscaled at %s has no node key (state %s)", t.socket, state)
	}
	if _, err := t.ask(ctx, self); err != nil {
		return fmt.Errorf("verifying this node's own key: %w", err)
	}
	return nil
}

// logStartup logs once whether tailscaled answers, so an operator sees a
// missing or logged-out tailscaled at start rather than as refused
// clients. tailscaled may start after the relay: this only logs.
func (t *tailscaledCheck) logStartup(ctx context.Context, log *slog.Logger) {
	name, _, state, err := t.self(ctx)
	switch {
	case err != nil:
		log.Warn("-verify-clients: tailscaled does not answer; clients are refused until it does", "socket", t.socket, "err", err)
	case state != "Running":
		log.Warn("-verify-clients: tailscaled is not running on a tailnet; clients are refused until it is", "socket", t.socket, "state", state)
	default:
		log.Info("-verify-clients: admitting nodes known to tailscaled", "socket", t.socket, "node", name)
	}
}
