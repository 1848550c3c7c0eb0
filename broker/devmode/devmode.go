// Package devmode prepares everything `tokenbroker --dev` needs on a machine
// with nothing else running: a throwaway PKI, an in-process OAuth 2.0
// authorization server with a client for credential "identity" (scope
// IDENTITY, five-minute tokens) and one for "identity-dpop" (the same, with
// DPoP-bound tokens and a dev DPoP key), and the effective configuration, all written
// to one directory so that tokenctl and grpcurl can use the same files.
// The directory is rewritten at every start.
//
// The directory holds a CA key, a client secret and client keys, so Start
// refuses one that another user owns or that group or others may use, and
// writes every file through a new temporary file that is renamed into place:
// a symbolic link planted in the directory is replaced, never followed.
package devmode

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/config"
	"github.com/tokenbroker/tokenbroker/broker/devpki"
	"github.com/tokenbroker/tokenbroker/broker/dpop"
	"github.com/tokenbroker/tokenbroker/broker/oauthtest"
	"github.com/tokenbroker/tokenbroker/store"
)

// File names in the dev directory.
const (
	CAFile           = "ca.pem"
	ServerCertFile   = "server.pem"
	ServerKeyFile    = "server-key.pem"
	ClientCertFile   = "client.pem"
	ClientKeyFile    = "client-key.pem"
	DeniedCertFile   = "denied-client.pem"
	DeniedKeyFile    = "denied-client-key.pem"
	ConfigFile       = "config.yaml"
	ClientSecretFile = "identity-client-secret"
	StoreKeyFile     = "store-key"
	DPoPKeyFile      = "identity-dpop-key.pem"
)

// The dev identities, credential and authorization server client.
const (
	DefaultDir     = ".tokenbroker-dev"
	ClientIdentity = "spiffe://tokenbroker.dev/dev-client"
	DeniedIdentity = "spiffe://tokenbroker.dev/denied-client"
	Credential     = "identity"
	DPoPCredential = "identity-dpop"
	DPoPClientID   = "tokenbroker-dev-dpop"
	Scope          = "IDENTITY"
	OAuthClientID  = "tokenbroker-dev"
	TokenLifetime  = 5 * time.Minute
	DefaultListen  = "127.0.0.1:8443"
	DefaultAdmin   = "127.0.0.1:9090"
	certValidity   = 30 * 24 * time.Hour
)

// Options configures Start. Zero fields take the dev defaults.
type Options struct {
	// Dir is the dev directory; default DefaultDir.
	Dir string
	// ListenAddr and AdminAddr go into the config; defaults DefaultListen and DefaultAdmin.
	ListenAddr, AdminAddr string
	// OAuthAddr is where the authorization server listens; default 127.0.0.1:0.
	OAuthAddr string
	// RedisAddr, when set, selects the redis store at this address instead of
	// memory; the sealing key is kept in the dev directory across restarts.
	RedisAddr string
	// RateLimit, when set, replaces the default per-caller rate limit
	// (e.g. {0, 0} turns it off for a load test from one identity).
	RateLimit *config.RateLimit
}

// Env is a prepared dev environment.
type Env struct {
	// Dir is the absolute dev directory.
	Dir string
	// Config is the effective configuration, as written to ConfigFile.
	Config *config.Config
	// OAuth is the running authorization server.
	OAuth *oauthtest.Server
}

// Start writes the PKI, secret and config to the dev directory and starts the
// authorization server. Close stops it.
func Start(opts Options) (*Env, error) {
	if opts.Dir == "" {
		opts.Dir = DefaultDir
	}
	if opts.ListenAddr == "" {
		opts.ListenAddr = DefaultListen
	}
	if opts.AdminAddr == "" {
		opts.AdminAddr = DefaultAdmin
	}
	if opts.OAuthAddr == "" {
		opts.OAuthAddr = "127.0.0.1:0"
	}
	dir, err := filepath.Abs(opts.Dir)
	if err != nil {
		return nil, fmt.Errorf("dev dir: %w", err)
	}
	d, err := openDir(dir)
	if err != nil {
		return nil, err
	}
	defer d.root.Close()
	if err := writePKI(d); err != nil {
		return nil, err
	}
	raw := make([]byte, 24)
	if _, err := rand.Read(raw); err != nil {
		return nil, fmt.Errorf("dev secret: %w", err)
	}
	sec := base64.RawURLEncoding.EncodeToString(raw)
	secretPath := filepath.Join(dir, ClientSecretFile)
	if err := d.write(ClientSecretFile, []byte(sec+"\n"), 0o600); err != nil {
		return nil, fmt.Errorf("dev secret: %w", err)
	}

	as := oauthtest.New(oauthtest.Options{ExpiresIn: TokenLifetime, Format: oauthtest.JWT})
	as.AddClient(oauthtest.Client{ID: OAuthClientID, Secret: sec, Scopes: []string{Scope}})
	as.AddClient(oauthtest.Client{ID: DPoPClientID, Secret: sec, Scopes: []string{Scope}, DPoP: true})
	if err := ensureDPoPKey(d); err != nil {
		_ = as.Close()
		return nil, err
	}
	if err := as.Start(opts.OAuthAddr); err != nil {
		return nil, err
	}
	if opts.RedisAddr != "" {
		if err := ensureStoreKey(d); err != nil {
			_ = as.Close()
			return nil, err
		}
	}
	cfg, err := writeConfig(d, opts, as.TokenURL(), secretPath)
	if err != nil {
		_ = as.Close()
		return nil, err
	}
	return &Env{Dir: dir, Config: cfg, OAuth: as}, nil
}

// Close stops the authorization server.
func (e *Env) Close() error { return e.OAuth.Close() }

// Path returns the path of a file in the dev directory.
func (e *Env) Path(name string) string { return filepath.Join(e.Dir, name) }

func writePKI(d devDir) error {
	ca, err := devpki.NewCA("tokenbroker dev CA", certValidity)
	if err != nil {
		return err
	}
	srv, err := ca.Server(certValidity)
	if err != nil {
		return err
	}
	cl, err := ca.Client(certValidity, ClientIdentity)
	if err != nil {
		return err
	}
	denied, err := ca.Client(certValidity, DeniedIdentity)
	if err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{
		{CAFile, ca.CertPEM, 0o644},
		{ServerCertFile, srv.CertPEM, 0o644}, {ServerKeyFile, srv.KeyPEM, 0o600},
		{ClientCertFile, cl.CertPEM, 0o644}, {ClientKeyFile, cl.KeyPEM, 0o600},
		{DeniedCertFile, denied.CertPEM, 0o644}, {DeniedKeyFile, denied.KeyPEM, 0o600},
	} {
		if err := d.write(f.name, f.data, f.mode); err != nil {
			return fmt.Errorf("dev PKI: %w", err)
		}
	}
	return nil
}

// devDir is the opened dev directory: every file is written through root,
// so that the directory checked is the one written to, even if its path is
// swapped afterwards.
type devDir struct {
	path string
	root *os.Root
}

// openDir makes the dev directory (mode 0700) or checks the one there: a
// directory, not a link, owned by this user, with no group or other
// permissions. The checks are made on the directory as opened.
func openDir(dir string) (devDir, error) {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return devDir{}, fmt.Errorf("dev dir: %w", err)
	}
	if fi, err := os.Lstat(dir); err != nil {
		return devDir{}, fmt.Errorf("dev dir: %w", err)
	} else if fi.Mode()&fs.ModeSymlink != 0 {
		return devDir{}, fmt.Errorf("dev dir %s is a symbolic link; use a real directory (--dev-dir) so that keys land where you think", dir)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return devDir{}, fmt.Errorf("dev dir: %w", err)
	}
	fi, err := root.Stat(".")
	if err == nil {
		switch {
		case !fi.IsDir():
			err = fmt.Errorf("dev dir %s is not a directory", dir)
		case !ownedByMe(fi):
			err = fmt.Errorf("dev dir %s belongs to another user; it would hold keys and a secret they could read or replace: remove it or choose another --dev-dir", dir)
		case fi.Mode().Perm()&0o077 != 0:
			err = fmt.Errorf("dev dir %s has mode %#o: group or others may use it, and it holds keys and a secret; remove it (others may have left files in it) and start again",
				dir, fi.Mode().Perm())
		}
	}
	if err != nil {
		_ = root.Close()
		return devDir{}, err
	}
	return devDir{path: dir, root: root}, nil
}

// write writes data to the file name with mode through a new file (created
// exclusively, so nothing planted there is opened) that is renamed over
// name: a link at name is replaced, never followed.
func (d devDir) write(name string, data []byte, mode os.FileMode) error {
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	tmp := fmt.Sprintf(".%s.tmp-%x", name, rnd)
	f, err := d.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("write %s: %w", name, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(mode)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = d.root.Rename(tmp, name)
	}
	if err != nil {
		_ = d.root.Remove(tmp)
		return fmt.Errorf("write %s: %w", name, err)
	}
	return nil
}

// ensureStoreKey keeps a valid sealing key, or writes a new one, so that a
// restarted dev broker can still open what it stored in Redis. Only a key
// this user wrote (a regular file of mode 0600 owned by them) is kept: one
// that someone else planted would be known to them.
func ensureStoreKey(d devDir) error {
	if fi, err := d.root.Lstat(StoreKeyFile); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm() == 0o600 && ownedByMe(fi) {
		if b, err := d.root.ReadFile(StoreKeyFile); err == nil {
			if _, err := store.ParseKey(b); err == nil {
				return nil
			}
		}
	}
	k := make([]byte, store.KeySize)
	if _, err := rand.Read(k); err != nil {
		return fmt.Errorf("dev store key: %w", err)
	}
	if err := d.write(StoreKeyFile, []byte(base64.StdEncoding.EncodeToString(k)+"\n"), 0o600); err != nil {
		return fmt.Errorf("dev store key: %w", err)
	}
	return nil
}

// writeConfig writes the effective configuration and reads it back through
// the normal loader, so dev mode runs on exactly what the file says.
func writeConfig(d devDir, opts Options, tokenURL, secretPath string) (*config.Config, error) {
	dir := d.path
	cfg := config.Config{
		ListenAddr: opts.ListenAddr,
		AdminAddr:  opts.AdminAddr,
		Reflection: true,
		TLS: config.TLS{
			CertFile:     filepath.Join(dir, ServerCertFile),
			KeyFile:      filepath.Join(dir, ServerKeyFile),
			ClientCAFile: filepath.Join(dir, CAFile),
		},
		Admin: config.Admin{Callers: []string{ClientIdentity}},
		Log:   config.Log{Level: "info"},
		Store: config.Store{Backend: "memory"},
		Credentials: []config.Credential{{
			Name:             Credential,
			TokenURL:         tokenURL,
			ClientID:         OAuthClientID,
			ClientSecretFile: secretPath,
			AuthMethod:       "client_secret_post",
			Scopes:           []string{Scope},
			DefaultTTL:       config.Duration(TokenLifetime),
			MaxTTL:           config.Duration(time.Hour),
			MinTTL:           config.Duration(config.DefaultMinTTL),
			Timeout:          config.Duration(config.DefaultTimeout),
			AllowedCallers:   []config.AllowedCaller{{Caller: ClientIdentity}},
		}},
	}
	dp := cfg.Credentials[0]
	dp.Name, dp.ClientID = DPoPCredential, DPoPClientID
	dp.DPoP = &config.DPoP{KeyFile: filepath.Join(dir, DPoPKeyFile), Alg: "ES256"}
	cfg.Credentials = append(cfg.Credentials, dp)
	if opts.RateLimit != nil {
		cfg.RateLimit = opts.RateLimit
	}
	if opts.RedisAddr != "" {
		cfg.Store = config.Store{
			Backend:           "redis",
			EncryptionKeyFile: filepath.Join(dir, StoreKeyFile),
			Redis:             config.Redis{Addrs: []string{opts.RedisAddr}, KeyPrefix: "tokenbroker-dev:"},
		}
	}
	// Parsed once to fill in every default, then written as parsed: the
	// file shows the values in force, and loads back to the same.
	b, err := yaml.Marshal(&cfg)
	if err != nil {
		return nil, fmt.Errorf("dev config: %w", err)
	}
	effective, err := config.Parse(b)
	if err != nil {
		return nil, fmt.Errorf("dev config: %w", err)
	}
	if b, err = yaml.Marshal(effective); err != nil {
		return nil, fmt.Errorf("dev config: %w", err)
	}
	head := "# Written by `tokenbroker --dev`; rewritten at every start. Every key shows the value in force.\n"
	path := filepath.Join(dir, ConfigFile)
	if err := d.write(ConfigFile, append([]byte(head), b...), 0o600); err != nil {
		return nil, fmt.Errorf("dev config: %w", err)
	}
	return config.Load(path)
}

// Instructions tells a developer how to get a token from the dev server at grpcAddr.
func (e *Env) Instructions(grpcAddr, adminAddr string) string {
	rel := e.Dir
	if wd, err := os.Getwd(); err == nil {
		if r, err := filepath.Rel(wd, e.Dir); err == nil && !strings.HasPrefix(r, "..") {
			rel = r
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "tokenbroker dev mode: gRPC (mTLS) on %s, admin HTTP on http://%s, %s store\n", grpcAddr, adminAddr, e.Config.Store.Backend)
	fmt.Fprintf(&b, "dev PKI, secret and config in %s; authorization server at %s\n\n", rel, e.OAuth.TokenURL())
	b.WriteString("Get a token:\n")
	fmt.Fprintf(&b, "  go run ./cmd/tokenctl --dev token %s\n", Credential)
	fmt.Fprintf(&b, "  grpcurl -cacert %[1]s/%[2]s -cert %[1]s/%[3]s -key %[1]s/%[4]s -d '{\"credential\":\"%[5]s\"}' %[6]s tokenbroker.v1.TokenBroker/GetToken\n",
		rel, CAFile, ClientCertFile, ClientKeyFile, Credential, grpcAddr)
	fmt.Fprintf(&b, "A DPoP-bound token and a proof for one request (both header lines):\n")
	fmt.Fprintf(&b, "  go run ./cmd/tokenctl --dev token %s --dpop-method GET --dpop-url https://api.example/v1/accounts\n", DPoPCredential)
	fmt.Fprintf(&b, "A caller no credential allows: %s/%s (%s)\n", rel, DeniedCertFile, DeniedIdentity)
	b.WriteString("The operators' inventory (the dev client is in admin.callers):\n  go run ./cmd/tokenctl --dev inventory\n")
	return b.String()
}

// ensureDPoPKey keeps a valid dev DPoP key, or writes a new EC P-256 one, so
// that a restarted dev broker can still prove for tokens it stored in Redis.
// As for the store key, only a key this user wrote is kept.
func ensureDPoPKey(d devDir) error {
	if fi, err := d.root.Lstat(DPoPKeyFile); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm() == 0o600 && ownedByMe(fi) {
		if b, err := d.root.ReadFile(DPoPKeyFile); err == nil {
			if _, err := dpop.ParseKey(b, "ES256"); err == nil {
				return nil
			}
		}
	}
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return fmt.Errorf("dev DPoP key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return fmt.Errorf("dev DPoP key: %w", err)
	}
	if err := d.write(DPoPKeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		return fmt.Errorf("dev DPoP key: %w", err)
	}
	return nil
}
