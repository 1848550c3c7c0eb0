package devmode

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func start(t *testing.T, dir string) error {
	t.Helper()
	env, err := Start(Options{Dir: dir, ListenAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0"})
	if err == nil {
		t.Cleanup(func() { _ = env.Close() })
	}
	return err
}

// TestUnsafeDevDirRefused: a dev directory that group or others may use, a
// link, or one owned by another user is refused with a message saying why.
func TestUnsafeDevDirRefused(t *testing.T) {
	open := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil { // past the umask
		t.Fatal(err)
	}
	if err := start(t, open); err == nil || !strings.Contains(err.Error(), "group or others may use it") {
		t.Errorf("a 0777 dev dir: %v, want a refusal saying why", err)
	}

	real := filepath.Join(t.TempDir(), "real")
	if err := os.Mkdir(real, 0o700); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	if err := start(t, link); err == nil || !strings.Contains(err.Error(), "symbolic link") {
		t.Errorf("a linked dev dir: %v, want a refusal", err)
	}

	if os.Getuid() == 0 { // only root can give a directory away
		theirs := filepath.Join(t.TempDir(), "theirs")
		if err := os.Mkdir(theirs, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(theirs, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		if err := start(t, theirs); err == nil || !strings.Contains(err.Error(), "another user") {
			t.Errorf("a dev dir of another user: %v, want a refusal", err)
		}
	}
}

// TestDevFilesReplaceLinks: links planted in the dev directory are replaced
// by the files, never written through.
func TestDevFilesReplaceLinks(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	victim := filepath.Join(t.TempDir(), "victim")
	if err := os.WriteFile(victim, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{ServerKeyFile, ClientSecretFile, ConfigFile} {
		if err := os.Symlink(victim, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	if err := start(t, dir); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(victim); string(b) != "keep me" {
		t.Errorf("the link's target was written: %q", b)
	}
	for _, name := range []string{ServerKeyFile, ClientSecretFile, ConfigFile} {
		fi, err := os.Lstat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want a regular file of mode 0600", name, fi.Mode())
		}
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*.tmp-*"))
	if len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
}

// TestDevConfigShowsValuesInForce: the dev config.yaml states every value
// the broker applies (no null rate limit, empty audit path or zero margin).
func TestDevConfigShowsValuesInForce(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	if err := start(t, dir); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ConfigFile))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"requests_per_second: 200", "burst: 400", "path: stdout", "expiry_margin: 10s", "max_connection_age: 1h0m0s"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("config.yaml lacks %q:\n%s", want, b)
		}
	}
	for _, bad := range []string{"rate_limit: null", `path: ""`, "expiry_margin: 0s"} {
		if strings.Contains(string(b), bad) {
			t.Errorf("config.yaml shows %q, not the value in force", bad)
		}
	}
}

// TestPlantedStoreKeyNotKept: a store key this user did not write as 0600
// (planted while the directory was open to others) is replaced, not used.
func TestPlantedStoreKeyNotKept(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "dev")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	planted := []byte("QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUE=\n") // 32 bytes of 'A', valid as a key
	key := filepath.Join(dir, StoreKeyFile)
	if err := os.WriteFile(key, planted, 0o644); err != nil {
		t.Fatal(err)
	}
	env, err := Start(Options{Dir: dir, ListenAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0", RedisAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Close() })
	got, err := os.ReadFile(key)
	if err != nil {
		t.Fatal(err)
	}
	if string(got) == string(planted) {
		t.Error("the planted store key was kept")
	}
	// A key it wrote itself is kept across restarts.
	env2, err := Start(Options{Dir: dir, ListenAddr: "127.0.0.1:0", AdminAddr: "127.0.0.1:0", RedisAddr: "127.0.0.1:1"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env2.Close() })
	if again, _ := os.ReadFile(key); string(again) != string(got) {
		t.Error("the broker's own store key was replaced on restart")
	}
}
