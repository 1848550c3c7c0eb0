package server

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/redis/go-redis/extra/redisotel/v9"
	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/secret"
	"github.com/tokenbroker/tokenbroker/store"
)

// newStore builds the configured store. For redis it reads the sealing keys
// and the password from their files; it does not contact Redis, so a broker
// starts and serves while Redis is down.
func newStore(c config.Store, log *zap.Logger, now func() time.Time, tp trace.TracerProvider) (store.Store, error) {
	if c.Backend != "redis" {
		return store.NewMemory(now), nil
	}
	current, err := readKey("store.encryption_key_file", c.EncryptionKeyFile)
	if err != nil {
		return nil, err
	}
	var previous [][]byte
	for i, f := range c.PreviousEncryptionKeyFiles {
		k, err := readKey(fmt.Sprintf("store.previous_encryption_key_files[%d]", i), f)
		if err != nil {
			return nil, err
		}
		previous = append(previous, k)
	}
	sealer, err := store.NewSealer(current, previous...)
	if err != nil {
		return nil, fmt.Errorf("store.encryption_key_file: %w", err)
	}
	rc := store.RedisConfig{Addrs: c.Redis.Addrs, MasterName: c.Redis.MasterName, Username: c.Redis.Username, DB: c.Redis.DB}
	if c.Redis.PasswordFile != "" {
		pw, err := secret.ReadFile(c.Redis.PasswordFile)
		if err != nil {
			return nil, fmt.Errorf("store.redis.password_file: %w", err)
		}
		rc.Password = pw.Reveal()
	}
	if c.Redis.TLS.Enabled() {
		if rc.TLS, err = redisTLS(c.Redis.TLS); err != nil {
			return nil, err
		}
	}
	redis.SetLogger(redisLog{log.With(zap.String("component", "go-redis"))})
	client := store.NewRedisClient(rc)
	if tp != nil { // a span per command, without the command's arguments (keys, sealed values)
		if err := redisotel.InstrumentTracing(client, redisotel.WithTracerProvider(tp), redisotel.WithDBStatement(false)); err != nil {
			return nil, fmt.Errorf("store: tracing: %w", err)
		}
	}
	return store.NewRedis(store.RedisOptions{
		Client: client,
		Prefix: c.Redis.KeyPrefix,
		Sealer: sealer,
		Logger: log.With(zap.String("component", "store")),
		Now:    now,
		// The probe, not traffic, keeps the store's state true.
		ProbeInterval: c.Redis.ProbeInterval.D(),
	})
}

// redisLog sends go-redis's own messages (reconnects, Sentinel switches) to
// the process log at debug level instead of unstructured lines on stderr;
// the store logs the state changes that matter once each.
type redisLog struct{ log *zap.Logger }

func (l redisLog) Printf(_ context.Context, format string, v ...any) {
	if ce := l.log.Check(zap.DebugLevel, "go-redis"); ce != nil {
		ce.Write(zap.String("detail", fmt.Sprintf(format, v...)))
	}
}

func readKey(key, path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	k, err := store.ParseKey(b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	return k, nil
}

func redisTLS(c config.RedisTLS) (*tls.Config, error) {
	tc := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("store.redis.tls.ca_file: %w", err)
		}
		tc.RootCAs = x509.NewCertPool()
		if !tc.RootCAs.AppendCertsFromPEM(pem) {
			return nil, errors.New("store.redis.tls.ca_file: no PEM certificates found")
		}
	}
	if c.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("store.redis.tls.cert_file/key_file: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
