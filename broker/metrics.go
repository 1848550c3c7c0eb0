package broker

import (
	"net/url"
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/promtext"
)

// metrics are the Broker's Prometheus collectors. Labels carry credential
// names and fixed words only, never caller identities (cardinality).
type metrics struct {
	upstreamDur *prometheus.HistogramVec // endpoint: the token endpoint's host, not the credential (a histogram is 13 series)
	storeErrors *prometheus.CounterVec   // op
	lockWait    prometheus.Histogram
	audit       *prometheus.CounterVec        // event
	auditEvents map[string]prometheus.Counter // the known events' series, looked up once
}

// storeOps are the store operations counted in tokenbroker_store_errors_total;
// each series exists from the start, so that rate() works before the first error.
var storeOps = []string{"get", "put", "lock", "delete"}

func newMetrics() *metrics {
	m := &metrics{
		upstreamDur: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "tokenbroker_upstream_duration_seconds",
			Help:    "Duration of requests to token endpoints, by endpoint (host and port of token_url).",
			Buckets: []float64{.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"endpoint"}),
		storeErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_store_errors_total",
			Help: "Failed store operations, by operation (the broker fails open).",
		}, []string{"op"}),
		lockWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "tokenbroker_lock_wait_seconds",
			Help:    "Time spent waiting for another replica's fetch.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}),
		audit: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_audit_events_total",
			Help: "Audit events recorded, by event.",
		}, []string{"event"}),
	}
	for _, op := range storeOps {
		m.storeErrors.WithLabelValues(op)
	}
	m.auditEvents = map[string]prometheus.Counter{}
	for _, e := range []string{audit.TokenIssued, audit.TokenDenied, audit.TokenInvalidated, audit.UpstreamFetch, audit.ProofIssued, audit.ConfigReloaded} {
		m.auditEvents[e] = m.audit.WithLabelValues(e)
	}
	return m
}

// Describe implements prometheus.Collector. The per-credential families
// are not among them: WriteCredentialMetrics writes those.
func (b *Broker) Describe(ch chan<- *prometheus.Desc) {
	b.m.upstreamDur.Describe(ch)
	b.m.storeErrors.Describe(ch)
	b.m.lockWait.Describe(ch)
	b.m.audit.Describe(ch)
}

// Collect implements prometheus.Collector.
func (b *Broker) Collect(ch chan<- prometheus.Metric) {
	b.m.upstreamDur.Collect(ch)
	b.m.storeErrors.Collect(ch)
	b.m.lockWait.Collect(ch)
	b.m.audit.Collect(ch)
}

// The per-credential families, written by WriteCredentialMetrics.
const (
	sourceFamily      = "tokenbroker_token_source_total"
	issuedFamily      = "tokenbroker_tokens_issued_total"
	upstreamFamily    = "tokenbroker_upstream_requests_total"
	secretFamily      = "tokenbroker_client_secret_used_total"
	overrunFamily     = "tokenbroker_lease_wait_exceeded_total"
	expiryFamily      = "tokenbroker_token_expiry_seconds"
	healthyFamily     = "tokenbroker_credential_healthy"
	lastSuccessFamily = "tokenbroker_credential_last_success_timestamp_seconds"
	credentialsFamily = "tokenbroker_credentials"
)

// CredentialFamilies are the names of the families WriteCredentialMetrics
// writes; no collector registered beside it may have them.
var CredentialFamilies = []string{sourceFamily, issuedFamily, upstreamFamily, secretFamily, overrunFamily,
	expiryFamily, credentialsFamily, healthyFamily, lastSuccessFamily}

// WriteCredentialMetrics appends the per-credential families to w, read
// from the credentials' counters and state now, credentials in name order.
// A family without series is left out, as client_golang leaves out a vector
// without series.
func (b *Broker) WriteCredentialMetrics(w *promtext.Writer) {
	// The credentials and the counts of those removed are read under the
	// lock SetCredentials holds, with the counts by source summed over them:
	// so a reload never makes tokenbroker_token_source_total go down.
	b.setting.Lock()
	creds := *b.creds.Load()
	bySource := b.retired
	for _, c := range creds {
		if u := c.stats.useP.Load(); u != nil {
			for j := range u.sources {
				bySource[j] += u.sources[j].Load()
			}
		}
	}
	b.setting.Unlock()
	names := make([]string, 0, len(creds))
	for name := range creds {
		names = append(names, name)
	}
	slices.Sort(names)
	// An in-process store is named "memory" too; counts.source counts its
	// tokens as the cache's, and its series is not written twice.
	sources := [numSources]string{SourceMemory, b.store.Name(), SourceUpstream}
	fam := familyWriter{w: w}

	uses := make([]*credUse, len(names))
	for i, n := range names {
		uses[i] = creds[n].stats.useP.Load()
	}
	// Where tokens came from, over all credentials (by credential and
	// source it was a series per credential and source: issue 27).
	fam.start(sourceFamily, "Tokens handed to callers, by where they came from (memory, the store, upstream).", promtext.Counter)
	for j, src := range sources {
		if j != fromStore || src != SourceMemory {
			fam.count(bySource[j], "source", src)
		}
	}

	fam.start(issuedFamily, "Tokens handed to callers, by credential (only credentials that were used have a series).", promtext.Counter)
	for i, n := range names {
		if u := uses[i]; u != nil {
			if v := u.issued(); v > 0 {
				fam.count(v, "credential", n)
			}
		}
	}

	fam.start(upstreamFamily, "Requests to token endpoints, by credential and outcome (ok, or the failure class).", promtext.Counter)
	for i, n := range names {
		u := uses[i]
		if u == nil {
			continue
		}
		if v := u.ok.Load(); v > 0 {
			fam.count(v, "credential", n, "outcome", "ok")
		}
		if r := u.rare.Load(); r != nil {
			for _, f := range r.failures {
				fam.count(f.n, "credential", n, "outcome", f.outcome)
			}
		}
	}

	fam.start(secretFamily, "Successful token requests by the client secret that worked (index in client_secret_files), for credentials with more than one.", promtext.Counter)
	for i, n := range names {
		if u := uses[i]; u != nil {
			if r := u.rare.Load(); r != nil {
				for j, v := range r.secrets {
					if v > 0 {
						fam.count(v, "credential", n, "secret", strconv.Itoa(j))
					}
				}
			}
		}
	}

	fam.start(overrunFamily, "Fetches made without the lease after waiting longer than the lease bound for another replica's.", promtext.Counter)
	for i, n := range names {
		if u := uses[i]; u != nil {
			if v := u.overruns.Load(); v > 0 {
				fam.count(v, "credential", n)
			}
		}
	}

	now := b.now()
	// A token overdue for refresh: one that callers here still ask for (so
	// the refresher keeps it young) and that the refresher should have
	// replaced by now — past its refresh point by more than one request to
	// the token endpoint may take. Tokens nobody asks for run down
	// harmlessly and are left out, as is every token refreshed in time.
	overdue := map[string]time.Time{}
	b.l1.Range(func(_, v any) bool {
		s := v.(*slot)
		c := creds[s.cred]
		e := s.entry.Load()
		if e == nil || s.idle(c, now) || now.Before(s.refreshPoint(c, e).Add(c.Timeout)) {
			return true
		}
		if t, ok := overdue[s.cred]; !ok || e.Expiry.Before(t) {
			overdue[s.cred] = e.Expiry
		}
		return true
	})
	fam.start(expiryFamily, "Seconds left on the credential's token closest to expiry among those overdue for refresh: asked for by callers here, and past its refresh point by more than the credential's timeout. No series while every token in use is refreshed in time.", promtext.Gauge)
	for _, n := range names {
		if t, ok := overdue[n]; ok {
			fam.sample(t.Sub(now).Seconds(), "credential", n)
		}
	}

	// Health: a count of credentials by state, and per credential only those
	// not ok — with ten thousand credentials, ten thousand series saying 1
	// carry nothing an alert or the dashboard reads (issue 27).
	health := make([]CredentialHealth, len(names))
	var byState [len(healthStates)]int
	for i, n := range names {
		health[i] = b.health(creds[n])
		if k := slices.Index(healthStates[:], health[i].State); k >= 0 {
			byState[k]++
		}
	}
	fam.start(credentialsFamily, "Credentials by the state of their token endpoint: ok, failing, refused, unknown (not checked yet).", promtext.Gauge)
	for i, st := range healthStates {
		fam.sample(float64(byState[i]), "state", st)
	}
	fam.start(healthyFamily, "0 for each credential whose token endpoint fails, refuses the broker or has not been checked yet; a credential that is ok has no series (tokenbroker_credentials counts them).", promtext.Gauge)
	for i, n := range names {
		if health[i].State != "ok" {
			fam.sample(0, "credential", n)
		}
	}
	fam.start(lastSuccessFamily, "When the token endpoint of a credential that is not ok last answered (a token fetched, or a background connection check passed), Unix time.", promtext.Gauge)
	for i, n := range names {
		if t := health[i].LastSuccess; t != nil && health[i].State != "ok" {
			fam.sample(float64(t.UnixNano())/1e9, "credential", n)
		}
	}
}

// healthStates are the states of CredentialHealth, as tokenbroker_credentials
// counts them.
var healthStates = [...]string{"ok", "failing", "refused", "unknown"}

// familyWriter writes a family's HELP and TYPE lines before its first
// sample, so that a family without samples is left out.
type familyWriter struct {
	w             *promtext.Writer
	name, help    string
	typ           promtext.Type
	headerWritten bool
}

func (f *familyWriter) start(name, help string, t promtext.Type) {
	f.name, f.help, f.typ, f.headerWritten = name, help, t, false
}

func (f *familyWriter) header() {
	if !f.headerWritten {
		f.w.Family(f.name, f.help, f.typ)
		f.headerWritten = true
	}
}

func (f *familyWriter) count(v uint64, labels ...string) {
	f.header()
	f.w.Count(f.name, v, labels...)
}

func (f *familyWriter) sample(v float64, labels ...string) {
	f.header()
	f.w.Sample(f.name, v, labels...)
}

// endpointOf is the label tokenbroker_upstream_duration_seconds has for
// tokenURL: its host and port. Credentials share a few token endpoints, so
// the histogram costs per endpoint, not per credential.
func endpointOf(tokenURL string) string {
	u, err := url.Parse(tokenURL)
	if err != nil || u.Host == "" {
		return "unknown"
	}
	return u.Host
}
