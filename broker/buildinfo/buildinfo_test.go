package buildinfo

import (
	"runtime"
	"runtime/debug"
	"testing"
)

func TestString(t *testing.T) {
	for _, tt := range []struct {
		name            string
		version, commit string
		bi              *debug.BuildInfo
		want            string
	}{
		{"stamped", "1.2.3", "0123abcd", nil, "tokenctl 1.2.3 (commit 0123abcd, " + runtime.Version() + ")"},
		{"go install", "", "", &debug.BuildInfo{Main: debug.Module{Version: "v1.2.3"}},
			"tokenctl v1.2.3 (commit unknown, " + runtime.Version() + ")"},
		{"vcs", "", "", &debug.BuildInfo{Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc"}, {Key: "vcs.modified", Value: "true"}}},
			"tokenctl (devel) (commit abc-dirty, " + runtime.Version() + ")"},
		{"nothing", "", "", nil, "tokenctl (devel) (commit unknown, " + runtime.Version() + ")"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			oldV, oldC, oldR := version, commit, readBuildInfo
			t.Cleanup(func() { version, commit, readBuildInfo = oldV, oldC, oldR })
			version, commit = tt.version, tt.commit
			readBuildInfo = func() (*debug.BuildInfo, bool) { return tt.bi, tt.bi != nil }
			if got := String("tokenctl"); got != tt.want {
				t.Errorf("String = %q, want %q", got, tt.want)
			}
		})
	}
}
