package main

import (
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"sort"
	"strings"
)

// documentationPrefixes are the address ranges reserved for documentation
// (RFC 5737, RFC 3849): a manifest that names one does not work as shipped.
var documentationPrefixes = []netip.Prefix{
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("2001:db8::/32"),
}

// addrLike finds candidate IPv4 and IPv6 addresses, with an optional /bits,
// inside any string (a CIDR field, an URL, a configuration file in a ConfigMap).
var addrLike = regexp.MustCompile(`[0-9]{1,3}(?:\.[0-9]{1,3}){3}(?:/[0-9]{1,2})?|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:/[0-9]{1,3})?`)

// digested is a fully qualified image reference pinned by digest: a registry
// host (with a dot or a port, or localhost), a path, an optional tag, and a
// sha256 digest.
var digested = regexp.MustCompile(`^(?:[a-z0-9-]+(?:\.[a-z0-9-]+)+(?::[0-9]+)?|localhost(?::[0-9]+)?)/[a-z0-9._/-]+(?::[A-Za-z0-9._-]+)?@sha256:[0-9a-f]{64}$`)

func lintCmd(files []string, out io.Writer) error {
	if len(files) == 0 {
		return fmt.Errorf("lint: no files")
	}
	var problems []string
	for _, f := range files {
		objs, err := readObjects(f)
		if err != nil {
			return err
		}
		if len(objs) == 0 {
			problems = append(problems, f+": no objects")
		}
		for _, o := range objs {
			for _, p := range lintObject(o) {
				problems = append(problems, fmt.Sprintf("%s: %s: %s", f, id(o), p))
			}
		}
		fmt.Fprintf(out, "%s: %d objects\n", f, len(objs))
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("lint:\n  %s", strings.Join(problems, "\n  "))
	}
	return nil
}

// lintObject returns what is wrong with one object: documentation addresses
// anywhere in it, and container images without a registry or a digest.
func lintObject(o object) []string {
	var problems []string
	walk(o, "", func(path string, v any) {
		s, ok := v.(string)
		if !ok {
			return
		}
		for _, m := range addrLike.FindAllString(s, -1) {
			if documentationAddress(m) {
				problems = append(problems, fmt.Sprintf("%s: %q is in a documentation range (RFC 5737/3849): set the real address", path, m))
			}
		}
		if isImageField(path) && !digested.MatchString(s) {
			problems = append(problems, fmt.Sprintf("%s: image %q is not fully qualified and pinned by digest (registry/name[:tag]@sha256:…)", path, s))
		}
	})
	return problems
}

// isImageField says whether path is a container's image in any pod template.
func isImageField(path string) bool {
	if !strings.HasSuffix(path, ".image") {
		return false
	}
	for _, c := range []string{".containers[", ".initContainers[", ".ephemeralContainers["} {
		if strings.Contains(path, c) {
			return true
		}
	}
	return false
}

// documentationAddress says whether s, an address or a prefix, lies in a
// documentation range (a prefix that contains one, like 0.0.0.0/0, does not).
func documentationAddress(s string) bool {
	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		if p, err = netip.ParsePrefix(s); err != nil {
			return false
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return false
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	for _, d := range documentationPrefixes {
		if d.Bits() <= p.Bits() && d.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// walk calls fn for every value under v, with a path like .spec.template.spec.containers[0].image.
func walk(v any, path string, fn func(string, any)) {
	fn(path, v)
	switch t := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(t))
		for k := range t {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			walk(t[k], path+"."+k, fn)
		}
	case []any:
		for i, e := range t {
			walk(e, fmt.Sprintf("%s[%d]", path, i), fn)
		}
	}
}
