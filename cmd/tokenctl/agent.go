package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"

	"github.com/tokenbroker/tokenbroker/broker/agent"
	"github.com/tokenbroker/tokenbroker/broker/client"
)

const agentUsage = "usage: agent CREDENTIAL [--scope S]... [--min-ttl D] [--write FILE [--mode 0640]] " +
	"[--listen ADDR --upstream URL [--upstream-ca FILE] [--listen-any]] [--health ADDR]"

// agentCmd runs the token agent until ctx ends (SIGTERM, SIGINT). Its log
// goes to stderr as JSON lines.
func agentCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stderr io.Writer, hint func(error) string) (int, error) {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var scopes listFlag
	fs.Var(&scopes, "scope", "scope to request (repeatable; default: the credential's)")
	minTTL := fs.Duration("min-ttl", 0, "the token in the file and the proxy always has this much left (default: the broker's, which fits the bank's token lifetime)")
	write := fs.String("write", "", "keep this `file` holding the current access token (no newline)")
	mode := fs.String("mode", "0640", "the token file's `mode` (octal)")
	listen := fs.String("listen", "", "serve the proxy on this loopback `address`")
	listenAny := fs.Bool("listen-any", false, "allow --listen on a non-loopback address")
	upstream := fs.String("upstream", "", "the `URL` the proxy forwards every request to (https)")
	upstreamCA := fs.String("upstream-ca", "", "CA certificates `file` for the upstream (default: the system's)")
	health := fs.String("health", "", "serve /healthz on this `address`")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) != 1 {
		return exitUsage, errors.New(agentUsage)
	}
	if *write == "" && *listen == "" {
		return exitUsage, errors.New("agent: --write FILE or --listen ADDR (or both) is required")
	}
	fileMode, err := strconv.ParseUint(*mode, 8, 32)
	if err != nil || fileMode > 0o777 {
		return exitUsage, fmt.Errorf("agent: --mode %q is not an octal file mode such as 0640", *mode)
	}
	cfg := agent.Config{MinTTL: *minTTL, File: *write, FileMode: os.FileMode(fileMode), Listen: *listen,
		ListenAny: *listenAny, Health: *health, Hint: hint}
	if *listen != "" {
		if *upstream == "" {
			return exitUsage, errors.New("agent: --listen needs --upstream URL")
		}
		u, err := url.Parse(*upstream)
		if err != nil || u.Host == "" || (u.Scheme != "https" && u.Scheme != "http") {
			return exitUsage, fmt.Errorf("agent: --upstream %q is not an http(s) URL", *upstream)
		}
		if ip := net.ParseIP(u.Hostname()); u.Scheme == "http" && u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
			// client.Transport would refuse every request (a 502 each): say so now.
			return exitUsage, fmt.Errorf("agent: --upstream %q: plain http is allowed only to a loopback address (the token would cross the network in the clear); use https", *upstream)
		}
		cfg.Upstream = u
		if cfg.UpstreamTransport, err = upstreamTransport(*upstreamCA); err != nil {
			return exitUsage, err
		}
	}
	log := newLogger(stderr)
	defer func() { _ = log.Sync() }()
	cfg.Logger = log

	changed := make(chan struct{}, 1)
	opts := []client.Option{client.WithWatch(), client.WithNotify(changed)}
	if *minTTL > 0 {
		opts = append(opts, client.WithMinTTL(*minTTL))
	}
	if len(scopes) > 0 {
		opts = append(opts, client.WithScopes(scopes...))
	}
	src := client.TokenSource(conn, pos[0], opts...)
	defer src.Close()
	cfg.Source, cfg.Changed = src, changed
	a, err := agent.New(cfg)
	if err != nil {
		return exitUsage, err
	}
	if err := a.Run(ctx); err != nil {
		if errors.Is(err, agent.ErrDPoPFile) {
			return exitUsage, err
		}
		return exitError, err // exitCode maps the broker's status
	}
	return exitOK, nil
}

// upstreamTransport is the proxy's transport to the upstream: TLS 1.2 at
// least, the system roots or caFile's, and the proxy from the environment.
func upstreamTransport(caFile string) (http.RoundTripper, error) {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pemBytes, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("agent: --upstream-ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pemBytes) {
			return nil, fmt.Errorf("agent: --upstream-ca %s: no PEM certificates found", caFile)
		}
		t.TLSClientConfig.RootCAs = pool
	}
	return t, nil
}

// newLogger writes JSON lines to w, as the broker does.
func newLogger(w io.Writer) *zap.Logger {
	enc := zap.NewProductionEncoderConfig()
	enc.TimeKey = "time"
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	return zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(enc), zapcore.Lock(zapcore.AddSync(w)), zap.InfoLevel))
}
