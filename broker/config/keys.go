package config

import (
	"fmt"
	"reflect"
	"strings"

	"go.yaml.in/yaml/v3"
)

var typeOfConfig = reflect.TypeFor[Config]()

// checkKeys walks the document against the Go type t and reports the first
// mapping key that t does not have, with its full path and line. yaml.v3's
// KnownFields reports only the Go type's name, which does not help a reader.
func checkKeys(n *yaml.Node, t reflect.Type, path string) error {
	if n.Kind == yaml.DocumentNode {
		if len(n.Content) == 0 {
			return nil
		}
		return checkKeys(n.Content[0], t, path)
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == reflect.TypeFor[AllowedCaller]() && n.Kind == yaml.ScalarNode {
		return nil // the bare-pattern form
	}
	if t == reflect.TypeFor[Duration]() {
		var d Duration
		if err := d.UnmarshalYAML(n); err != nil {
			return fieldErr(keyOrRoot(path), "%v (line %d)", err, n.Line)
		}
		return nil
	}
	switch t.Kind() {
	case reflect.Struct:
		if n.Kind != yaml.MappingNode {
			if n.Tag == "!!null" {
				return nil
			}
			return fieldErr(keyOrRoot(path), "must be a mapping (line %d)", n.Line)
		}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			f, ok := fieldByTag(t, k.Value)
			if !ok {
				return fieldErr(join(path, k.Value), "unknown key (line %d); allowed: %s", k.Line, strings.Join(tags(t), ", "))
			}
			if err := checkKeys(v, f.Type, join(path, k.Value)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		if n.Kind != yaml.SequenceNode {
			if n.Tag == "!!null" {
				return nil
			}
			return fieldErr(keyOrRoot(path), "must be a list (line %d)", n.Line)
		}
		for i, item := range n.Content {
			if err := checkKeys(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Map:
		if n.Kind != yaml.MappingNode && n.Tag != "!!null" {
			return fieldErr(keyOrRoot(path), "must be a mapping (line %d)", n.Line)
		}
	default:
		if n.Kind != yaml.ScalarNode {
			return fieldErr(keyOrRoot(path), "must be a single value (line %d)", n.Line)
		}
	}
	return nil
}

func fieldByTag(t reflect.Type, name string) (reflect.StructField, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("yaml"), ","); tag == name && tag != "-" {
			return f, true
		}
	}
	return reflect.StructField{}, false
}

func tags(t reflect.Type) []string {
	var out []string
	for i := 0; i < t.NumField(); i++ {
		if tag, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); tag != "" && tag != "-" {
			out = append(out, tag)
		}
	}
	return out
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func keyOrRoot(path string) string {
	if path == "" {
		return "(document)"
	}
	return path
}
