package client_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// hostileBroker answers GetToken with a token chosen by the test: something
// posing as a broker, or one of a version that vends what it should not.
type hostileBroker struct {
	pb.UnimplementedTokenBrokerServer
	token string
}

func (h hostileBroker) GetToken(context.Context, *pb.GetTokenRequest) (*pb.GetTokenResponse, error) {
	return &pb.GetTokenResponse{Token: &pb.Token{AccessToken: h.token, TokenType: "Bearer",
		ExpireTime: timestamppb.New(time.Now().Add(time.Hour)), Fingerprint: "x"}}, nil
}

// TestTransportRefusesMalformedToken: a token outside RFC 6750's b64token
// syntax never reaches a header: the request fails and nothing is sent.
func TestTransportRefusesMalformedToken(t *testing.T) {
	env, err := devmode.Start(devmode.Options{Dir: filepath.Join(t.TempDir(), "dev")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	cert, err := tls.LoadX509KeyPair(env.Path(devmode.ServerCertFile), env.Path(devmode.ServerKeyFile))
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(env.Path(devmode.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	files := client.TLSFiles{CAFile: env.Path(devmode.CAFile), CertFile: env.Path(devmode.ClientCertFile), KeyFile: env.Path(devmode.ClientKeyFile)}

	for _, token := range []string{"abc\r\nX-Evil: 1", "abc def", `abc"`, strings.Repeat("a", 16<<10+1)} {
		srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert},
			ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool, MinVersion: tls.VersionTLS13})))
		pb.RegisterTokenBrokerServer(srv, hostileBroker{token: token})
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		go func() { _ = srv.Serve(ln) }()

		conn, err := client.DialFiles(ln.Addr().String(), files)
		if err != nil {
			t.Fatal(err)
		}
		ts := client.TokenSource(conn, devmode.Credential)
		rs := newResourceServer(t, func(int, string) bool { return false })
		hc := &http.Client{Transport: &client.Transport{Source: ts}}
		resp, err := hc.Get(rs.URL + "/identity/v1/me")
		if err == nil {
			resp.Body.Close()
		}
		if err == nil || !strings.Contains(err.Error(), "not a bearer token") || strings.Contains(err.Error(), token) {
			t.Errorf("token %.20q: %v, want a refusal that does not quote the token", token, err)
		}
		if got, _ := rs.seen(); len(got) != 0 {
			t.Errorf("token %.20q: %d requests reached the resource server, want none", token, len(got))
		}
		ts.Close()
		_ = conn.Close()
		srv.Stop()
	}
}
