package server

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.uber.org/zap"
	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/audit"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/policy"
)

// Reload applies the credentials, caller policy and admin.callers of cfg at
// once: calls already running finish on the old ones, the next call sees the
// new ones, and open WatchToken streams are authorized again.
// Keys that only a restart applies (listeners, TLS file paths, store, audit,
// log, rate limit) are left as they are and named in the log. The Server
// keeps cfg: it must not change afterwards.
func (s *Server) Reload(cfg *config.Config) error {
	creds, err := brokerCredentials(cfg, s.now, s.tp)
	if err != nil {
		return err
	}
	if _, err := policy.Compile(cfg.Admin.Callers); err != nil {
		return fmt.Errorf("admin.callers: %w", err)
	}
	if err := s.broker.SetCredentials(creds); err != nil {
		return err
	}
	_ = s.setAdmins(cfg) // compiled above
	s.cfgNow.Store(cfg)
	restart := restartKeys(s.cfg, cfg)
	s.log.Info("configuration reloaded", zap.Int("credentials", len(cfg.Credentials)), zap.Strings("need_restart", restart))
	reason := ""
	if len(restart) > 0 {
		reason = "changed keys that need a restart: " + strings.Join(restart, ", ")
	}
	_ = s.broker.Record(audit.Event{Event: audit.ConfigReloaded, Outcome: "ok", Reason: reason})
	return nil
}

// ReloadFile loads, checks and applies the configuration file at path. A file
// that does not load or validate is rejected, logged and audited, and the
// configuration in force stays.
func (s *Server) ReloadFile(path string) error {
	cfg, err := config.Load(path)
	if err == nil {
		err = cfg.CheckFiles()
	}
	if err == nil {
		err = s.Reload(cfg)
	}
	if err != nil {
		s.log.Error("configuration rejected; the previous one stays in force", zap.String("path", path), zap.Error(err))
		_ = s.broker.Record(audit.Event{Event: audit.ConfigReloaded, Outcome: "rejected", Reason: err.Error()})
	}
	return err
}

// WatchConfig reloads the file at path whenever its content changes, or
// that of its credentials_dir (a file changed, added or removed, also through
// the symlinks of a ConfigMap mount), checking every interval, until ctx ends.
func (s *Server) WatchConfig(ctx context.Context, path string, interval time.Duration) {
	s.watchConfigFrom(ctx, path, interval, configSum(path))
}

// watchConfigFrom is WatchConfig from a known state of the files.
func (s *Server) watchConfigFrom(ctx context.Context, path string, interval time.Duration, last [32]byte) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if cur := configSum(path); cur != last {
				last = cur
				_ = s.ReloadFile(path)
			}
		}
	}
}

// restartKeys names the top-level keys whose change only a restart applies.
func restartKeys(old, cur *config.Config) []string {
	var out []string
	for _, k := range []struct {
		name string
		a, b any
	}{
		{"listen_addr", old.ListenAddr, cur.ListenAddr},
		{"admin_addr", old.AdminAddr, cur.AdminAddr},
		{"reflection", old.Reflection, cur.Reflection},
		{"pprof", old.Pprof, cur.Pprof},
		{"tls", effectiveTLS(old.TLS), effectiveTLS(cur.TLS)},
		{"admin_tls", old.AdminTLS, cur.AdminTLS},
		{"log", old.Log, cur.Log},
		{"audit", old.Audit, cur.Audit},
		{"rate_limit", old.RateLimit, cur.RateLimit},
		{"store", old.Store, cur.Store},
		{"retry", old.Retry.Effective(), cur.Retry.Effective()},
	} {
		// Compared as YAML, so that an empty list and a missing one are the same.
		a, _ := yaml.Marshal(k.a)
		b, _ := yaml.Marshal(k.b)
		if !bytes.Equal(a, b) {
			out = append(out, k.name)
		}
	}
	return out
}

// effectiveTLS is t with the defaults the server applies to a zero value.
func effectiveTLS(t config.TLS) config.TLS {
	t.MaxConnectionAge = cmp.Or(t.MaxConnectionAge, config.Duration(config.DefaultMaxConnectionAge))
	t.MaxConnectionAgeGrace = cmp.Or(t.MaxConnectionAgeGrace, config.Duration(config.DefaultMaxConnectionAgeGrace))
	return t
}

// configSum hashes the configuration file and every file its
// credentials_dir holds (names and contents, in name order).
func configSum(path string) [32]byte {
	h := sha256.New()
	b, _ := os.ReadFile(path)
	h.Write(b)
	if dir := config.CredentialsDirOf(path, b); dir != "" {
		names, _ := config.CredentialFiles(dir)
		for _, name := range names {
			content, err := os.ReadFile(filepath.Join(dir, name)) // through a ConfigMap's links
			fmt.Fprintf(h, "\x00%s\x00%d\x00%v\x00", name, len(content), err != nil)
			h.Write(content)
		}
	}
	return [32]byte(h.Sum(nil))
}
