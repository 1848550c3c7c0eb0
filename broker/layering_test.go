package broker

import (
	"os/exec"
	"strings"
	"testing"
)

// TestCoreImportsNoGRPC: the core knows nothing of gRPC; the adapter
// (broker/grpcapi) turns requests into core calls and errors into status codes.
func TestCoreImportsNoGRPC(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "google.golang.org/grpc") || strings.HasSuffix(dep, "/broker/grpcapi") {
			t.Errorf("package broker depends on %s", dep)
		}
	}
}
