package promtext

import (
	"math"
	"strings"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestWhatPrometheusReads: families written here parse, with Prometheus' own
// text parser, into the names, labels and values written, including label
// values and help texts that need escaping.
func TestWhatPrometheusReads(t *testing.T) {
	var w Writer
	w.Family("x_total", `counts \ things
on two lines`, Counter)
	w.Count("x_total", 7, "credential", `a"b\c`+"\nd", "source", "memory")
	w.Count("x_total", 1<<63, "credential", "plain", "source", "redis")
	w.Family("y_seconds", "a gauge", Gauge)
	w.Sample("y_seconds", 1.5e9+0.25, "credential", "plain")
	w.Sample("y_seconds", -3, "credential", "neg")
	w.Sample("y_seconds", math.Inf(1), "credential", "inf")
	w.Family("z", "no labels", Gauge)
	w.Sample("z", 0)

	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(string(w.Bytes())))
	if err != nil {
		t.Fatalf("%v\n%s", err, w.Bytes())
	}
	x := fams["x_total"]
	if x == nil || x.GetHelp() != "counts \\ things\non two lines" || x.GetType().String() != "COUNTER" || len(x.GetMetric()) != 2 {
		t.Fatalf("x_total = %v", x)
	}
	m := x.GetMetric()[0]
	if got := m.GetLabel()[0].GetValue(); got != `a"b\c`+"\nd" {
		t.Errorf("escaped label value read back as %q", got)
	}
	if m.GetCounter().GetValue() != 7 || x.GetMetric()[1].GetCounter().GetValue() != float64(uint64(1)<<63) {
		t.Errorf("counter values %v", x.GetMetric())
	}
	y := fams["y_seconds"].GetMetric()
	if len(y) != 3 || y[0].GetGauge().GetValue() != 1.5e9+0.25 || y[1].GetGauge().GetValue() != -3 || !math.IsInf(y[2].GetGauge().GetValue(), 1) {
		t.Errorf("gauges %v", y)
	}
	if z := fams["z"]; z == nil || len(z.GetMetric()) != 1 || len(z.GetMetric()[0].GetLabel()) != 0 {
		t.Errorf("z = %v", z)
	}
	w.Reset()
	if len(w.Bytes()) != 0 {
		t.Error("Reset left bytes")
	}
}
