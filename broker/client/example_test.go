package client_test

import (
	"fmt"
	"log"
	"net/http"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/client"
)

// A service dials the broker once with its workload certificate, gets an
// oauth2.TokenSource for credential "identity", and calls the bank's API with
// an HTTP client that sends the token in the Authorization header.
func Example() {
	// One connection for the life of the process; certificates renewed on disk are picked up.
	conn, err := client.DialFiles(brokerTarget, callerFiles)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	// Cached until a minute before expiry; replacements are pushed by the broker.
	ts := client.TokenSource(conn, "identity", client.WithMinTTL(time.Minute), client.WithWatch())
	defer ts.Close()

	// "Authorization: Bearer …" on every request; a 401 for invalid_token reports the token and retries once.
	api := &http.Client{Transport: &client.Transport{Source: ts}, Timeout: 10 * time.Second}
	resp, err := api.Get(identityAPI + "/identity/v1/me")
	if err != nil {
		log.Fatal(err) // from the broker: a gRPC status (see "Status codes")
	}
	defer resp.Body.Close()
	fmt.Println(resp.Status)
	// Output: 200 OK
}

// The TokenSource is an oauth2.TokenSource: anything that takes one
// (oauth2.NewClient, gRPC's oauth.TokenSource, cloud SDKs) can use the broker.
func ExampleTokenSource() {
	conn, err := client.DialFiles(brokerTarget, callerFiles)
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()

	ts := client.TokenSource(conn, "identity")
	tok, err := ts.Token()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(tok.Type(), tok.Valid(), len(client.Fingerprint(tok)))
	// Output: Bearer true 32
}
