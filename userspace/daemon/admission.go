package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/metrics"
)

// Client admission through a webhook (-verify-client-url), wire-compatible
// with derper's: for each client that has proved its key, a POST of
// {"NodePublic":"nodekey:<hex>","Source":"<client IP>"}; the client is
// admitted only on a 200 answer whose JSON says {"Allow":true}. When the
// webhook cannot be reached at all, -verify-client-url-fail-open decides.
// Mesh peers are never asked (derpserver skips the hook for them).

const (
	// admitTimeout bounds one webhook request (derper's 5 s); the
	// handshake's own deadline may cut it shorter.
	admitTimeout = 5 * time.Second
	// admitMaxBody is how much of the answer is read (derper's 4 KiB).
	admitMaxBody = 4 << 10
	// admitMaxConns bounds the connections to the webhook: after a
	// restart thousands of clients reconnect at once, and the webhook
	// should see a bounded number of requests in flight, each on a
	// reused connection, not a connection per client.
	admitMaxConns = 32
	// admitLogEvery rate-limits the "unreachable" log line.
	admitLogEvery = 10 * time.Second
)

// Admission results (xderp_admission_requests_total{result}).
const (
	admitAllowed     = "allowed"      // 200 with Allow true
	admitDenied      = "denied"       // 200 with Allow false
	admitBadResponse = "bad_response" // another status, or a body that is not the JSON answer: refused
	admitUnreachable = "unreachable"  // no answer at all: fail-open decides
)

// admitRequest and admitResponse are the webhook's JSON bodies (the field
// names of Tailscale's tailcfg.DERPAdmitClientRequest and Response).
type admitRequest struct {
	NodePublic derp.PublicKey
	Source     netip.Addr
}

type admitResponse struct {
	Allow bool
}

type admission struct {
	url      string
	failOpen bool
	client   *http.Client
	log      *slog.Logger
	results  map[string]*metrics.Counter

	logMu   sync.Mutex
	lastLog time.Time
}

func newAdmission(url string, failOpen bool, log *slog.Logger, reg *metrics.Registry) *admission {
	tr := &http.Transport{
		Proxy:               http.ProxyFromEnvironment,
		DialContext:         (&net.Dialer{Timeout: admitTimeout, KeepAlive: 30 * time.Second}).DialContext,
		TLSHandshakeTimeout: admitTimeout,
		MaxConnsPerHost:     admitMaxConns,
		MaxIdleConnsPerHost: admitMaxConns,
		IdleConnTimeout:     90 * time.Second,
		ForceAttemptHTTP2:   true,
	}
	a := &admission{
		url:      url,
		failOpen: failOpen,
		client: &http.Client{
			Transport: tr,
			// A redirect is an answer other than 200: refuse, as derper.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		log:     log,
		results: make(map[string]*metrics.Counter),
	}
	v := reg.CounterVec("xderp_admission_requests_total", "Admission webhook (-verify-client-url) decisions by result: allowed, denied, bad_response (refused), unreachable (-verify-client-url-fail-open decides)", "result")
	for _, r := range []string{admitAllowed, admitDenied, admitBadResponse, admitUnreachable} {
		a.results[r] = v.With(r)
	}
	return a
}

// admit is the derpserver.AdmitFunc.
func (a *admission) admit(ctx context.Context, key derp.PublicKey, _ *derp.ClientInfo, remote netip.AddrPort) error {
	result, err := a.ask(ctx, key, remote.Addr())
	a.results[result].Inc()
	if result == admitUnreachable {
		a.logUnreachable(err)
		if a.failOpen {
			return nil
		}
	}
	return err
}

func (a *admission) ask(ctx context.Context, key derp.PublicKey, src netip.Addr) (result string, err error) {
	ctx, cancel := context.WithTimeout(ctx, admitTimeout)
	defer cancel()
	body, err := json.Marshal(admitRequest{NodePublic: key, Source: src})
	if err != nil {
		return admitBadResponse, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, a.url, bytes.NewReader(body))
	if err != nil {
		return admitUnreachable, err
	}
	req.Header.Set("Content-Type", "application/json")
	res, err := a.client.Do(req)
	if err != nil {
		return admitUnreachable, fmt.Errorf("admission webhook: %w", err)
	}
	defer res.Body.Close()
	// Read what remains (up to a bound) so the connection can be reused.
	defer io.Copy(io.Discard, io.LimitReader(res.Body, admitMaxBody))
	if res.StatusCode != http.StatusOK {
		return admitBadResponse, fmt.Errorf("admission webhook: %s", res.Status)
	}
	var ans admitResponse
	if err := json.NewDecoder(io.LimitReader(res.Body, admitMaxBody)).Decode(&ans); err != nil {
		return admitBadResponse, fmt.Errorf("admission webhook: answer: %w", err)
	}
	if !ans.Allow {
		return admitDenied, fmt.Errorf("admission webhook: %s from %v not allowed", key.ShortString(), src)
	}
	return admitAllowed, nil
}

// logUnreachable logs an unreachable webhook at most once per
// admitLogEvery: during an outage every connecting client hits it.
func (a *admission) logUnreachable(err error) {
	a.logMu.Lock()
	now := time.Now()
	if now.Sub(a.lastLog) < admitLogEvery {
		a.logMu.Unlock()
		return
	}
	a.lastLog = now
	a.logMu.Unlock()
	verdict := "clients refused"
	if a.failOpen {
		verdict = "clients admitted (-verify-client-url-fail-open)"
	}
	a.log.Warn("admission webhook unreachable; "+verdict, "url", a.url, "err", err)
}

var _ derpserver.AdmitFunc = (*admission)(nil).admit
