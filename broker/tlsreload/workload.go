package tlsreload

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"go.uber.org/zap"
)

// WorkloadAPI names the SPIFFE Workload API that serves the material in
// place of files: the broker's X.509-SVID is its serving certificate, and the
// X.509 bundles the API delivers (its own trust domain's and the federated
// ones) verify callers, each SPIFFE ID against its own trust domain's bundle.
type WorkloadAPI struct {
	// Addr is the Workload API address (unix:///path or tcp://ip:port);
	// empty means the SPIFFE_ENDPOINT_SOCKET variable.
	Addr string
	// ID, when set, picks the SVID with this SPIFFE ID among those the API
	// gives this workload; empty means the first.
	ID string
	// Logger receives the Workload API client's messages; nil means none.
	Logger *zap.Logger
}

// WorkloadState is the Workload API connection as readiness shows it.
type WorkloadState struct {
	// Addr is the Workload API address.
	Addr string `json:"workload_api"`
	// State is "ok" while the watch stream is up, "unreachable" after it
	// failed and until the next update. The last SVID is served meanwhile.
	State string `json:"state"`
	// Error is the last watch error while unreachable.
	Error string `json:"error,omitempty"`
	// Since is when State began.
	Since time.Time `json:"since"`
	// SVID is the SPIFFE ID served, and SVIDExpires when that SVID expires.
	SVID        string    `json:"svid"`
	SVIDExpires time.Time `json:"svid_expires"`
	// Updates counts the updates received since start.
	Updates int64 `json:"updates"`
}

// workload is the Workload API side of a Reloader.
type workload struct {
	addr      string
	src       *workloadapi.X509Source
	updated   chan struct{} // one pending notice at most
	pending   atomic.Bool   // an update that Reload has not reported yet
	updates   atomic.Int64
	done      chan struct{}
	closeOnce sync.Once
	log       *zap.Logger

	mu    sync.Mutex
	state WorkloadState
}

// ErrNoSVID is returned by NewWorkloadAPI when the Workload API gives this
// workload no SVID (with the ID asked for, if one was).
var ErrNoSVID = errors.New("the Workload API gives no X.509-SVID")

// NewWorkloadAPI connects to the Workload API and waits, until ctx is done,
// for the first SVID and bundles. The material then follows every update
// the API sends (SVID renewals, bundle changes) until Close; each is
// announced on Updated. minVersion is as for New.
func NewWorkloadAPI(ctx context.Context, w WorkloadAPI, minVersion uint16) (*Reloader, error) {
	wl := &workload{addr: w.Addr, updated: make(chan struct{}, 1), done: make(chan struct{}), log: w.Logger}
	if wl.log == nil {
		wl.log = zap.NewNop()
	}
	if wl.addr == "" {
		wl.addr, _ = workloadapi.GetDefaultAddress()
	}
	var want spiffeid.ID
	if w.ID != "" {
		var err error
		if want, err = spiffeid.FromString(w.ID); err != nil {
			return nil, fmt.Errorf("tls.spiffe.id: %w", err)
		}
	}
	var offered []string // the IDs the last update offered, for the error below
	var offeredMu sync.Mutex
	picker := func(svids []*x509svid.SVID) *x509svid.SVID {
		offeredMu.Lock()
		offered = offered[:0]
		for _, s := range svids {
			offered = append(offered, s.ID.String())
		}
		offeredMu.Unlock()
		if want.IsZero() && len(svids) > 0 {
			return svids[0]
		}
		for _, s := range svids {
			if s.ID == want {
				return s
			}
		}
		return nil
	}
	opts := []workloadapi.ClientOption{workloadapi.WithLogger(watchLogger{wl})}
	if wl.addr != "" {
		opts = append(opts, workloadapi.WithAddr(wl.addr))
	}
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(opts...),
		workloadapi.WithDefaultX509SVIDPicker(picker))
	if err != nil {
		return nil, fmt.Errorf("SPIFFE Workload API %s: %w", wl.addr, err)
	}
	wl.src = src
	r := &Reloader{minVersion: minVersion, wl: wl}
	// The first update may lack the SVID picked (an entry not yet synced
	// to the agent): wait for one that has it.
	m, err := wl.material()
	for err != nil && ctx.Err() == nil {
		select {
		case <-src.Updated():
			m, err = wl.material()
		case <-ctx.Done():
		}
	}
	if err != nil {
		_ = src.Close()
		offeredMu.Lock()
		defer offeredMu.Unlock()
		if !want.IsZero() {
			return nil, fmt.Errorf("SPIFFE Workload API %s: %w with ID %s (it gives %v)", wl.addr, ErrNoSVID, want, offered)
		}
		return nil, fmt.Errorf("SPIFFE Workload API %s: %w", wl.addr, err)
	}
	r.cur.Store(m)
	wl.setState("ok", "", m)
	go wl.follow(r)
	return r, nil
}

// material builds the current SVID into material whose bundles are the
// source's, always the latest.
func (wl *workload) material() (*material, error) {
	svid, err := wl.src.GetX509SVID()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNoSVID, err)
	}
	cert := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, c := range svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	return &material{cert: cert, leaf: svid.Certificates[0], bundles: wl.src}, nil
}

// follow puts each update in force until the source is closed.
func (wl *workload) follow(r *Reloader) {
	for {
		select {
		case <-wl.done:
			return
		case <-wl.src.Updated():
		}
		m, err := wl.material()
		if err != nil { // an update without our SVID: keep serving the last one
			wl.log.Error("SPIFFE Workload API update has no SVID for this workload; the previous stays in force", zap.Error(err))
			continue
		}
		r.cur.Store(m)
		wl.updates.Add(1)
		wl.setState("ok", "", m)
		wl.pending.Store(true)
		select {
		case wl.updated <- struct{}{}:
		default:
		}
	}
}

func (wl *workload) setState(state, errMsg string, m *material) {
	wl.mu.Lock()
	defer wl.mu.Unlock()
	if state != wl.state.State {
		wl.state.Since = time.Now()
	}
	wl.state.State, wl.state.Error = state, errMsg
	if m != nil {
		if len(m.leaf.URIs) > 0 {
			wl.state.SVID = m.leaf.URIs[0].String()
		}
		wl.state.SVIDExpires = m.leaf.NotAfter
	}
}

// watchLogger turns the Workload API client's log into the connection state
// (its watch errors reach no other hook) and into the process log.
type watchLogger struct{ wl *workload }

func (l watchLogger) Debugf(string, ...any) {}
func (l watchLogger) Infof(format string, args ...any) {
	l.wl.log.Info("SPIFFE Workload API: " + fmt.Sprintf(format, args...))
}
func (l watchLogger) Warnf(format string, args ...any) {
	l.wl.log.Warn("SPIFFE Workload API: " + fmt.Sprintf(format, args...))
}

// Errorf records a failed watch: the source retries by itself (1s, 2s, …
// up to 30s apart) while the last SVID stays in force.
func (l watchLogger) Errorf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	wl := l.wl
	wl.mu.Lock()
	was := wl.state.State
	wl.mu.Unlock()
	if was != "unreachable" {
		wl.log.Warn("SPIFFE Workload API unreachable; serving with the last SVID", zap.String("error", msg),
			zap.Time("svid_expires", wl.stateCopy().SVIDExpires))
	}
	wl.setState("unreachable", msg, nil)
}

func (wl *workload) stateCopy() WorkloadState {
	wl.mu.Lock()
	defer wl.mu.Unlock()
	s := wl.state
	s.Addr = wl.addr
	s.Updates = wl.updates.Load()
	return s
}

// Updated is sent on after each update from the Workload API has taken
// effect; it is nil (never ready) for files, which Reload polls.
func (r *Reloader) Updated() <-chan struct{} {
	if r.wl == nil {
		return nil
	}
	return r.wl.updated
}

// WorkloadState reports the Workload API connection; nil for files.
func (r *Reloader) WorkloadState() *WorkloadState {
	if r.wl == nil {
		return nil
	}
	s := r.wl.stateCopy()
	return &s
}

// Close stops following the Workload API; a no-op for files.
func (r *Reloader) Close() error {
	if r.wl == nil {
		return nil
	}
	var err error
	r.wl.closeOnce.Do(func() {
		close(r.wl.done)
		err = r.wl.src.Close()
	})
	return err
}
