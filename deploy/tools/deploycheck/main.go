// Command deploycheck makes the checks .ci/run runs on what deploy/ renders:
//
//	deploycheck schemas -out DIR MODULE@VERSION[:GLOB]...
//	    Kubernetes JSON schemas for kubeconform, built offline: the OpenAPI v3
//	    documents of k8s.io/kubernetes (api/openapi-spec/v3) and the CRDs of
//	    the modules given with a GLOB (e.g. github.com/cert-manager/cert-manager@v1.21.2:deploy/crds/*.yaml),
//	    written in kubeconform's layout (DIR/vX.Y.Z-standalone-strict/kind-group-version.json)
//	    with additionalProperties: false wherever a schema lists properties.
//	deploycheck lint FILE...
//	    Fails on an address or CIDR inside a documentation range (RFC 5737, RFC 3849)
//	    anywhere in a rendered manifest, and on a container image that is not
//	    fully qualified and pinned by digest.
//	deploycheck same A B
//	    Fails unless two renderings (kustomize and Helm) hold the same objects,
//	    ignoring only what is the renderer's own (see normalize).
//	deploycheck pss FILE...
//	    Fails unless every pod and pod template passes Pod Security "restricted"
//	    (v1.34), evaluated by the API server's own checks.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "deploycheck:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("usage: deploycheck schemas|lint|same|pss ...")
	}
	switch args[0] {
	case "schemas":
		return schemasCmd(args[1:])
	case "lint":
		return lintCmd(args[1:], os.Stdout)
	case "same":
		return sameCmd(args[1:], os.Stdout)
	case "pss":
		return pssCmd(args[1:], os.Stdout)
	}
	return fmt.Errorf("unknown command %q (schemas, lint, same, pss)", args[0])
}
