package audit

import (
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkWrite is the audit record of a cached GetToken, buffered to a file.
//
//	go test -run '^$' -bench BenchmarkWrite -benchmem ./broker/audit/
func BenchmarkWrite(b *testing.B) {
	l, err := New(Config{Path: filepath.Join(b.TempDir(), "audit.log")})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	e := Event{Event: TokenIssued, RequestID: "8f2c1a9b3e4d5f60", Caller: "spiffe://bank.internal/ns/payments/sa/api",
		Credential: "identity", Scopes: []string{"IDENTITY", "IDENTITY_READ"}, Source: "memory",
		Fingerprint: "156e2a7ffa412e481cd2e53a4eaf71ff", ExpireTime: time.Now().Add(time.Hour), Outcome: "ok"}
	b.ReportAllocs()
	for b.Loop() {
		if err := l.Write(e); err != nil {
			b.Fatal(err)
		}
	}
}
