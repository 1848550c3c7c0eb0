package audit

import (
	"sync"
	"time"
)

// DenialWindow is how long denials of one (who, event, outcome) are counted
// before their summary line is written.
const DenialWindow = 10 * time.Second

// maxDenialKeys bounds the pairs counted at once. A denial of a pair beyond
// it is written as it comes, as a first denial is: nothing is dropped, and
// the number of lines stays bounded by the number of distinct sources.
const maxDenialKeys = 10000

// denialKey is what denials are aggregated by: the peer's identity (or, for
// a peer without one, its source address), the event (a refused GetToken
// and a refused InvalidateToken are counted apart) and the outcome.
type denialKey struct{ who, event, outcome string }

// denials counts one pair's denials since its last line.
type denials struct {
	last  Event // the latest denial, for the summary's fields
	count int
	since time.Time
}

// denialState is the Logger's aggregation of denials.
type denialState struct {
	mu      sync.Mutex
	m       map[denialKey]*denials
	start   sync.Once
	close   sync.Once
	stop    chan struct{}
	stopped chan struct{}
	window  time.Duration
}

// WriteDenial records a denial e of who (a caller identity, or a source
// address for a peer without one), aggregated per (who, e.Event, e.Outcome): the
// first denial of a pair is written at once, as Write would; the next ones
// within DenialWindow are only counted, and one summary line per window
// carries their count (event token.denied, "count", "since"). A pair quiet
// for a whole window is forgotten, so that its next denial is written at
// once again. Pending summaries are written at Close. It reports whether e
// was written now; the error is Write's.
//
// A flood of refused calls therefore costs the trail one line per window per
// pair, while a new source's first denial is never held back.
func (l *Logger) WriteDenial(who string, e Event) (written bool, err error) {
	if l == nil || l.sink == nil {
		return false, nil
	}
	d := &l.denials
	d.start.Do(func() { l.startDenials() })
	k := denialKey{who, e.Event, e.Outcome}
	now := time.Now()
	d.mu.Lock()
	if c, ok := d.m[k]; ok {
		c.count++
		c.last = e
		c.last.Scopes = append([]string(nil), e.Scopes...) // the caller's slice is not kept
		d.mu.Unlock()
		return false, nil
	}
	if d.m != nil && len(d.m) < maxDenialKeys { // nil: closed before any denial
		d.m[k] = &denials{since: now}
	}
	d.mu.Unlock()
	return true, l.Write(e)
}

func (l *Logger) startDenials() {
	d := &l.denials
	d.m = map[denialKey]*denials{}
	if d.window == 0 {
		d.window = DenialWindow
	}
	d.stop, d.stopped = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(d.stopped)
		tick := time.NewTicker(d.window)
		defer tick.Stop()
		for {
			select {
			case <-tick.C:
				l.flushDenials(false)
			case <-d.stop:
				return
			}
		}
	}()
}

// flushDenials writes a summary line for each pair denied since its last
// line; pairs with nothing new are forgotten (all of them when final).
func (l *Logger) flushDenials(final bool) {
	d := &l.denials
	now := time.Now()
	var out []Event
	d.mu.Lock()
	for k, c := range d.m {
		if c.count == 0 || final {
			delete(d.m, k)
		}
		if c.count == 0 {
			continue
		}
		e := c.last
		e.RequestID, e.Count, e.Since = "", c.count, c.since
		out = append(out, e)
		c.count, c.since = 0, now
	}
	d.mu.Unlock()
	for _, e := range out {
		_ = l.Write(e) // a summary's failure has nobody to refuse
	}
}

// closeDenials writes the pending summaries and stops the ticker.
func (l *Logger) closeDenials() {
	d := &l.denials
	d.close.Do(func() {
		started := true
		d.start.Do(func() { started = false })
		if !started {
			return
		}
		close(d.stop)
		<-d.stopped
		l.flushDenials(true)
	})
}
