package server

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/tokenbroker/tokenbroker/broker/config"
	pb "github.com/tokenbroker/tokenbroker/proto/tokenbroker/v1"
)

// Targets of the memory benchmark (issue 27), per credential.
const (
	idleBytesTarget   = 1024
	cachedBytesTarget = 2048      // beyond the token's own bytes
	metricsSizeTarget = 2_000_000 // bytes of /metrics with 10,000 credentials
	scrapeTarget      = 100 * time.Millisecond
	reloadGrowthLimit = 1.05 // heap after ten reloads, over the heap before
)

// BenchmarkCredentialMemory measures what a credential costs a broker
// process (the test binary as a server, as in BenchmarkBareFloor): the Go
// heap after a forced collection with 10,000 credentials in 100
// credentials_dir files, over that of the same broker with one credential,
// first idle and then each with a cached token; /metrics then (bytes,
// series, time of a scrape); and the heap after ten reloads of the same
// configuration (the path SIGHUP takes) over the heap before them. It
// reports each against issue 27's targets — idle ≤ 1 KB and cached ≤ 2 KB
// (beyond the token's own bytes) per credential, /metrics ≤ 2 MB and a
// scrape ≤ 100 ms, the heap after the reloads within 5% of before — and
// fails where one is missed (a scrape's time is reported only).
// Run it with -benchtime 1x: an iteration starts two servers.
//
// Where the bytes go (issue 27). An idle credential costs about
// 970 B (target 1 KB). Its configuration is held once, as parsed:
// config.Credential (360 B; with its name, scope and caller lists about
// 470 B), which the inventory shows and the upstream fetcher reads. Beside
// it: the broker's credential (192 B and its map entry: defaults, and
// headers of the same strings), its statistics (64 B, the check state;
// handed on across reloads), its compiled caller rules (170 B) and its
// fetcher (32 B). What only a used credential needs is made at its first
// request: the
// upstream client (320 B, made from config.Credential at the first fetch;
// a background check of an idle one uses a client it lets go), the cache
// keys, the record of use (counts, last fetch, callers) and the retry gate.
// So a cached token costs about 1.6 KB beyond the idle credential (target
// 2 KB): its in-process slot and entry, the copy in the in-process store
// (no Redis here), the cache key's map entry, those made at first use, and
// the inventory's note of its caller (no map while there is one). Its
// series are counts in the record of use, written as text at scrape time
// (broker.WriteCredentialMetrics), so a scrape takes tens of milliseconds,
// not a second. Ten reloads leave the heap lower than before them (about
// 0.87×): a reload makes each credential's fetcher anew, and a cached
// credential makes its client again at its next fetch. /metrics keeps two
// series per credential with a token (tokens_issued_total, and
// upstream_requests_total for each outcome seen — "ok" here), whatever
// sources its tokens came from (token_source_total is by source only):
// about 1.52 MB at 10,000 credentials (target 2 MB), measured again once
// every token has also been served from memory. Health, last success and
// expiry have series per credential only while there is something to show
// (not ok; a token in use overdue for refresh), and tokenbroker_credentials
// counts credentials by state.
//
//	go test -run '^$' -bench BenchmarkCredentialMemory -benchtime 1x -v ./broker/server/
func BenchmarkCredentialMemory(b *testing.B) {
	const files, perFile, reloads = 100, 100, 10
	const n = files * perFile
	h := newHarness(b, benchConfig(b))
	h.cfg.Pprof = true

	raw, err := yaml.Marshal(h.cfg)
	if err != nil {
		b.Fatal(err)
	}
	h.write("one.yaml", string(raw))
	one := startPerfChild(b, "broker", h.path("one.yaml"))
	base := one.control(b, http.MethodGet, "/heap")
	baseRSS := one.rss(b)

	teams := map[string][]config.Credential{}
	names := make([]string, 0, n)
	for f := range files {
		list := make([]config.Credential, perFile)
		for i := range list {
			name := fmt.Sprintf("team%03d-cred%03d", f, i)
			list[i] = h.teamCredential(name, payments)
			names = append(names, name)
		}
		teams[fmt.Sprintf("team%03d.yaml", f)] = list
	}
	path := h.writeConfigDir(teams)
	p := startPerfChild(b, "broker", path)
	idle := p.control(b, http.MethodGet, "/heap")
	heapProfile(b, p, "idle")

	// A token for each credential, 32 calls at a time.
	load := newPerfLoad(b, h, p.addrs.GRPC, 1)
	var (
		mu       sync.Mutex
		tokenLen int
		firstErr error
	)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for _, name := range names {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			resp, err := load.tb[0].GetToken(context.Background(), &pb.GetTokenRequest{Credential: name})
			mu.Lock()
			defer mu.Unlock()
			if err != nil && firstErr == nil {
				firstErr = fmt.Errorf("%s: %w", name, err)
			}
			tokenLen = max(tokenLen, len(resp.GetToken().GetAccessToken()))
		})
	}
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	cached := p.control(b, http.MethodGet, "/heap")
	cachedRSS := p.rss(b)
	heapProfile(b, p, "cached")

	var size, series int
	var scrapes []time.Duration
	for range 5 {
		t0 := time.Now()
		body := scrape(b, p.addrs.Admin)
		scrapes = append(scrapes, time.Since(t0))
		size, series = len(body), countSeries(body)
	}
	if dir := os.Getenv("TOKENBROKER_PERF_PROFILE"); dir != "" {
		var once sync.Once
		profile(b, p.addrs.Admin, filepath.Join(dir, "scrape.pprof"), func() error {
			once.Do(func() {
				for t0 := time.Now(); time.Since(t0) < 4*time.Second; {
					scrape(b, p.addrs.Admin)
				}
			})
			return nil
		})
	}
	gzipSize := scrapeGzipSize(b, p.addrs.Admin)
	scrapeTime := medianOf(scrapes, func(d time.Duration) float64 { return float64(d) })

	// Each credential asked again, its token now served from memory, as on
	// a broker in service: its tokens now come from two sources.
	for _, name := range names {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if _, err := load.tb[0].GetToken(context.Background(), &pb.GetTokenRequest{Credential: name}); err != nil {
				mu.Lock()
				defer mu.Unlock()
				firstErr = cmp.Or(firstErr, fmt.Errorf("%s again: %w", name, err))
			}
		})
	}
	wg.Wait()
	if firstErr != nil {
		b.Fatal(firstErr)
	}
	served := scrape(b, p.addrs.Admin)
	servedSize, servedSeries := len(served), countSeries(served)

	before := p.control(b, http.MethodGet, "/heap")
	for range reloads {
		p.control(b, http.MethodPost, "/reload")
	}
	after := p.control(b, http.MethodGet, "/heap")
	afterRSS := p.rss(b)
	heapProfile(b, p, "reloaded")

	idlePer := (idle - base) / n
	cachedPer := (cached - idle) / n
	beyond := cachedPer - float64(tokenLen)
	growth := after / before
	b.Logf("\n%d credentials in %d files; heap after GC: one credential %.1f MB, %d idle %.1f MB, cached %.1f MB\n"+
		"| per credential | heap | target |\n|---|---|---|\n| idle | %.0f B | ≤ %d B |\n| cached (beyond idle) | %.0f B (token %d B) | ≤ %d B + token |\n"+
		"/metrics: %.2f MB, %d series, scrape %v (median of 5) (targets ≤ %.0f MB, ≤ %v); %.2f MB as gzip; "+
		"each token also served from memory: %.2f MB, %d series\n"+
		"%d reloads: heap after GC %.1f → %.1f MB (%.3f×, limit %.2f×); RSS one credential %.0f MB, cached %.0f MB, after reloads %.0f MB",
		n, files, base/1e6, n, idle/1e6, cached/1e6, idlePer, idleBytesTarget, cachedPer, tokenLen, cachedBytesTarget,
		float64(size)/1e6, series, time.Duration(scrapeTime).Round(time.Millisecond), float64(metricsSizeTarget)/1e6, scrapeTarget, float64(gzipSize)/1e6,
		float64(servedSize)/1e6, servedSeries,
		reloads, before/1e6, after/1e6, growth, reloadGrowthLimit, baseRSS/1e6, cachedRSS/1e6, afterRSS/1e6)
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(idlePer, "idle-B/credential")
	b.ReportMetric(cachedPer, "cached-B/credential")
	b.ReportMetric(float64(size), "metrics-B")
	b.ReportMetric(float64(series), "metrics-series")
	b.ReportMetric(float64(gzipSize), "metrics-gzip-B")
	b.ReportMetric(float64(servedSize), "metrics-served-B")
	b.ReportMetric(scrapeTime/1e6, "scrape-ms")
	b.ReportMetric(growth, "heap-after/before-reloads")
	for _, c := range []struct {
		what        string
		got, target float64
	}{
		{"idle credential (heap bytes)", idlePer, idleBytesTarget},
		{"cached token beyond its own bytes (heap bytes)", beyond, cachedBytesTarget},
		{"/metrics (bytes)", float64(size), metricsSizeTarget},
	} {
		if c.got > c.target {
			b.Errorf("%s: %.0f, over issue 27's target %.0f", c.what, c.got, c.target)
		}
	}
	if growth > reloadGrowthLimit {
		b.Errorf("heap after %d reloads: %.3f× the heap before, want ≤ %.2f×", reloads, growth, reloadGrowthLimit)
	}
	// A scrape's time is reported, not asserted: on a shared machine it
	// measures the neighbours.
}

// heapProfile writes the broker's heap profile to
// $TOKENBROKER_PERF_PROFILE/heap-NAME.pprof, when that is set.
func heapProfile(b *testing.B, p *perfProc, name string) {
	b.Helper()
	dir := os.Getenv("TOKENBROKER_PERF_PROFILE")
	if dir == "" {
		return
	}
	prof := getOK(b, "http://"+p.addrs.Admin+"/debug/pprof/heap?gc=1")
	if err := os.WriteFile(filepath.Join(dir, "heap-"+name+".pprof"), prof, 0o644); err != nil {
		b.Fatal(err)
	}
}

// scrape reads /metrics from the admin address.
func scrape(tb testing.TB, admin string) []byte {
	tb.Helper()
	return getOK(tb, "http://"+admin+"/metrics")
}

// getOK returns the body of a GET of url, failing tb unless it is 200 OK.
func getOK(tb testing.TB, url string) []byte {
	tb.Helper()
	resp, err := http.Get(url)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		tb.Fatalf("GET %s: %s %v", url, resp.Status, err)
	}
	return body
}

// scrapeGzipSize is the size of /metrics as sent to a scraper that accepts
// gzip (as Prometheus does).
func scrapeGzipSize(tb testing.TB, admin string) int {
	tb.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+admin+"/metrics", nil)
	req.Header.Set("Accept-Encoding", "gzip")
	resp, err := http.DefaultTransport.RoundTrip(req) // no transparent decompression
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.Header.Get("Content-Encoding") != "gzip" {
		tb.Fatalf("/metrics with gzip: %s %q %v", resp.Status, resp.Header.Get("Content-Encoding"), err)
	}
	return len(body)
}

// countSeries counts the sample lines of a text exposition.
func countSeries(body []byte) int {
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if line := sc.Text(); line != "" && !strings.HasPrefix(line, "#") {
			n++
		}
	}
	return n
}
