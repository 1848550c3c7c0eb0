package bearer

import (
	"regexp"
	"strings"
	"testing"
)

func TestValid(t *testing.T) {
	tests := []struct {
		token string
		want  bool
	}{
		{"abc", true},
		{"tbt_AZaz09-._~+/", true},
		{"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhIn0.c2ln", true},
		{"YWJj==", true},
		{"a=", true},
		{"", false},
		{"=", false},
		{"==abc", false},
		{"ab=c", false},
		{"abc def", false},
		{"abc\r\nX-Evil: 1", false},
		{"abc\n", false},
		{"abc\x00", false},
		{"abc\t", false},
		{`abc"`, false},
		{"abc,def", false},
		{"äbc", false},
		{strings.Repeat("a", MaxLen), true},
		{strings.Repeat("a", MaxLen+1), false},
		{strings.Repeat("a", MaxLen-2) + "==", true},
	}
	for _, tt := range tests {
		if got := Valid(tt.token); got != tt.want {
			t.Errorf("Valid(%.40q) = %v, want %v", tt.token, got, tt.want)
		}
	}
}

// FuzzValid holds Valid to the grammar of RFC 6750 §2.1, written as a regular expression.
func FuzzValid(f *testing.F) {
	grammar := regexp.MustCompile(`^[A-Za-z0-9._~+/-]+=*$`)
	for _, s := range []string{"abc", "a==", "=", "a b", "a=b", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		want := len(s) <= MaxLen && grammar.MatchString(s)
		if got := Valid(s); got != want {
			t.Fatalf("Valid(%q) = %v, the grammar says %v", s, got, want)
		}
	})
}
