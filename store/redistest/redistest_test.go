package redistest

import (
	"context"
	"net"
	"strconv"
	"testing"
)

// TestStartTriesAnotherPort: the port chosen for a server is taken by
// someone else before redis-server binds it (CI saw this for a cluster bus
// port). The server starts on another port instead of failing the test.
func TestStartTriesAnotherPort(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	taken := held.Addr().(*net.TCPAddr).Port

	calls := 0
	pickPort = func(t testing.TB) int {
		calls++
		if calls <= 2 { // the first server port and the first bus port
			return taken
		}
		return FreePort(t)
	}
	t.Cleanup(func() { pickPort = FreePort })

	s := StartWith(t, Options{clusterBus: true, Args: []string{"--cluster-enabled", "yes"}})
	if s.Port == taken || s.BusPort == taken {
		t.Fatalf("server on %d (bus %d), but %d was taken", s.Port, s.BusPort, taken)
	}
	if calls < 4 {
		t.Fatalf("ports chosen %d times, want a second choice after the clash", calls)
	}
	if err := s.Client().Ping(context.Background()).Err(); err != nil {
		t.Fatalf("ping: %v", err)
	}
}

// TestClusterBusPortIsItsOwn: cluster nodes do not use port+10000, which
// no one reserved for them.
func TestClusterBusPortIsItsOwn(t *testing.T) {
	c := StartCluster(t, 3)
	for _, n := range c.Nodes {
		if n.BusPort == 0 || n.BusPort == n.Port+10000 {
			t.Fatalf("node %s has bus port %d", n.Addr(), n.BusPort)
		}
		// The bus port is what redis-server listens on.
		conn, err := net.Dial("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(n.BusPort)))
		if err != nil {
			t.Fatalf("bus port %d of %s: %v", n.BusPort, n.Addr(), err)
		}
		conn.Close()
	}
}
