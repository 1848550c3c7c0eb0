package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/tokenbroker/tokenbroker/broker/client"
	"github.com/tokenbroker/tokenbroker/broker/devmode"
	"github.com/tokenbroker/tokenbroker/store/redistest"
)

// TestTracingFromEnvironment: the binary traces only when OTEL_TRACES_EXPORTER
// says so; with the console exporter its GetToken span is printed (and the
// batch flushed at shutdown), with the service name from OTEL_SERVICE_NAME.
func TestTracingFromEnvironment(t *testing.T) {
	bin := buildBinary(t)
	for _, exporter := range []string{"console", ""} {
		t.Run("OTEL_TRACES_EXPORTER="+exporter, func(t *testing.T) {
			grpcAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
			adminAddr := fmt.Sprintf("127.0.0.1:%d", redistest.FreePort(t))
			dir := filepath.Join(t.TempDir(), "dev")
			env := append(withoutProxyVars(os.Environ()), "OTEL_SERVICE_NAME=tokenbroker-test")
			if exporter != "" {
				env = append(env, "OTEL_TRACES_EXPORTER="+exporter)
			}
			p := startBinary(t, bin, env, adminAddr, "--dev", "--dev-dir", dir, "--listen-addr", grpcAddr, "--admin-addr", adminAddr)
			conn, err := client.DialFiles(grpcAddr, client.TLSFiles{CAFile: filepath.Join(dir, devmode.CAFile),
				CertFile: filepath.Join(dir, devmode.ClientCertFile), KeyFile: filepath.Join(dir, devmode.ClientKeyFile)})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := client.TokenSource(conn, devmode.Credential).Token(); err != nil {
				t.Fatal(err)
			}
			if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.exited:
			case <-time.After(30 * time.Second):
				t.Fatal("no exit within 30s of SIGTERM")
			}
			out := p.stdout.String()
			traced := strings.Contains(out, `"Name":"tokenbroker.v1.TokenBroker/GetToken"`)
			switch {
			case exporter != "" && !traced:
				t.Errorf("no GetToken span on stdout:\n%.2000s", out)
			case exporter != "" && !strings.Contains(out, "tokenbroker-test"):
				t.Error("the spans do not carry OTEL_SERVICE_NAME")
			case exporter == "" && (traced || strings.Contains(out, `"SpanContext"`)):
				t.Error("spans printed with tracing off")
			}
		})
	}
}
