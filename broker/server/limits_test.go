package server

import (
	"net"
	"testing"
)

// TestSourceOfGroupsIPv6By64: limits.handshakes_per_source counts an IPv4
// address alone and an IPv6 address by its /64, so a host holding a /64
// (the usual assignment) is one source however many of its addresses it
// connects from; IPv4-mapped IPv6 addresses count as their IPv4 address.
func TestSourceOfGroupsIPv6By64(t *testing.T) {
	tcp := func(ip string) net.Addr { return &net.TCPAddr{IP: net.ParseIP(ip), Port: 40000} }
	for _, tc := range []struct {
		a, b net.Addr
		same bool
	}{
		{tcp("2001:db8:1:2::1"), tcp("2001:db8:1:2:ffff:ffff:ffff:fffe"), true},
		{tcp("2001:db8:1:2::1"), tcp("2001:db8:1:3::1"), false},
		{tcp("10.0.0.1"), tcp("10.0.0.2"), false},
		{tcp("::ffff:10.0.0.1"), tcp("10.0.0.1"), true},
		{&net.UnixAddr{Name: "@x"}, &net.UnixAddr{Name: "@x"}, true},
	} {
		if got := sourceOf(tc.a) == sourceOf(tc.b); got != tc.same {
			t.Errorf("%v (%s) and %v (%s): same source %v, want %v", tc.a, sourceOf(tc.a), tc.b, sourceOf(tc.b), got, tc.same)
		}
	}
	if s := sourceOf(tcp("2001:db8:1:2::1")); s != "2001:db8:1:2::/64" {
		t.Errorf("sourceOf(2001:db8:1:2::1) = %q, want 2001:db8:1:2::/64", s)
	}
}
