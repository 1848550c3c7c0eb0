package client_test

import (
	"context"
	"fmt"
	"log"
	"net/http"
	"time"

	"golang.org/x/oauth2"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/tokenbroker/tokenbroker/broker/client"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// A service dials the broker with its workload certificate, asks for a token
// for credential "identity", and calls the bank's API with it in the
// Authorization header.
func Example() {
	files := client.TLSFiles{
		CAFile:   "/etc/tokenbroker-client/ca.pem",
		CertFile: "/etc/tokenbroker-client/tls.crt",
		KeyFile:  "/etc/tokenbroker-client/tls.key",
	}
	tc, err := files.TLSConfig()
	if err != nil {
		log.Fatal(err)
	}
	conn, err := client.Dial("tokenbroker.platform.svc:8443", tc)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := pb.NewTokenBrokerClient(conn).GetToken(ctx, &pb.GetTokenRequest{
		Credential: "identity",
		MinTtl:     durationpb.New(time.Minute), // still valid a minute from now
	})
	if err != nil {
		log.Fatal(err) // a gRPC status: see README, "Status codes"
	}
	tok := resp.GetToken()

	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://api.bank.example/identity/v1/me", nil)
	(&oauth2.Token{AccessToken: tok.GetAccessToken(), TokenType: tok.GetTokenType()}).SetAuthHeader(req)
	fmt.Println(req.Header.Get("Authorization") != "")
}
