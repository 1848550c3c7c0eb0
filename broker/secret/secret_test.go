package secret

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func TestValueNeverPrints(t *testing.T) {
	const raw = "s3cr3t-value"
	v := New(raw)
	var out []string
	for _, verb := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x", "%X", "%d"} {
		out = append(out, fmt.Sprintf(verb, v), fmt.Sprintf(verb, struct{ S Value }{v}))
	}
	js, err := json.Marshal(map[string]any{"s": v})
	if err != nil {
		t.Fatal(err)
	}
	out = append(out, string(js))

	var buf strings.Builder
	core := zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(&buf), zap.DebugLevel)
	zap.New(core).Info("m", zap.Any("any", v), zap.Stringer("str", v), zap.Object("obj", v), zap.Reflect("r", v))
	out = append(out, buf.String())

	for _, s := range out {
		if strings.Contains(s, raw) {
			t.Errorf("secret printed: %s", s)
		}
	}
	if got := v.Reveal(); got != raw {
		t.Errorf("Reveal() = %q, want %q", got, raw)
	}
}

func TestReadFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v, err := ReadFile(write("ok", "  abc\n"))
	if err != nil || v.Reveal() != "abc" {
		t.Fatalf("ReadFile = %q, %v; want abc, nil", v.Reveal(), err)
	}
	if _, err := ReadFile(write("empty", "\n\t ")); !errors.Is(err, ErrEmpty) {
		t.Errorf("empty file: err = %v, want ErrEmpty", err)
	}
	if _, err := ReadFile(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: err = %v, want ErrNotExist", err)
	}
}
