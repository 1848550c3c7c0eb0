package client_test

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEShowsTheExample: README's "Use it from Go" block is Example's
// body, so the code users copy is the code the tests run.
func TestREADMEShowsTheExample(t *testing.T) {
	src, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?s)\nfunc Example\(\) \{\n(.*?)\n\t// Output:`).FindSubmatch(src)
	if m == nil {
		t.Fatal("example_test.go: no Example function with an Output comment")
	}
	var body []string
	for _, line := range strings.Split(string(m[1]), "\n") {
		body = append(body, strings.TrimPrefix(line, "\t"))
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	want := "```go\n" + strings.Join(body, "\n") + "\n```"
	if !strings.Contains(string(readme), want) {
		t.Errorf("README.md does not show Example's body; it should contain:\n%s", want)
	}
}
