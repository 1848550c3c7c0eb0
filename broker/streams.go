package broker

import (
	"sync"

	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// DefaultWatchStreams is how many WatchToken streams one caller identity may
// hold open at once by default. One identity is often every pod of a
// service account, so the default is generous; it exists so that one
// misbehaving caller cannot take the broker's memory.
const DefaultWatchStreams = 1000

// streamCounts counts open streams per caller identity against a limit.
type streamCounts struct {
	limit int
	mu    sync.Mutex
	open  map[policy.Identity]int
}

// acquire takes a slot for id, reporting false when id holds limit already.
func (s *streamCounts) acquire(id policy.Identity) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[id] >= s.limit {
		return false
	}
	if s.open == nil {
		s.open = map[policy.Identity]int{}
	}
	s.open[id]++
	return true
}

// release gives back a slot acquire took.
func (s *streamCounts) release(id policy.Identity) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.open[id] <= 1 {
		delete(s.open, id)
		return
	}
	s.open[id]--
}
