package server

import (
	"cmp"
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/tlsreload"
)

// WorkloadAPIWait bounds how long New waits for the broker's first SVID
// from the SPIFFE Workload API (an agent that is starting, an entry not yet
// synced to it).
const WorkloadAPIWait = time.Minute

// minSPIFFEConnectionAge is the least default connection age under tls.spiffe.
const minSPIFFEConnectionAge = 5 * time.Second

// newTLS loads the server's TLS material: from the files, or with
// tls.spiffe from the Workload API, which then keeps it current.
func newTLS(cfg *config.Config, minVersion uint16, log *zap.Logger) (*tlsreload.Reloader, error) {
	if sp := cfg.TLS.SPIFFE; sp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), WorkloadAPIWait)
		defer cancel()
		return tlsreload.NewWorkloadAPI(ctx, tlsreload.WorkloadAPI{Addr: sp.Address(), ID: sp.ID, Logger: log}, minVersion)
	}
	files := tlsreload.Files{CertFile: cfg.TLS.CertFile, KeyFile: cfg.TLS.KeyFile, ClientCAFile: cfg.TLS.ClientCAFile}
	for _, b := range cfg.TLS.ClientTrustBundles {
		files.TrustBundles = append(files.TrustBundles, tlsreload.TrustBundle{TrustDomain: b.TrustDomain, CAFile: b.CAFile})
	}
	return tlsreload.New(files, minVersion)
}

// maxConnectionAge is tls.max_connection_age, or its default. Under
// tls.spiffe the default is a quarter of the broker's SVID lifetime: SPIRE
// renews SVIDs at half their lifetime, so a caller's connection is asked to
// move (GOAWAY, its calls finishing) well before the SVID it was opened with
// expires, rather than being cut when it does.
func (s *Server) maxConnectionAge() time.Duration {
	if d := s.cfg.TLS.MaxConnectionAge.D(); d != 0 || s.cfg.TLS.SPIFFE == nil {
		return cmp.Or(d, config.DefaultMaxConnectionAge)
	}
	leaf := s.tls.Leaf()
	return min(max(leaf.NotAfter.Sub(leaf.NotBefore)/4, minSPIFFEConnectionAge), config.DefaultMaxConnectionAge)
}
