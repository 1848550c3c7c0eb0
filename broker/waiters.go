package broker

import "sync"

// waiters lets flights waiting for another replica's fetch be woken when the
// store announces a change to their key.
type waiters struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

// wait returns a channel closed at the next change to key.
func (w *waiters) wait(key string) <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.m == nil {
		w.m = map[string]chan struct{}{}
	}
	ch, ok := w.m[key]
	if !ok {
		ch = make(chan struct{})
		w.m[key] = ch
	}
	return ch
}

// wake wakes everyone waiting on key.
func (w *waiters) wake(key string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if ch, ok := w.m[key]; ok {
		close(ch)
		delete(w.m, key)
	}
}
