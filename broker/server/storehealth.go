package server

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/tokenbroker/broker"
	"github.com/tokenbroker/tokenbroker/store"
)

// storeDetail is the store's part of the /readyz body: its state and, for
// Redis, each node's state as the probe last found it and what the store
// refused from Redis since start.
func storeDetail(st store.Store) map[string]any {
	d := map[string]any{"backend": st.Name(), "state": st.State()}
	if r, ok := st.(*store.Redis); ok {
		d["nodes"] = r.Nodes()
		d["last_probe"] = r.LastProbe().UTC().Format(time.RFC3339Nano)
		d["outages"] = r.Outages()
		d["unsealable_values"] = r.Unsealable()
		d["tampered_values"] = r.Tampered()
		d["leases_broken"] = r.LeasesBroken()
		d["events_rejected"] = r.EventsRejected()
	}
	return d
}

// overallState is "ok" when the store and every credential are ok, else
// "degraded". It does not fail readiness (see readyz).
func overallState(st store.Store, creds map[string]broker.CredentialHealth) string {
	if st.State() != "ok" {
		return "degraded"
	}
	for _, h := range creds {
		if h.State != "ok" {
			return "degraded"
		}
	}
	return "ok"
}

var (
	eventsRejectedDesc = prometheus.NewDesc("tokenbroker_store_events_rejected_total",
		"Pub/sub messages dropped: not an authenticated event of the fleet (malformed, mac), too old or too new (stale), or seen before (replay).",
		[]string{"reason"}, nil)
	leasesBrokenDesc = prometheus.NewDesc("tokenbroker_store_leases_broken_total",
		"Stale leases broken: without a TTL, with one above the lease bound, or not a lease (someone else wrote them).", nil, nil)
	valuesRefusedDesc = prometheus.NewDesc("tokenbroker_store_values_refused_total",
		"Stored values treated as absent: they did not open (unsealable) or their plain fields disagreed with the sealed ones (tampered).",
		[]string{"reason"}, nil)
)

// storeCollector exports the Redis store's counters.
type storeCollector struct{ r *store.Redis }

// Describe implements prometheus.Collector.
func (c storeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- eventsRejectedDesc
	ch <- leasesBrokenDesc
	ch <- valuesRefusedDesc
}

// Collect implements prometheus.Collector.
func (c storeCollector) Collect(ch chan<- prometheus.Metric) {
	for reason, n := range c.r.EventsRejected() {
		ch <- prometheus.MustNewConstMetric(eventsRejectedDesc, prometheus.CounterValue, float64(n), reason)
	}
	ch <- prometheus.MustNewConstMetric(leasesBrokenDesc, prometheus.CounterValue, float64(c.r.LeasesBroken()))
	ch <- prometheus.MustNewConstMetric(valuesRefusedDesc, prometheus.CounterValue, float64(c.r.Unsealable()), "unsealable")
	ch <- prometheus.MustNewConstMetric(valuesRefusedDesc, prometheus.CounterValue, float64(c.r.Tampered()), "tampered")
}
