package client

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Signs, in a gRPC error's message, that the TLS handshake with the broker
// failed. With TLS 1.3 the client finishes its side of the handshake before
// the broker checks the client certificate, so a refusal often shows only as
// the broker's alert or as the connection closing under the first write.
var (
	refusedSigns = []string{"remote error: tls", "broken pipe", "connection reset by peer", "bad certificate",
		"certificate required", "unknown certificate authority", "expired certificate", "unsupported certificate"}
	serverCertSigns = []string{"x509:", "tls: failed to verify certificate"}
)

// HandshakeHint explains err when it shows a failed TLS handshake with the
// broker, checking what it can of files locally; otherwise it returns "".
func HandshakeHint(err error, files TLSFiles) string {
	if status.Code(err) != codes.Unavailable {
		return ""
	}
	msg := status.Convert(err).Message()
	if containsAny(msg, serverCertSigns) {
		return fmt.Sprintf("the broker's certificate was not accepted: check that it chains to a CA in %s and names the address dialled", files.CAFile)
	}
	if !containsAny(msg, refusedSigns) {
		return ""
	}
	return "the broker refused the TLS handshake: check that the client certificate chains to the broker's client CA " +
		"(its tls.client_ca_file), has the clientAuth extended key usage, and is within its validity. " +
		"Checked here: " + checkCert(files, time.Now())
}

func containsAny(s string, subs []string) bool {
	return slices.ContainsFunc(subs, func(sub string) bool { return strings.Contains(s, sub) })
}

// checkCert reports what is wrong with the caller's certificate as far as
// this side can tell.
func checkCert(files TLSFiles, now time.Time) string {
	pair, err := tls.LoadX509KeyPair(files.CertFile, files.KeyFile)
	if err != nil {
		return fmt.Sprintf("%s and %s do not load as a pair (%v)", files.CertFile, files.KeyFile, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Sprintf("%s does not parse (%v)", files.CertFile, err)
	}
	var problems []string
	if now.After(leaf.NotAfter) {
		problems = append(problems, "it expired at "+leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(leaf.NotBefore) {
		problems = append(problems, "it is not valid before "+leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	if len(leaf.ExtKeyUsage) > 0 && !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) &&
		!slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageAny) {
		problems = append(problems, "it lacks the clientAuth extended key usage")
	}
	if caPEM, err := os.ReadFile(files.CAFile); err == nil {
		roots := x509.NewCertPool()
		roots.AppendCertsFromPEM(caPEM)
		inter := x509.NewCertPool()
		for _, der := range pair.Certificate[1:] {
			if c, err := x509.ParseCertificate(der); err == nil {
				inter.AddCert(c)
			}
		}
		_, verr := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: leaf.NotBefore.Add(time.Second),
			KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
		if verr != nil {
			problems = append(problems, fmt.Sprintf("it does not chain to the CA in %s (fine only if the broker's client CA is another one)", files.CAFile))
		}
	}
	if len(problems) == 0 {
		return fmt.Sprintf("%s (subject %q, valid until %s) looks right from here; compare its issuer with the broker's tls.client_ca_file",
			files.CertFile, leaf.Subject.String(), leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return fmt.Sprintf("%s: %s", files.CertFile, strings.Join(problems, "; "))
}
