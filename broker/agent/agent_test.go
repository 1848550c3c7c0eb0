package agent

import (
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// TestWriteFileIsAtomic: readers racing with writers see a whole token, the
// old one or the new one, never a part or a mix; no temporary file is left.
func TestWriteFileIsAtomic(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "token")
	a, b := strings.Repeat("a", 16<<10), strings.Repeat("b", 16<<10)
	if err := writeFile(path, []byte(a), 0o640); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				got, err := os.ReadFile(path)
				if err != nil || (string(got) != a && string(got) != b) {
					t.Errorf("a reader saw %d bytes (%v), want all of one token", len(got), err)
					return
				}
			}
		}()
	}
	for i := range 500 {
		tok := a
		if i%2 == 0 {
			tok = b
		}
		if err := writeFile(path, []byte(tok), 0o640); err != nil {
			t.Fatal(err)
		}
	}
	close(stop)
	wg.Wait()
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("%d entries in the directory, want the token file only", len(entries))
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, want 0640", fi.Mode().Perm())
	}
}

func TestLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:8080": true, "127.9.9.9:1": true, "[::1]:8080": true, "localhost:8080": true,
		"0.0.0.0:8080": false, ":8080": false, "10.0.0.1:80": false, "[::]:80": false, "example.com:80": false, "127.0.0.1": false,
	} {
		if got := Loopback(addr); got != want {
			t.Errorf("Loopback(%q) = %v, want %v", addr, got, want)
		}
	}
}
