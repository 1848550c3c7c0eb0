package dpop

import (
	"crypto/sha256"
	"fmt"
	"os"
	"sync"
)

// keyringSize is how many keys a Keyring remembers: the current one and
// the ones before it whose tokens may still be in use. A key file rotated
// more often than this within one token lifetime leaves the oldest tokens
// without proofs; they are then fetched anew.
const keyringSize = 8

// Keyring is the DPoP key of one credential, read from a file. It is safe
// for concurrent use.
type Keyring struct {
	path, alg string

	mu      sync.RWMutex
	sum     [sha256.Size]byte // of the file's content when current was read
	current *Key
	byJKT   map[string]*Key
	order   []string // thumbprints, oldest first
}

// NewKeyring returns a Keyring for the PEM key in path, to be used with alg
// (see ParseKey). It reads nothing yet.
func NewKeyring(path, alg string) *Keyring {
	return &Keyring{path: path, alg: alg, byJKT: map[string]*Key{}}
}

// Path is the key file.
func (r *Keyring) Path() string { return r.path }

// Current reads the key file and returns its key, remembering it for Key.
// A file whose content did not change is not parsed again.
func (r *Keyring) Current() (*Key, error) {
	b, err := os.ReadFile(r.path)
	if err != nil {
		return nil, fmt.Errorf("dpop key: %w", err)
	}
	defer clear(b)
	sum := sha256.Sum256(b)
	r.mu.RLock()
	k, same := r.current, r.current != nil && r.sum == sum
	r.mu.RUnlock()
	if same {
		return k, nil
	}
	k, err = ParseKey(b, r.alg)
	if err != nil {
		return nil, fmt.Errorf("dpop key %s: %w", r.path, err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if old, ok := r.byJKT[k.jkt]; ok {
		k = old // the same key again (the file rewritten): one Key per thumbprint
	} else {
		r.byJKT[k.jkt] = k
		r.order = append(r.order, k.jkt)
		if len(r.order) > keyringSize {
			delete(r.byJKT, r.order[0])
			r.order = r.order[1:]
		}
	}
	r.current, r.sum = k, sum
	return k, nil
}

// Key returns the key whose thumbprint is jkt, if this Keyring has read
// it. When it has not (another replica read a newer file first), the file
// is read once more.
func (r *Keyring) Key(jkt string) (*Key, bool) {
	r.mu.RLock()
	k, ok := r.byJKT[jkt]
	r.mu.RUnlock()
	if ok {
		return k, true
	}
	if k, err := r.Current(); err == nil && k.jkt == jkt {
		return k, true
	}
	return nil, false
}
