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
	"time"

	"github.com/xderp/xderp/userspace/derp"
	"github.com/xderp/xderp/userspace/derpserver"
	"github.com/xderp/xderp/userspace/internal/lograte"
	"github.com/xderp/xderp/userspace/metrics"
)

// Client admission. Two checks, each optional, in derper's order: the
// local tailscaled's view of the tailnet (-verify-clients, verifyclients.go)
// and then a webhook (-verify-client-url). A client is admitted only if
// every configured check admits it.
//
// The webhook is wire-compatible with derper's: for each client that has
// proved its key, a POST of
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
	results  map[string]*metrics.Counter
	outage   outageLog
}

// newAdmissionMetric registers xderp_admission_requests_total, shared by
// both checks.
func newAdmissionMetric(reg *metrics.Registry) *metrics.CounterVec {
	return reg.CounterVec("xderp_admission_requests_total", "Client admission decisions by check (via: tailscaled for -verify-clients, webhook for -verify-client-url) and result: allowed, denied, bad_response (refused), unreachable (refused, or for the webhook -verify-client-url-fail-open decides)", "via", "result")
}

// admissionResults returns one check's counters (via: "webhook" or
// "tailscaled"), every result present from the start.
func admissionResults(v *metrics.CounterVec, via string) map[string]*metrics.Counter {
	m := make(map[string]*metrics.Counter)
	for _, r := range []string{admitAllowed, admitDenied, admitBadResponse, admitUnreachable} {
		m[r] = v.With(via, r)
	}
	return m
}

// outageLog logs an unreachable admission service at most once per
// admitLogEvery (during an outage every connecting client hits it), with
// the count of lines left out.
type outageLog struct {
	log *slog.Logger
	lim *lograte.Limiter
}

func newOutageLog(log *slog.Logger) outageLog {
	return outageLog{log: log, lim: lograte.New(1, admitLogEvery)}
}

func (o outageLog) warn(msg string, args ...any) {
	if ok, suppressed := o.lim.Allow(time.Now()); ok {
		o.log.Warn(msg, lograte.Attrs(suppressed, args...)...)
	}
}

// chainAdmit admits a client only if every check does, asking them in
// order and stopping at the first refusal.
func chainAdmit(checks ...derpserver.AdmitFunc) derpserver.AdmitFunc {
	switch len(checks) {
	case 0:
		return nil
	case 1:
		return checks[0]
	}
	return func(ctx context.Context, key derp.PublicKey, info *derp.ClientInfo, remote netip.AddrPort) error {
		for _, check := range checks {
			if err := check(ctx, key, info, remote); err != nil {
				return err
			}
		}
		return nil
	}
}

func newAdmission(url string, failOpen bool, log *slog.Logger, results *metrics.CounterVec) *admission {
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
		results: admissionResults(results, "webhook"),
		outage:  newOutageLog(log),
	}
	return a
}

// admit is the derpserver.AdmitFunc.
func (a *admission) admit(ctx context.Context, key derp.PublicKey, _ *derp.ClientInfo, remote netip.AddrPort) error {
	result, err := a.ask(ctx, key, remote.Addr())
	a.results[result].Inc()
	if result == admitUnreachable {
		verdict := "clients refused"
		if a.failOpen {
			verdict = "clients admitted (-verify-client-url-fail-open)"
		}
		a.outage.warn("admission webhook unreachable; "+verdict, "url", a.url, "err", err)
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

var _ derpserver.AdmitFunc = (*admission)(nil).admit
