package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"

	"go.yaml.in/yaml/v3"
)

// object is one Kubernetes object of a rendered manifest.
type object = map[string]any

// readObjects reads every object of a multi-document YAML file; empty
// documents (a template that rendered nothing) are skipped.
func readObjects(path string) ([]object, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var objs []object
	for i := 0; ; i++ {
		var o object
		err := dec.Decode(&o)
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: document %d: %w", path, i+1, err)
		}
		if o != nil {
			objs = append(objs, o)
		}
	}
}

// str returns o[path...] as a string, or "".
func str(o any, path ...string) string {
	for _, p := range path {
		m, ok := o.(map[string]any)
		if !ok {
			return ""
		}
		o = m[p]
	}
	s, _ := o.(string)
	return s
}

// id names an object for messages and comparisons.
func id(o object) string {
	ns := str(o, "metadata", "namespace")
	if ns != "" {
		ns += "/"
	}
	return fmt.Sprintf("%s %s%s", str(o, "kind"), ns, str(o, "metadata", "name"))
}
