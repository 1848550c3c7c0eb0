package audit

import (
	"math/rand/v2"
	"testing"
	"time"
)

// TestStampsFormatAsRFC3339Nano: the cached formatting writes what
// time.RFC3339Nano does, for times within a second of each other, at other
// offsets (UTC, east, west, a zero-offset zone that is not UTC), whole
// seconds, and the same second seen at two offsets in turn.
func TestStampsFormatAsRFC3339Nano(t *testing.T) {
	zones := []*time.Location{time.UTC, time.Local, time.FixedZone("CET", 3600), time.FixedZone("NST", -(3*3600 + 1800)),
		time.FixedZone("GMT", 0), time.FixedZone("LMT", 7*60+13)}
	var s stamps
	rng := rand.New(rand.NewPCG(1, 2))
	base := time.Date(2026, 11, 24, 23, 59, 58, 0, time.UTC)
	check := func(tm time.Time) {
		t.Helper()
		want := tm.Format(time.RFC3339Nano)
		if got := string(s.appendTime(nil, tm)); got != want {
			t.Fatalf("appendTime(%v) = %s, want %s", tm, got, want)
		}
	}
	for i := range 20000 {
		tm := base.Add(time.Duration(rng.Int64N(int64(4 * time.Second)))) // few seconds: the cache is hit
		switch i % 4 {
		case 1:
			tm = tm.Truncate(time.Second) // no fraction
		case 2:
			tm = tm.Truncate(time.Millisecond) // trailing zeros dropped
		case 3:
			tm = time.Unix(rng.Int64N(1<<34)-(1<<33), rng.Int64N(1e9)) // anywhere, before 1970 too
		}
		check(tm.In(zones[rng.IntN(len(zones))]))
	}
	// The same instant at two offsets, one after the other.
	for _, z := range []*time.Location{zones[2], time.UTC, zones[2], zones[4], zones[3]} {
		check(base.Add(123 * time.Microsecond).In(z))
	}
}
