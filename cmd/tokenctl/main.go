// Command tokenctl talks to a tokenbroker: it gets tokens and lists the
// credentials a caller may use, authenticating with a client certificate.
//
//	tokenctl [--addr A] [--ca F --cert F --key F | --spiffe-socket S --broker-id ID | --dev [--dev-dir D]] COMMAND
//
// Commands:
//
//	token CREDENTIAL [--scope S]... [--min-ttl D] [--json]      print an access token
//	      [--dpop-method M --dpop-url U [--dpop-nonce N]]        (DPoP: print both header lines)
//	invalidate CREDENTIAL --fingerprint F [--scope S]... [--json]   report a rejected token
//	watch CREDENTIAL [--scope S]... [--min-ttl D] [--json]      print each rotation until interrupted
//	list [--json]                                               list usable credentials
//	health [--service S] [--json]                               the broker's gRPC health
//	inventory [CREDENTIAL] [--json]                             describe credentials (admin.callers only)
//	agent CREDENTIAL [--scope S]... [--min-ttl D] [--write FILE [--mode 0640]]
//	      [--listen ADDR --upstream URL [--upstream-ca FILE] [--listen-any]] [--health ADDR]
//	                                                            keep a token file fresh and serve a
//	                                                            proxy that adds the token (a sidecar)
//
// The exit code reflects the outcome: 0 ok (health: SERVING); 1 the broker is
// unreachable or failing; 2 usage error or invalid request; 3 not allowed
// (unauthenticated, permission denied, unknown credential); 4 the bank refuses
// the broker's registration (failed precondition); 5 rate limited; 6 health
// NOT_SERVING.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/buildinfo"
	"github.com/tokenbroker/tokenbroker/broker/client"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// Dev mode's defaults (DESIGN.md §8); kept here so tokenctl carries no server code.
const (
	devDir  = ".tokenbroker-dev"
	devAddr = "127.0.0.1:8443"
)

// Exit codes, for scripts.
const (
	exitOK           = 0
	exitError        = 1 // the broker could not be reached, or failed (UNAVAILABLE, INTERNAL, ...)
	exitUsage        = 2 // bad arguments, or INVALID_ARGUMENT
	exitDenied       = 3 // UNAUTHENTICATED, PERMISSION_DENIED, NOT_FOUND
	exitPrecondition = 4 // FAILED_PRECONDITION: the bank refuses the broker's registration
	exitThrottled    = 5 // RESOURCE_EXHAUSTED: over the caller's rate limit
	exitNotServing   = 6 // health: not SERVING
)

// exitCode maps a failed call's status to an exit code.
func exitCode(err error) int {
	switch status.Code(err) {
	case codes.InvalidArgument:
		return exitUsage
	case codes.Unauthenticated, codes.PermissionDenied, codes.NotFound:
		return exitDenied
	case codes.FailedPrecondition:
		return exitPrecondition
	case codes.ResourceExhausted:
		return exitThrottled
	}
	return exitError
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage: tokenctl [--addr A] [--ca F --cert F --key F | --spiffe-socket S --broker-id ID | --dev [--dev-dir D]] COMMAND
       tokenctl --version

commands:
  token CREDENTIAL [--scope S]... [--min-ttl D] [--json]   print an access token
  invalidate CREDENTIAL --fingerprint F [--scope S]... [--json]
                                                           report a token a resource server rejected
  watch CREDENTIAL [--scope S]... [--min-ttl D] [--json]   print each rotation until interrupted
  list [--json]                                            list the credentials you may use
  health [--service S] [--json]                            the broker's gRPC health (exit 6 unless SERVING)
  inventory [CREDENTIAL] [--json]                          describe the credentials: configuration, files,
                                                           token endpoint state, use (admin.callers only)
  agent CREDENTIAL [--scope S]... [--min-ttl D] [--write FILE [--mode 0640]]
        [--listen ADDR --upstream URL [--upstream-ca FILE] [--listen-any]] [--health ADDR]
                                                           keep FILE holding the current token and/or
                                                           serve a loopback proxy to URL that adds it

exit codes: 0 ok, 1 broker unreachable or failing, 2 usage or invalid request,
3 not allowed, 4 bank refuses the registration, 5 rate limited, 6 not serving

global flags:
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("tokenctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, usage); fs.PrintDefaults() }
	addr := fs.String("addr", "", "broker `host:port` (default "+devAddr+")")
	ca := fs.String("ca", "", "CA certificate `file` the broker's certificate chains to")
	cert := fs.String("cert", "", "client certificate `file`")
	key := fs.String("key", "", "client key `file`")
	dev := fs.Bool("dev", false, "use the dev PKI written by `tokenbroker --dev`")
	dir := fs.String("dev-dir", devDir, "dev `directory` (with --dev)")
	spiffeSocket := fs.String("spiffe-socket", "", "SPIFFE Workload API `address` (unix:///path) to take the client SVID and "+
		"trust bundles from (default $SPIFFE_ENDPOINT_SOCKET when --broker-id is given)")
	brokerID := fs.String("broker-id", "", "the broker's SPIFFE `ID`, required with the Workload API "+
		"(e.g. spiffe://bank.internal/ns/tokenbroker/sa/tokenbroker)")
	timeout := fs.Duration("timeout", 30*time.Second, "deadline for the call")
	showVersion := fs.Bool("version", false, "print the version and commit, then exit")
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if *showVersion {
		fmt.Fprintln(stdout, buildinfo.String("tokenctl"))
		return exitOK
	}
	if *addr == "" {
		*addr = devAddr
	}
	files := client.TLSFiles{CAFile: *ca, CertFile: *cert, KeyFile: *key}
	sp := client.SPIFFE{WorkloadAPI: *spiffeSocket, BrokerID: *brokerID}
	useSPIFFE := *spiffeSocket != "" || *brokerID != ""
	if useSPIFFE {
		switch {
		case *dev || *ca != "" || *cert != "" || *key != "":
			fmt.Fprintln(stderr, "tokenctl: --spiffe-socket/--broker-id and --dev or --ca/--cert/--key are exclusive")
			return exitUsage
		case *brokerID == "":
			fmt.Fprintln(stderr, "tokenctl: --broker-id is required with --spiffe-socket (the SPIFFE ID the broker must present)")
			return exitUsage
		case sp.Address() == "":
			fmt.Fprintln(stderr, "tokenctl: --spiffe-socket is required unless SPIFFE_ENDPOINT_SOCKET is set")
			return exitUsage
		}
	} else if *dev {
		if *ca != "" || *cert != "" || *key != "" {
			fmt.Fprintln(stderr, "tokenctl: --dev and --ca/--cert/--key are exclusive")
			return exitUsage
		}
		files = client.TLSFiles{
			CAFile:   filepath.Join(*dir, "ca.pem"),
			CertFile: filepath.Join(*dir, "client.pem"),
			KeyFile:  filepath.Join(*dir, "client-key.pem"),
		}
	} else if *ca == "" || *cert == "" || *key == "" {
		fmt.Fprintln(stderr, "tokenctl: --ca, --cert and --key are required (or --spiffe-socket and --broker-id, or --dev)")
		return exitUsage
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return exitUsage
	}

	hint := func(err error) string { return client.HandshakeHint(err, files) }
	if useSPIFFE {
		hint = func(err error) string { return client.SPIFFEHandshakeHint(err, sp) }
	}
	var cmd func(context.Context, *grpc.ClientConn, []string, io.Writer) (int, error)
	switch fs.Arg(0) {
	case "token":
		cmd = tokenCmd
	case "invalidate":
		cmd = invalidateCmd
	case "watch":
		cmd = watchCmd
	case "list":
		cmd = listCmd
	case "health":
		cmd = healthCmd
	case "inventory":
		cmd = inventoryCmd
	case "agent":
		cmd = func(ctx context.Context, conn *grpc.ClientConn, args []string, _ io.Writer) (int, error) {
			return agentCmd(ctx, conn, args, stderr, hint)
		}
	default:
		fmt.Fprintf(stderr, "tokenctl: unknown command %q\n", fs.Arg(0))
		fs.Usage()
		return exitUsage
	}

	var conn *grpc.ClientConn
	var err error
	if useSPIFFE {
		dialCtx, cancel := context.WithTimeout(ctx, *timeout) // for the first SVID
		conn, err = client.DialSPIFFE(dialCtx, *addr, sp)
		cancel()
	} else {
		conn, err = client.DialFiles(*addr, files)
	}
	if err != nil {
		fmt.Fprintln(stderr, "tokenctl:", err)
		return exitError
	}
	defer conn.Close()
	if fs.Arg(0) != "watch" && fs.Arg(0) != "agent" { // these run until interrupted
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	code, err := cmd(ctx, conn, fs.Args()[1:], stdout)
	if err != nil && code == exitError {
		code = exitCode(err)
	}
	if err != nil {
		if hint := hint(err); hint != "" {
			fmt.Fprintln(stderr, "tokenctl:", hint)
		} else if st, ok := status.FromError(err); ok && st.Code() != 0 {
			fmt.Fprintf(stderr, "tokenctl: %s: %s\n", st.Code(), st.Message())
		} else {
			fmt.Fprintln(stderr, "tokenctl:", err)
		}
	}
	return code
}

func tokenCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stdout io.Writer) (int, error) {
	c := pb.NewTokenBrokerClient(conn)
	fs := flag.NewFlagSet("token", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var scopes listFlag
	fs.Var(&scopes, "scope", "scope to request (repeatable; default: the credential's)")
	minTTL := fs.Duration("min-ttl", 0, "minimum remaining lifetime (default: the broker's)")
	asJSON := fs.Bool("json", false, "print the whole token as JSON")
	method := fs.String("dpop-method", "", "DPoP: the HTTP method of the request the token is for")
	target := fs.String("dpop-url", "", "DPoP: the URL of the request the token is for")
	nonce := fs.String("dpop-nonce", "", "DPoP: the resource server's DPoP-Nonce, if it sent one")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) != 1 || (*method == "") != (*target == "") || *nonce != "" && *method == "" {
		return exitUsage, errors.New("usage: token CREDENTIAL [--scope S]... [--min-ttl D] [--json] [--dpop-method M --dpop-url U [--dpop-nonce N]]")
	}
	req := &pb.GetTokenRequest{Credential: pos[0], Scopes: scopes}
	if *minTTL != 0 {
		req.MinTtl = durationpb.New(*minTTL)
	}
	if *method != "" {
		req.Dpop = &pb.DPoPRequest{Method: *method, Url: *target, Nonce: *nonce}
	}
	resp, err := c.GetToken(ctx, req)
	if err != nil {
		return exitError, err
	}
	if *asJSON && req.Dpop != nil {
		return printJSON(stdout, resp)
	}
	if *asJSON {
		return printJSON(stdout, resp.GetToken())
	}
	if req.Dpop != nil { // both headers, one a line: curl -H @FILE reads them as they are
		fmt.Fprintf(stdout, "Authorization: %s %s\nDPoP: %s\n", resp.GetToken().GetTokenType(), resp.GetToken().GetAccessToken(), resp.GetDpopProof())
		return exitOK, nil
	}
	fmt.Fprintln(stdout, resp.GetToken().GetAccessToken())
	return exitOK, nil
}

func invalidateCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stdout io.Writer) (int, error) {
	c := pb.NewTokenBrokerClient(conn)
	fs := flag.NewFlagSet("invalidate", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var scopes listFlag
	fs.Var(&scopes, "scope", "scope the token was requested with (repeatable)")
	fp := fs.String("fingerprint", "", "fingerprint of the rejected token")
	asJSON := fs.Bool("json", false, "print the answer as JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) != 1 || *fp == "" {
		return exitUsage, errors.New("usage: invalidate CREDENTIAL --fingerprint F [--scope S]... [--json]")
	}
	resp, err := c.InvalidateToken(ctx, &pb.InvalidateTokenRequest{Credential: pos[0], Scopes: scopes, Fingerprint: *fp})
	if err != nil {
		return exitError, err
	}
	if *asJSON {
		return printJSON(stdout, resp)
	}
	if resp.GetInvalidated() {
		fmt.Fprintln(stdout, "invalidated: the next request fetches a new token")
	} else {
		fmt.Fprintln(stdout, "not invalidated: that token is no longer the current one")
	}
	return exitOK, nil
}

func watchCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stdout io.Writer) (int, error) {
	c := pb.NewTokenBrokerClient(conn)
	fs := flag.NewFlagSet("watch", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var scopes listFlag
	fs.Var(&scopes, "scope", "scope to request (repeatable; default: the credential's)")
	minTTL := fs.Duration("min-ttl", 0, "each token is replaced before it has less than this left")
	asJSON := fs.Bool("json", false, "print each token as one JSON line")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) != 1 {
		return exitUsage, errors.New("usage: watch CREDENTIAL [--scope S]... [--min-ttl D] [--json]")
	}
	req := &pb.WatchTokenRequest{Credential: pos[0], Scopes: scopes}
	if *minTTL != 0 {
		req.MinTtl = durationpb.New(*minTTL)
	}
	stream, err := c.WatchToken(ctx, req)
	if err != nil {
		return exitError, err
	}
	for {
		resp, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil { // interrupted: a normal end
				return exitOK, nil
			}
			return exitError, err
		}
		tok := resp.GetToken()
		if *asJSON {
			b, err := protojson.MarshalOptions{UseProtoNames: true}.Marshal(tok)
			if err != nil {
				return exitError, err
			}
			fmt.Fprintln(stdout, string(b))
			continue
		}
		// The fingerprint, not the token: a watch is for seeing rotations.
		fmt.Fprintf(stdout, "%s\tfingerprint %s\texpires %s\n", time.Now().UTC().Format(time.RFC3339),
			tok.GetFingerprint(), tok.GetExpireTime().AsTime().UTC().Format(time.RFC3339))
	}
}

func listCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stdout io.Writer) (int, error) {
	c := pb.NewTokenBrokerClient(conn)
	fs := flag.NewFlagSet("list", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) != 0 {
		return exitUsage, errors.New("usage: list [--json]")
	}
	resp, err := c.ListCredentials(ctx, &pb.ListCredentialsRequest{})
	if err != nil {
		return exitError, err
	}
	if *asJSON {
		return printJSON(stdout, resp)
	}
	for _, cr := range resp.GetCredentials() {
		fmt.Fprintf(stdout, "%s\t%s\n", cr.GetName(), strings.Join(cr.GetScopes(), " "))
	}
	return exitOK, nil
}

func healthCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stdout io.Writer) (int, error) {
	fs := flag.NewFlagSet("health", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	service := fs.String("service", "", `service to check ("" is the whole server; e.g. tokenbroker.v1.TokenBroker)`)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) != 0 {
		return exitUsage, errors.New("usage: health [--service S] [--json]")
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: *service})
	if status.Code(err) == codes.NotFound { // a service the server does not serve is not serving
		return exitNotServing, err
	}
	if err != nil {
		return exitError, err
	}
	if *asJSON {
		if _, err := printJSON(stdout, resp); err != nil {
			return exitError, err
		}
	} else {
		fmt.Fprintln(stdout, resp.GetStatus())
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return exitNotServing, nil
	}
	return exitOK, nil
}

func inventoryCmd(ctx context.Context, conn *grpc.ClientConn, args []string, stdout io.Writer) (int, error) {
	fs := flag.NewFlagSet("inventory", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return exitUsage, err
	}
	if len(pos) > 1 {
		return exitUsage, errors.New("usage: inventory [CREDENTIAL] [--json]")
	}
	req := &pb.DescribeCredentialsRequest{}
	if len(pos) == 1 {
		req.Name = pos[0]
	}
	resp, err := pb.NewAdminClient(conn).DescribeCredentials(ctx, req)
	if err != nil {
		return exitError, err
	}
	if *asJSON {
		return printJSON(stdout, resp)
	}
	ts := func(t interface{ AsTime() time.Time }) string { return t.AsTime().UTC().Format(time.RFC3339) }
	for i, c := range resp.GetCredentials() {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		up := c.GetUpstream()
		state := up.GetState()
		if up.GetReason() != "" {
			state += " (" + up.GetReason() + ")"
		}
		if up.GetDescription() != "" {
			state += ": " + strconv.Quote(up.GetDescription())
		}
		fmt.Fprintf(stdout, "%s\t%s\n", c.GetName(), state)
		fmt.Fprintf(stdout, "  token endpoint  %s (client %s, %s)\n", c.GetTokenUrl(), c.GetClientId(), c.GetAuthMethod())
		fmt.Fprintf(stdout, "  scopes          %s\n", strings.Join(c.GetScopes(), " "))
		fmt.Fprintf(stdout, "  defined in      %s\n", c.GetDefinedIn())
		for _, r := range c.GetAllowedCallers() {
			sc := "all scopes"
			if len(r.GetScopes()) > 0 {
				sc = strings.Join(r.GetScopes(), " ")
			}
			if len(r.GetUrls()) > 0 {
				sc += "; proofs for " + strings.Join(r.GetUrls(), " ")
			}
			fmt.Fprintf(stdout, "  caller          %s (%s)\n", r.GetCaller(), sc)
		}
		for _, m := range c.GetMaterial() {
			line := m.GetKind() + " " + m.GetFile()
			if m.GetExpireTime() != nil {
				line += ", expires " + ts(m.GetExpireTime())
			}
			if m.GetError() != "" {
				line += ", error: " + m.GetError()
			}
			fmt.Fprintf(stdout, "  material        %s\n", line)
		}
		for _, t := range c.GetCachedTokens() {
			fmt.Fprintf(stdout, "  cached token    %s expires %s (%s)\n", t.GetFingerprint(), ts(t.GetExpireTime()), strings.Join(t.GetScopes(), " "))
		}
		if f := c.GetLastFetch(); f != nil {
			fmt.Fprintf(stdout, "  last fetch      %s %s\n", ts(f.GetTime()), f.GetOutcome())
		}
		fmt.Fprintf(stdout, "  tokens issued   %d to %d recent callers\n", c.GetTokensIssued(), len(c.GetRecentCallers()))
	}
	return exitOK, nil
}

func printJSON(w io.Writer, m proto.Message) (int, error) {
	b, err := protojson.MarshalOptions{UseProtoNames: true, Multiline: true, EmitUnpopulated: true}.Marshal(m)
	if err != nil {
		return exitError, err
	}
	fmt.Fprintln(w, string(b))
	return exitOK, nil
}

// parseInterleaved parses flags that may come before or after positional
// arguments, and returns the positional ones.
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }
