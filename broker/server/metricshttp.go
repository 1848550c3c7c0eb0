package server

import (
	"compress/gzip"
	"net/http"
	"strings"
	"sync"

	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker/promtext"
)

// textFormat is the exposition format /metrics serves: the text format,
// which every Prometheus and every agent that scrapes Prometheus reads.
var textFormat = expfmt.NewFormat(expfmt.TypeTextPlain)

// metricsHandler serves /metrics: the registry's families as client_golang
// encodes them, then the broker's per-credential families, written as text
// straight from its counters (broker.WriteCredentialMetrics) — with ten
// thousand credentials those are most of the series, and making a protobuf
// message of each at every scrape was most of a scrape's time. The body is
// gzip-compressed when the scraper accepts it, as promhttp's is.
func (s *Server) metricsHandler() http.Handler {
	bufs := sync.Pool{New: func() any { return new(promtext.Writer) }}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mfs, err := s.registry.Gather()
		if err != nil {
			s.log.Warn("gathering metrics failed", zap.Error(err))
			http.Error(w, "gathering metrics failed: "+err.Error(), http.StatusInternalServerError)
			return
		}
		body := bufs.Get().(*promtext.Writer)
		defer bufs.Put(body)
		body.Reset()
		enc := expfmt.NewEncoder(body, textFormat)
		for _, mf := range mfs {
			if err := enc.Encode(mf); err != nil {
				http.Error(w, "encoding metrics failed: "+err.Error(), http.StatusInternalServerError)
				return
			}
		}
		s.broker.WriteCredentialMetrics(body)

		h := w.Header()
		h.Set("Content-Type", string(textFormat))
		h.Add("Vary", "Accept-Encoding")
		if !acceptsGzip(r.Header.Get("Accept-Encoding")) {
			_, _ = w.Write(body.Bytes())
			return
		}
		h.Set("Content-Encoding", "gzip")
		gz, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
		_, _ = gz.Write(body.Bytes())
		_ = gz.Close()
	})
}

// acceptsGzip reports whether an Accept-Encoding header value lists gzip
// (without q=0).
func acceptsGzip(header string) bool {
	for part := range strings.SplitSeq(header, ",") {
		coding, params, _ := strings.Cut(strings.TrimSpace(part), ";")
		if strings.EqualFold(strings.TrimSpace(coding), "gzip") {
			q := strings.ReplaceAll(params, " ", "")
			return q != "q=0" && q != "q=0.0" && q != "q=0.00" && q != "q=0.000"
		}
	}
	return false
}
