package broker

import (
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// Bounds of what the inventory remembers per credential.
const (
	// MaxRecentCallers is how many distinct callers the inventory lists per
	// credential, the most recent first.
	MaxRecentCallers = 100
	// RecentCallersWindow is how far back the inventory's callers go.
	RecentCallersWindow = time.Hour
)

// credStats is what the broker remembers about a credential's use, for the
// inventory and the per-credential metrics. It outlives reloads that keep
// the credential (SetCredentials hands it on), and goes with the credential
// when a reload removes it.
type credStats struct {
	check credCheck               // the background check's state (health.go): idle credentials have it too
	gateP atomic.Pointer[gate]    // when the next token request may go out; made at the first fetch
	useP  atomic.Pointer[credUse] // made at the first use
}

// credUse is the record of a credential's use: its counts, its last fetch and
// its recent callers.
type credUse struct {
	counts
	lastFetch atomic.Pointer[FetchRecord]
	mark      atomic.Pointer[callerMark] // the caller noted last, and when; written under mu

	mu sync.Mutex
	// callers holds the Unix seconds of each caller's last token, from the
	// second caller on: while there has been one, the mark says all (most
	// credentials have one caller, and a map is a few hundred bytes).
	callers map[policy.Identity]int64
}

// use returns the record of the credential's use, making it at the first
// call: a credential nobody asked for has none.
func (s *credStats) use() *credUse {
	if u := s.useP.Load(); u != nil {
		return u
	}
	s.useP.CompareAndSwap(nil, &credUse{})
	return s.useP.Load()
}

type callerMark struct {
	caller policy.Identity
	sec    int64
}

// noteIssued records that caller received a token. On the hit path: when the
// same caller was noted within the same second (the steady state of a busy
// caller) it costs a pointer load and a string comparison, and takes no lock;
// otherwise an update under the credential's lock.
func (s *credUse) noteIssued(caller policy.Identity, now time.Time) {
	sec := now.Unix()
	if m := s.mark.Load(); m != nil && m.sec == sec && m.caller == caller {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if m := s.mark.Load(); s.callers == nil && m != nil && m.caller != caller {
		s.callers = map[policy.Identity]int64{m.caller: m.sec} // a second caller: from now on, a map
	}
	if s.callers != nil {
		if _, known := s.callers[caller]; !known && len(s.callers) >= MaxRecentCallers {
			var oldestID policy.Identity
			oldest := int64(1<<63 - 1)
			for id, t := range s.callers {
				if t < oldest {
					oldest, oldestID = t, id
				}
			}
			delete(s.callers, oldestID)
		}
		s.callers[caller] = sec
	}
	s.mark.Store(&callerMark{caller: caller, sec: sec})
}

// recentCallers calls f with each recent caller's identity and the Unix
// second of its last token.
func (s *credUse) recentCallers(f func(policy.Identity, int64)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.callers == nil {
		if m := s.mark.Load(); m != nil {
			f(m.caller, m.sec)
		}
		return
	}
	for id, sec := range s.callers {
		f(id, sec)
	}
}

// FetchRecord is the last request to a credential's token endpoint.
type FetchRecord struct {
	// Time is when it ended.
	Time time.Time `json:"time"`
	// Outcome is "ok" or the failure class.
	Outcome string `json:"outcome"`
}

// CallerRecord is a caller that received a token of a credential.
type CallerRecord struct {
	// Caller is the caller's identity.
	Caller string `json:"caller"`
	// Last is when it last received one.
	Last time.Time `json:"last"`
}

// TokenSet is a cached token of a credential, for one scope set.
type TokenSet struct {
	// Scopes are the scopes of the set.
	Scopes []string `json:"scopes"`
	// Fingerprint identifies the token (never the token itself).
	Fingerprint string `json:"fingerprint"`
	// ExpireTime is when the token expires.
	ExpireTime time.Time `json:"expire_time"`
}

// CredentialUse is what the broker knows of a credential's state and use.
type CredentialUse struct {
	// Upstream is the state of its token endpoint.
	Upstream CredentialHealth `json:"upstream"`
	// Cached are the tokens this process holds, by scope set.
	Cached []TokenSet `json:"cached_tokens"`
	// LastFetch is the last request to the token endpoint, if any.
	LastFetch *FetchRecord `json:"last_fetch,omitempty"`
	// Issued counts tokens handed out since the process started
	// (tokenbroker_tokens_issued_total).
	Issued int64 `json:"tokens_issued"`
	// RecentCallers received a token within RecentCallersWindow, the most
	// recent first, at most MaxRecentCallers.
	RecentCallers []CallerRecord `json:"recent_callers"`
}

// Use returns the state and use of every configured credential, by name.
func (b *Broker) Use() map[string]CredentialUse {
	now := b.now()
	out := map[string]CredentialUse{}
	for name, c := range *b.creds.Load() {
		u := CredentialUse{Upstream: c.stats.upstreamHealth(), Cached: []TokenSet{}, RecentCallers: []CallerRecord{}}
		if cu := c.stats.useP.Load(); cu != nil {
			u.Issued, u.LastFetch = int64(cu.issued()), cu.lastFetch.Load()
			cu.recentCallers(func(id policy.Identity, sec int64) {
				if last := time.Unix(sec, 0); now.Sub(last) <= RecentCallersWindow {
					u.RecentCallers = append(u.RecentCallers, CallerRecord{Caller: string(id), Last: last})
				}
			})
		}
		sort.Slice(u.RecentCallers, func(i, j int) bool { return u.RecentCallers[i].Last.After(u.RecentCallers[j].Last) })
		out[name] = u
	}
	b.l1.Range(func(_, v any) bool {
		s := v.(*slot)
		u, ok := out[s.cred]
		if e := s.entry.Load(); ok && e != nil && now.Before(e.Expiry) {
			u.Cached = append(u.Cached, TokenSet{Scopes: slices.Clone(s.scopes), Fingerprint: e.Fingerprint, ExpireTime: e.Expiry})
			out[s.cred] = u
		}
		return true
	})
	return out
}

// upstreamHealth is the retry gate's view of the credential: "ok" until a
// fetch has failed.
func (st *credStats) upstreamHealth() CredentialHealth {
	if g := st.gateP.Load(); g != nil {
		return g.health()
	}
	return CredentialHealth{State: "ok"}
}

// forgetRemoved drops the cached tokens (in this process) of credentials
// that are no longer configured. (Their retry state and statistics went with
// the credentials they belong to.)
func (b *Broker) forgetRemoved(current map[string]*credential) {
	b.l1.Range(func(k, v any) bool {
		if s := v.(*slot); current[s.cred] == nil {
			b.forget(k.(string), s)
		}
		return true
	})
}
