// Command tokenbroker is the credential broker server: it holds OAuth 2.0
// client credentials and vends access tokens to workloads over mutually
// authenticated gRPC.
//
//	tokenbroker --config FILE        serve
//	tokenbroker --config FILE --check-config
//	tokenbroker --dev [--dev-dir D] [--redis ADDR]  serve a self-contained dev setup
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/buildinfo"
	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/broker/server"
	"github.com/tokenbroker/tokenbroker/broker/tracing"
)

// configWatchInterval is how often the configuration file is checked for changes.
const configWatchInterval = 5 * time.Second

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "tokenbroker:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("tokenbroker", flag.ContinueOnError)
	fs.SetOutput(stderr)
	configPath := fs.String("config", "", "configuration `file` (YAML)")
	checkOnly := fs.Bool("check-config", false, "validate the configuration and the files it names, then exit")
	dev := fs.Bool("dev", false, "dev mode: in-process authorization server, dev PKI, memory store")
	devDir := fs.String("dev-dir", devmode.DefaultDir, "dev mode: `directory` for the dev PKI, secret and config")
	devRedis := fs.String("redis", "", "dev mode: use the redis store at `host:port` instead of memory")
	listenAddr := fs.String("listen-addr", "", "override listen_addr (gRPC), e.g. 127.0.0.1:0")
	adminAddr := fs.String("admin-addr", "", "override admin_addr (admin HTTP)")
	devRate := fs.Float64("rate-limit", -1, "dev mode: calls per `second` each caller may make (0: no limit; default 200)")
	showVersion := fs.Bool("version", false, "print the version and exit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	if *showVersion {
		fmt.Fprintln(stdout, buildinfo.String("tokenbroker"))
		return nil
	}

	var (
		cfg *config.Config
		env *devmode.Env
		err error
	)
	switch {
	case *dev && *configPath != "":
		return errors.New("--dev and --config are exclusive")
	case !*dev && *devRedis != "":
		return errors.New("--redis goes with --dev; with --config, set store.backend: redis")
	case !*dev && *devRate >= 0:
		return errors.New("--rate-limit goes with --dev; with --config, set rate_limit")
	case *dev:
		opts := devmode.Options{Dir: *devDir, RedisAddr: *devRedis}
		if rate := *devRate; rate >= 0 {
			opts.RateLimit = &config.RateLimit{RequestsPerSecond: rate, Burst: max(int(2*rate), 1)}
		}
		if env, err = devmode.Start(opts); err != nil {
			return fmt.Errorf("dev mode: %w", err)
		}
		defer env.Close()
		cfg = env.Config
	case *configPath == "":
		return errors.New("--config FILE or --dev is required (see --help)")
	default:
		if cfg, err = config.Load(*configPath); err != nil {
			return err
		}
	}
	if *listenAddr != "" {
		cfg.ListenAddr = *listenAddr
	}
	if *adminAddr != "" {
		cfg.AdminAddr = *adminAddr
	}
	if err := cfg.Validate(); err != nil {
		return err
	}
	if err := cfg.CheckFiles(); err != nil {
		return err
	}
	if *checkOnly {
		fmt.Fprintln(stdout, "configuration OK")
		return nil
	}

	log, err := server.NewLogger(cfg.Log.Level, stderr)
	if err != nil {
		return err
	}
	defer func() { _ = log.Sync() }()
	tp, stopTracing, err := tracing.Setup(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = stopTracing(context.WithoutCancel(ctx)) }() // flushes the last spans
	srv, err := server.New(server.Options{Config: cfg, Logger: log, TracerProvider: tp})
	if err != nil {
		return err
	}
	if err := srv.Listen(); err != nil {
		return err
	}
	if env != nil {
		fmt.Fprint(stdout, env.Instructions(srv.GRPCAddr().String(), srv.AdminAddr().String()))
		*configPath = env.Path(devmode.ConfigFile)
	}
	// The credentials and caller policy are re-read on SIGHUP and when the
	// file changes; SIGHUP re-reads the TLS files at once too.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				_ = srv.ReloadFile(*configPath)
				_, _ = srv.ReloadTLS()
			}
		}
	}()
	go srv.WatchConfig(ctx, *configPath, configWatchInterval)
	return srv.Serve(ctx)
}
