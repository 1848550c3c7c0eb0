package agent

import (
	"errors"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// guard refuses, before anything is forwarded with the token, the requests
// that did not come from a program on this host talking to the proxy:
//
//   - a Host that is not a loopback address or localhost with the proxy's
//     port (403): a DNS-rebinding page reaches the proxy under its own name;
//     with ListenAny, an IP address with that port is accepted too (no DNS
//     name can be rebound to an IP literal);
//   - a browser's cross-site request (403): an Origin that is not a loopback
//     origin, or Sec-Fetch-Site: cross-site — a page the user visits must
//     not be able to make the agent call the bank as this workload;
//   - a path that, once normalised (RFC 3986 §5.2.4, percent-encoded dot
//     segments included), leaves the upstream URL's base path, or that has
//     a dot segment with a path parameter ("..;x", which Tomcat resolves
//     as "..") (400).
func (a *Agent) guard(port string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !a.hostAllowed(r.Host, port) {
			http.Error(w, "tokenctl agent: Host must be localhost or a loopback address with the proxy's port", http.StatusForbidden)
			return
		}
		if crossSite(r) {
			http.Error(w, "tokenctl agent: cross-site requests are refused", http.StatusForbidden)
			return
		}
		if _, _, err := upstreamPath(a.cfg.Upstream, r.URL); err != nil {
			http.Error(w, "tokenctl agent: "+err.Error(), http.StatusBadRequest)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// hostAllowed checks a request's Host against the proxy's port.
func (a *Agent) hostAllowed(hostport, port string) bool {
	host, p, err := net.SplitHostPort(hostport)
	if err != nil { // no port: the scheme's default
		host, p = strings.TrimSuffix(strings.TrimPrefix(hostport, "["), "]"), "80"
	}
	if p != port {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && (ip.IsLoopback() || a.cfg.ListenAny)
}

// crossSite reports a browser request from a page that is not on this host.
func crossSite(r *http.Request) bool {
	if strings.EqualFold(r.Header.Get("Sec-Fetch-Site"), "cross-site") {
		return true
	}
	origin, ok := r.Header["Origin"]
	if !ok {
		return false // not a browser's cross-origin request
	}
	if len(origin) != 1 {
		return true
	}
	u, err := url.Parse(origin[0]) // "null" (an opaque origin) has no host
	if err != nil || u.Host == "" {
		return true
	}
	host := u.Hostname()
	if strings.EqualFold(host, "localhost") {
		return false
	}
	ip := net.ParseIP(host)
	return ip == nil || !ip.IsLoopback()
}

// errOutsideBase is a path that leaves the upstream's base path.
var errOutsideBase = errors.New("the path leaves the upstream's base path")

// upstreamPath joins the upstream's base path and the request's path,
// removes the dot segments (RFC 3986 §5.2.4; a segment that percent-decodes
// to "." or ".." counts as one, as a server that decodes before resolving
// would see it) and checks that the result stays under the base path. It
// returns the path decoded and as it goes on the wire.
func upstreamPath(base, in *url.URL) (path, rawPath string, err error) {
	basePath := base.EscapedPath()
	if !strings.HasSuffix(basePath, "/") {
		basePath += "/"
	}
	reqPath := in.EscapedPath()
	if strings.ContainsAny(reqPath, "\\") || containsFold(reqPath, "%5c") {
		return "", "", errors.New("a backslash in the path is refused")
	}
	joined := basePath + strings.TrimPrefix(reqPath, "/")
	segs := strings.Split(joined, "/")
	out := make([]string, 0, len(segs))
	for i, seg := range segs {
		last := i == len(segs)-1
		dec, err := url.PathUnescape(seg)
		if err != nil {
			return "", "", errors.New("the path is not validly percent-encoded")
		}
		if name, _, params := strings.Cut(dec, ";"); params && (name == "." || name == "..") {
			// Not a dot segment for RFC 3986, but Tomcat and the servers
			// behind Spring drop the parameter and then resolve it.
			return "", "", errors.New("a dot segment with a path parameter (;) is refused")
		}
		switch {
		case dec == ".":
			if last {
				out = append(out, "")
			}
		case dec == "..":
			if len(out) > 1 {
				out = out[:len(out)-1]
			}
			if last {
				out = append(out, "")
			}
		case strings.Contains(dec, "/") && strings.Contains(dec, ".."):
			return "", "", errors.New("an encoded slash beside a dot segment is refused")
		default:
			out = append(out, seg)
		}
	}
	rawPath = strings.Join(out, "/")
	if !strings.HasPrefix(rawPath, basePath) {
		return "", "", errOutsideBase
	}
	if path, err = url.PathUnescape(rawPath); err != nil {
		return "", "", errors.New("the path is not validly percent-encoded")
	}
	return path, rawPath, nil
}

func containsFold(s, sub string) bool { return strings.Contains(strings.ToLower(s), sub) }
