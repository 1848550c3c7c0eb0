package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestDocumentationAddress(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want bool
	}{
		{"203.0.113.0/24", true},
		{"203.0.113.7", true},
		{"198.51.100.0/25", true},
		{"192.0.2.1", true},
		{"2001:db8::1", true},
		{"2001:db8:1::/48", true},
		{"0.0.0.0/0", false}, // contains them, but is not one
		{"203.0.0.0/8", false},
		{"10.0.0.0/8", false},
		{"2001:db9::1", false},
		{"8443", false},
	} {
		if got := documentationAddress(tt.in); got != tt.want {
			t.Errorf("documentationAddress(%q) = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestLint(t *testing.T) {
	digest := "@sha256:" + strings.Repeat("a", 64)
	for _, tt := range []struct {
		name, manifest string
		want           []string // substrings of the error; none: no error
	}{
		{"clean", `
apiVersion: apps/v1
kind: Deployment
metadata: {name: a}
spec:
  template:
    spec:
      initContainers: [{name: i, image: "ghcr.io/x/y:1` + digest + `"}]
      containers: [{name: c, image: "registry.bank.internal:5000/x` + digest + `", args: ["--addr=10.1.2.3:443"]}]
`, nil},
		{"tag only", `
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers: [{name: c, image: "ghcr.io/x/y:1.0"}]
`, []string{`Pod p: .spec.containers[0].image: image "ghcr.io/x/y:1.0"`}},
		{"no registry", `
apiVersion: batch/v1
kind: CronJob
metadata: {name: j}
spec: {jobTemplate: {spec: {template: {spec: {containers: [{name: c, image: "redis` + digest + `"}]}}}}}
`, []string{`.containers[0].image: image "redis@sha256`}},
		{"documentation ranges", `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: n}
spec:
  egress: [{to: [{ipBlock: {cidr: 203.0.113.0/24}}]}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c}
data: {config.yaml: "addrs: [\"[2001:db8::5]:6379\"]"}
`, []string{`NetworkPolicy n: .spec.egress[0].to[0].ipBlock.cidr: "203.0.113.0/24"`, `ConfigMap c: .data.config.yaml: "2001:db8::5"`}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := filepath.Join(t.TempDir(), "m.yaml")
			if err := os.WriteFile(f, []byte(tt.manifest), 0o600); err != nil {
				t.Fatal(err)
			}
			err := lintCmd([]string{f}, &strings.Builder{})
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("lint = %v, want no error", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("lint passed, want %q", tt.want)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("lint = %v\nwant it to contain %q", err, w)
				}
			}
		})
	}
}

func TestSame(t *testing.T) {
	kustomize := `
apiVersion: v1
kind: ConfigMap
metadata: {name: tb-config-abcde12345, namespace: tb, labels: {app.kubernetes.io/name: tb}}
data: {config.yaml: "# comment\nb: 2\na: 1\n"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: tb, namespace: tb, labels: {app.kubernetes.io/name: tb}}
spec:
  template:
    metadata: {labels: {app.kubernetes.io/name: tb}}
    spec:
      containers: [{name: c, volumeMounts: [{name: x, mountPath: /x}, {name: config, mountPath: /c}]}]
      volumes: [{name: x, secret: {secretName: x}}, {name: config, configMap: {name: tb-config-abcde12345}}]
`
	helm := `
apiVersion: v1
kind: ConfigMap
metadata: {name: tb-config, namespace: tb, labels: {app.kubernetes.io/name: tb, helm.sh/chart: tb-0.1.0, app.kubernetes.io/managed-by: Helm}}
data: {config.yaml: "a: 1\nb: 2\n"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: tb, namespace: tb, labels: {app.kubernetes.io/name: tb, app.kubernetes.io/instance: tb}}
spec:
  template:
    metadata: {labels: {app.kubernetes.io/name: tb}, annotations: {checksum/config: abc}}
    spec:
      containers: [{name: c, volumeMounts: [{name: config, mountPath: /c}, {name: x, mountPath: /x}]}]
      volumes: [{name: config, configMap: {name: tb-config}}, {name: x, secret: {secretName: x}}]
---
apiVersion: v1
kind: Pod
metadata: {name: tb-test, annotations: {helm.sh/hook: test}}
`
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	k, h := write("k.yaml", kustomize), write("h.yaml", helm)
	if err := sameCmd([]string{k, h}, &strings.Builder{}); err != nil {
		t.Fatalf("same = %v, want the renderer's differences ignored", err)
	}
	// Anything else counts.
	h2 := write("h2.yaml", strings.Replace(helm, "secretName: x", "secretName: y", 1)+"---\napiVersion: v1\nkind: Service\nmetadata: {name: extra}\n")
	err := sameCmd([]string{k, h2}, &strings.Builder{})
	for _, w := range []string{"volumes[1].secret.secretName: x vs y", "Service extra: only in the second"} {
		if err == nil || !strings.Contains(err.Error(), w) {
			t.Errorf("same = %v, want %q", err, w)
		}
	}
}

func TestConvertIsStrict(t *testing.T) {
	var refs []string
	got := convert(map[string]any{
		"type": "object",
		"properties": map[string]any{
			"spec":  map[string]any{"allOf": []any{map[string]any{"$ref": "#/components/schemas/io.k8s.Spec"}}, "default": map[string]any{}},
			"port":  map[string]any{"x-kubernetes-int-or-string": true},
			"extra": map[string]any{"type": "object", "properties": map[string]any{}, "x-kubernetes-preserve-unknown-fields": true},
			"m":     map[string]any{"type": "object", "additionalProperties": map[string]any{"type": "string"}},
		},
	}, func(r string) { refs = append(refs, r) }).(map[string]any)
	if got["additionalProperties"] != false {
		t.Errorf("an object with properties: additionalProperties = %v, want false", got["additionalProperties"])
	}
	props := got["properties"].(map[string]any)
	if ref := props["spec"].(map[string]any)["allOf"].([]any)[0].(map[string]any)["$ref"]; ref != "#/definitions/io.k8s.Spec" || len(refs) != 1 {
		t.Errorf("$ref = %v (refs %v), want #/definitions/io.k8s.Spec", ref, refs)
	}
	if _, ok := props["spec"].(map[string]any)["default"]; ok {
		t.Error("default kept")
	}
	if props["port"].(map[string]any)["oneOf"] == nil {
		t.Error("int-or-string without oneOf")
	}
	if _, ok := props["extra"].(map[string]any)["additionalProperties"]; ok {
		t.Error("preserve-unknown-fields got additionalProperties")
	}
	if _, ok := props["m"].(map[string]any)["additionalProperties"].(map[string]any); !ok {
		t.Error("a map's additionalProperties schema was replaced")
	}
	if fileName("", "v1", "Service") != "service-v1.json" || fileName("cert-manager.io", "v1", "Certificate") != "certificate-cert-manager-v1.json" {
		t.Error("file names differ from kubeconform's")
	}
}

func TestPodSecurityRestricted(t *testing.T) {
	ok := `
apiVersion: apps/v1
kind: Deployment
metadata: {name: ok}
spec:
  template:
    spec:
      securityContext: {runAsNonRoot: true, runAsUser: 10001, runAsGroup: 10001, seccompProfile: {type: RuntimeDefault}}
      containers:
        - name: c
          image: x
          securityContext: {allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
`
	dir := t.TempDir()
	good := filepath.Join(dir, "good.yaml")
	if err := os.WriteFile(good, []byte(ok), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := pssCmd([]string{good}, &strings.Builder{}); err != nil {
		t.Errorf("pss on a restricted pod = %v", err)
	}
	// The agent example as it was: no seccomp profile.
	bad := filepath.Join(dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte(strings.Replace(ok, ", seccompProfile: {type: RuntimeDefault}", "", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := pssCmd([]string{bad}, &strings.Builder{}); err == nil || !strings.Contains(err.Error(), "seccompProfile") {
		t.Errorf("pss without a seccomp profile = %v, want it refused", err)
	}
}
