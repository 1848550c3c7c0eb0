package broker

import (
	"net/url"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/tokenbroker/tokenbroker/broker/audit"
)

// metrics are the Broker's Prometheus collectors. Labels carry credential
// names and fixed words only, never caller identities (cardinality).
type metrics struct {
	source      *prometheus.CounterVec   // credential, source
	upstream    *prometheus.CounterVec   // credential, outcome
	upstreamDur *prometheus.HistogramVec // endpoint: the token endpoint's host, not the credential (a histogram is 13 series)
	storeErrors *prometheus.CounterVec   // op
	lockWait    prometheus.Histogram
	audit       *prometheus.CounterVec        // event
	auditEvents map[string]prometheus.Counter // the known events' series, looked up once
	secretUsed  *prometheus.CounterVec        // credential, secret (index in client_secret_files)

	// leaseOverruns counts fetches made without the lease after waiting
	// longer than its bound (a lease someone else keeps writing).
	leaseOverruns *prometheus.CounterVec // credential
}

// storeOps are the store operations counted in tokenbroker_store_errors_total;
// each series exists from the start, so that rate() works before the first error.
var storeOps = []string{"get", "put", "lock", "delete"}

func newMetrics() *metrics {
	m := &metrics{
		source: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_token_source_total",
			Help: "Tokens handed to callers, by credential and where they came from (memory, redis, upstream).",
		}, []string{"credential", "source"}),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_upstream_requests_total",
			Help: "Requests to token endpoints, by credential and outcome (ok, or the failure class).",
		}, []string{"credential", "outcome"}),
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
		leaseOverruns: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_lease_wait_exceeded_total",
			Help: "Fetches made without the lease after waiting longer than the lease bound for another replica's.",
		}, []string{"credential"}),
		secretUsed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "tokenbroker_client_secret_used_total",
			Help: "Successful token requests by the client secret that worked (index in client_secret_files; 0 with one file).",
		}, []string{"credential", "secret"}),
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

var (
	expiryDesc = prometheus.NewDesc("tokenbroker_token_expiry_seconds",
		"Seconds until the freshest cached token of each credential expires (the one the refresher keeps young).", []string{"credential"}, nil)
	healthyDesc = prometheus.NewDesc("tokenbroker_credential_healthy",
		"1 while the credential's token endpoint answers, 0 while it fails or refuses the broker.", []string{"credential"}, nil)
)

// Describe implements prometheus.Collector.
func (b *Broker) Describe(ch chan<- *prometheus.Desc) {
	b.m.source.Describe(ch)
	b.m.upstream.Describe(ch)
	b.m.upstreamDur.Describe(ch)
	b.m.storeErrors.Describe(ch)
	b.m.lockWait.Describe(ch)
	b.m.leaseOverruns.Describe(ch)
	b.m.audit.Describe(ch)
	b.m.secretUsed.Describe(ch)
	ch <- expiryDesc
	ch <- healthyDesc
	ch <- lastSuccessDesc
}

// Collect implements prometheus.Collector; the gauges are computed at scrape time.
func (b *Broker) Collect(ch chan<- prometheus.Metric) {
	b.m.source.Collect(ch)
	b.m.upstream.Collect(ch)
	b.m.upstreamDur.Collect(ch)
	b.m.storeErrors.Collect(ch)
	b.m.lockWait.Collect(ch)
	b.m.leaseOverruns.Collect(ch)
	b.m.audit.Collect(ch)
	b.m.secretUsed.Collect(ch)

	now := b.now()
	// The freshest token, not the oldest: an idle scope set's token may run
	// down harmlessly, but when even the freshest is close to expiry, callers are.
	freshest := map[string]time.Duration{}
	b.l1.Range(func(_, v any) bool {
		s := v.(*slot)
		if e := s.entry.Load(); e != nil {
			if left, ok := freshest[s.cred]; !ok || e.Expiry.Sub(now) > left {
				freshest[s.cred] = e.Expiry.Sub(now)
			}
		}
		return true
	})
	for name, left := range freshest {
		ch <- prometheus.MustNewConstMetric(expiryDesc, prometheus.GaugeValue, left.Seconds(), name)
	}
	health := b.Health()
	b.collectLastSuccess(ch, health)
	for name, h := range health {
		v := 0.0
		if h.State == "ok" {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(healthyDesc, prometheus.GaugeValue, v, name)
	}
}

// issuedByCredential sums tokenbroker_token_source_total by credential.
func (m *metrics) issuedByCredential() map[string]int64 {
	ch := make(chan prometheus.Metric, 64)
	go func() { m.source.Collect(ch); close(ch) }()
	out := map[string]int64{}
	for mt := range ch {
		var d dto.Metric
		if mt.Write(&d) != nil {
			continue
		}
		for _, l := range d.GetLabel() {
			if l.GetName() == "credential" {
				out[l.GetValue()] += int64(d.GetCounter().GetValue())
			}
		}
	}
	return out
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
