package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
)

// kubernetesModule ships the API server's OpenAPI documents in api/openapi-spec/v3.
const kubernetesModule = "k8s.io/kubernetes"

func schemasCmd(args []string) error {
	fs := flag.NewFlagSet("schemas", flag.ContinueOnError)
	outDir := fs.String("out", "", "`directory` to write the schemas into")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *outDir == "" || fs.NArg() == 0 {
		return fmt.Errorf("usage: deploycheck schemas -out DIR k8s.io/kubernetes@vX.Y.Z [MODULE@VERSION:GLOB]...")
	}
	w := &schemaWriter{files: map[string]string{}}
	for _, spec := range fs.Args() {
		mod, glob, _ := strings.Cut(spec, ":")
		path, version, ok := strings.Cut(mod, "@")
		if !ok {
			return fmt.Errorf("%s: want MODULE@VERSION[:GLOB]", spec)
		}
		dir, err := moduleDir(mod)
		if err != nil {
			return err
		}
		switch {
		case path == kubernetesModule && glob == "":
			w.dir = filepath.Join(*outDir, version+"-standalone-strict")
			if err := w.kubernetes(filepath.Join(dir, "api", "openapi-spec", "v3")); err != nil {
				return err
			}
		case glob == "":
			return fmt.Errorf("%s: name the CRD files with :GLOB", spec)
		default:
			if w.dir == "" {
				return fmt.Errorf("%s: give %s@VERSION first (it names the schema directory)", spec, kubernetesModule)
			}
			files, err := filepath.Glob(filepath.Join(dir, glob))
			if err != nil || len(files) == 0 {
				return fmt.Errorf("%s: no files match (%v)", spec, err)
			}
			for _, f := range files {
				if err := w.crds(f); err != nil {
					return err
				}
			}
		}
	}
	fmt.Printf("%d schemas in %s\n", len(w.files), w.dir)
	return nil
}

// moduleDir downloads a module (or finds it in the module cache) with the go command.
func moduleDir(mod string) (string, error) {
	cmd := exec.Command("go", "mod", "download", "-json", mod)
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	cmd.Dir = os.TempDir() // outside any module: no go.mod is read or written
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var info struct{ Dir, Error string }
	if jerr := json.Unmarshal(out, &info); jerr == nil && info.Error != "" {
		return "", fmt.Errorf("go mod download %s: %s", mod, info.Error)
	}
	if err != nil || info.Dir == "" {
		return "", fmt.Errorf("go mod download %s: %v %s", mod, err, stderr.String())
	}
	return info.Dir, nil
}

// schemaWriter writes schemas in kubeconform's layout and refuses two
// different groups behind one file name.
type schemaWriter struct {
	dir   string
	files map[string]string // file name → group/version/kind that wrote it
}

// fileName is kubeconform's name for a kind: kind-GROUP-version.json, where
// GROUP is the group's first label (core kinds: kind-version.json).
func fileName(group, version, kind string) string {
	suffix := "-" + version
	if group != "" {
		suffix = "-" + strings.ToLower(strings.Split(group, ".")[0]) + suffix
	}
	return strings.ToLower(kind) + suffix + ".json"
}

func (w *schemaWriter) write(group, version, kind string, schema map[string]any) error {
	name := fileName(group, version, kind)
	gvk := group + "/" + version + "/" + kind
	if prev, ok := w.files[name]; ok && prev != gvk {
		return fmt.Errorf("%s: both %s and %s", name, prev, gvk)
	}
	w.files[name] = gvk
	data, err := json.Marshal(schema)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(w.dir, name), data, 0o644)
}

// kubernetes converts every kind of the API server's OpenAPI v3 documents.
func (w *schemaWriter) kubernetes(dir string) error {
	files, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil || len(files) == 0 {
		return fmt.Errorf("%s: no OpenAPI documents (%v)", dir, err)
	}
	defs := map[string]any{}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return err
		}
		var doc struct {
			Components struct {
				Schemas map[string]any `json:"schemas"`
			} `json:"components"`
		}
		if err := json.Unmarshal(data, &doc); err != nil {
			return fmt.Errorf("%s: %w", f, err)
		}
		for k, v := range doc.Components.Schemas {
			defs[k] = v
		}
	}
	names := make([]string, 0, len(defs))
	for k := range defs {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, name := range names {
		def, _ := defs[name].(map[string]any)
		gvks, _ := def["x-kubernetes-group-version-kind"].([]any)
		for _, g := range gvks {
			gvk, _ := g.(map[string]any)
			group, _ := gvk["group"].(string)
			version, _ := gvk["version"].(string)
			kind, _ := gvk["kind"].(string)
			if strings.HasSuffix(kind, "List") && kind != "List" || kind == "" {
				continue
			}
			schema, err := standalone(name, defs)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			if err := w.write(group, version, kind, schema); err != nil {
				return err
			}
		}
	}
	return nil
}

// standalone is the schema of definition root with every definition it
// reaches under "definitions", references rewritten to point there.
func standalone(root string, defs map[string]any) (map[string]any, error) {
	seen := map[string]bool{root: true}
	queue := []string{root}
	out := map[string]any{}
	for len(queue) > 0 {
		name := queue[0]
		queue = queue[1:]
		def, ok := defs[name]
		if !ok {
			return nil, fmt.Errorf("reference to missing definition %s", name)
		}
		out[name] = convert(def, func(ref string) {
			if !seen[ref] {
				seen[ref] = true
				queue = append(queue, ref)
			}
		})
	}
	schema := out[root].(map[string]any)
	delete(out, root)
	if len(out) > 0 || seen[root] {
		out[root] = convert(defs[root], func(string) {})
		schema["definitions"] = out
	}
	return schema, nil
}

// convert copies one schema node for kubeconform: references to
// #/definitions/, additionalProperties: false wherever properties are listed
// (kubeconform's strict mode; except where unknown fields are preserved),
// x-kubernetes-int-or-string as an explicit oneOf.
func convert(node any, ref func(string)) any {
	m, ok := node.(map[string]any)
	if !ok {
		return node
	}
	out := map[string]any{}
	for k, v := range m {
		switch k {
		case "$ref":
			name := strings.TrimPrefix(v.(string), "#/components/schemas/")
			ref(name)
			out[k] = "#/definitions/" + name
		case "properties", "patternProperties", "definitions":
			props := map[string]any{}
			for pk, pv := range v.(map[string]any) {
				props[pk] = convert(pv, ref)
			}
			out[k] = props
		case "items", "additionalProperties", "not":
			out[k] = convert(v, ref)
		case "allOf", "anyOf", "oneOf":
			var list []any
			for _, e := range v.([]any) {
				list = append(list, convert(e, ref))
			}
			out[k] = list
		case "x-kubernetes-group-version-kind", "default", "example":
			// not validation; defaults can be large
		default:
			out[k] = v
		}
	}
	if _, ok := out["properties"]; ok {
		if _, set := out["additionalProperties"]; !set && m["x-kubernetes-preserve-unknown-fields"] != true {
			out["additionalProperties"] = false
		}
	}
	if m["x-kubernetes-int-or-string"] == true && out["oneOf"] == nil && out["anyOf"] == nil {
		delete(out, "type")
		out["oneOf"] = []any{map[string]any{"type": "string"}, map[string]any{"type": "integer"}}
	}
	return out
}

// crds converts every served version of every CustomResourceDefinition in a file.
func (w *schemaWriter) crds(path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	n := 0
	for {
		var crd struct {
			Kind string `yaml:"kind"`
			Spec struct {
				Group string `yaml:"group"`
				Names struct {
					Kind string `yaml:"kind"`
				} `yaml:"names"`
				Versions []struct {
					Name   string `yaml:"name"`
					Served bool   `yaml:"served"`
					Schema struct {
						OpenAPIV3Schema map[string]any `yaml:"openAPIV3Schema"`
					} `yaml:"schema"`
				} `yaml:"versions"`
			} `yaml:"spec"`
		}
		err := dec.Decode(&crd)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: %w (a Helm template, not a CRD file?)", path, err)
		}
		if crd.Kind != "CustomResourceDefinition" {
			continue
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served || v.Schema.OpenAPIV3Schema == nil {
				continue
			}
			schema := convert(v.Schema.OpenAPIV3Schema, func(string) {}).(map[string]any)
			if err := w.write(crd.Spec.Group, v.Name, crd.Spec.Names.Kind, schema); err != nil {
				return err
			}
			n++
		}
	}
	if n == 0 {
		return fmt.Errorf("%s: no CustomResourceDefinition with a schema", path)
	}
	return nil
}
