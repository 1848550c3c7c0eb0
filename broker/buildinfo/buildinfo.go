// Package buildinfo says which build a binary is: the version and the commit
// stamped at link time, with the Go module's own information as a fallback.
// Both tokenbroker and tokenctl print it for --version, so that an operator can
// match a running pod, or a tokenctl on a laptop, to a release and a commit.
//
// Stamp a build with
//
//	go build -ldflags "-X github.com/tokenbroker/tokenbroker/broker/buildinfo.version=1.2.3 \
//	  -X github.com/tokenbroker/tokenbroker/broker/buildinfo.commit=$(git rev-parse HEAD)" ./cmd/...
//
// (deploy/Dockerfile does, from its VERSION and COMMIT build arguments).
package buildinfo

import (
	"runtime"
	"runtime/debug"
)

// Set at link time with -X (see the package comment); empty when not stamped.
var (
	version = ""
	commit  = ""
)

// readBuildInfo is a seam for tests.
var readBuildInfo = debug.ReadBuildInfo

// Version is the stamped version, else the main module's version (set by
// `go install module@vX`), else "(devel)".
func Version() string {
	if version != "" {
		return version
	}
	if bi, ok := readBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
}

// Commit is the stamped commit, else the VCS revision the go command recorded
// (builds inside a git checkout, without -buildvcs=false), else "unknown".
func Commit() string {
	if commit != "" {
		return commit
	}
	if bi, ok := readBuildInfo(); ok {
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		if rev != "" {
			if dirty {
				rev += "-dirty"
			}
			return rev
		}
	}
	return "unknown"
}

// String is the --version line of a program: "NAME VERSION (commit COMMIT, GOVERSION)".
// The first two fields are the name and the version, so `awk '{print $2}'` reads it.
func String(program string) string {
	return program + " " + Version() + " (commit " + Commit() + ", " + runtime.Version() + ")"
}
