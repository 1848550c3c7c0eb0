package main

import (
	"flag"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"sort"
	"strings"

	"go.yaml.in/yaml/v3"
)

// rendererLabels are the labels Helm's conventions add and kustomize does not:
// they name the release and the chart, not the object.
var rendererLabels = []string{"helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version"}

// kustomizeHash is the suffix configMapGenerator appends to a name.
var kustomizeHash = regexp.MustCompile(`-[a-z0-9]{10}$`)

func sameCmd(args []string, out io.Writer) error {
	fs := flag.NewFlagSet("same", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("usage: deploycheck same KUSTOMIZE_OUTPUT HELM_OUTPUT")
	}
	a, err := readObjects(fs.Arg(0))
	if err != nil {
		return err
	}
	b, err := readObjects(fs.Arg(1))
	if err != nil {
		return err
	}
	diffs := compare(normalize(a, true), normalize(b, false))
	if len(diffs) > 0 {
		return fmt.Errorf("%s and %s render different objects:\n  %s", fs.Arg(0), fs.Arg(1), strings.Join(diffs, "\n  "))
	}
	fmt.Fprintf(out, "%s and %s: the same %d objects\n", fs.Arg(0), fs.Arg(1), len(a))
	return nil
}

// normalize takes away what belongs to the renderer rather than to the
// object: Helm's release labels and its config checksum annotation, Helm test
// hooks, kustomize's hash suffix on generated ConfigMaps (and the references
// to them); and it parses YAML files held in ConfigMaps, so that key order and
// comments do not count. Everything else must be equal.
func normalize(objs []object, kustomize bool) map[string]object {
	renamed := map[string]string{}
	if kustomize {
		for _, o := range objs {
			name := str(o, "metadata", "name")
			if str(o, "kind") == "ConfigMap" && kustomizeHash.MatchString(name) {
				renamed[name] = kustomizeHash.ReplaceAllString(name, "")
			}
		}
	}
	res := map[string]object{}
	for _, o := range objs {
		if meta, ok := o["metadata"].(map[string]any); ok {
			if ann, ok := meta["annotations"].(map[string]any); ok && ann["helm.sh/hook"] != nil {
				continue // helm test pods are Helm's own
			}
		}
		o = rename(o, renamed).(object)
		dropRendererMetadata(o)
		walk(o, "", func(_ string, v any) {
			if m, ok := v.(map[string]any); ok {
				if t, ok := m["template"].(map[string]any); ok {
					dropRendererMetadata(t)
				}
				// Volumes and mounts are sets by name: a strategic merge patch
				// puts its own first, a template in its own order.
				for _, k := range []string{"volumes", "volumeMounts"} {
					if l, ok := m[k].([]any); ok {
						sort.SliceStable(l, func(i, j int) bool { return str(l[i], "name") < str(l[j], "name") })
					}
				}
			}
		})
		if str(o, "kind") == "ConfigMap" {
			if data, ok := o["data"].(map[string]any); ok {
				for k, v := range data {
					s, _ := v.(string)
					var parsed any
					if (strings.HasSuffix(k, ".yaml") || strings.HasSuffix(k, ".yml")) && yaml.Unmarshal([]byte(s), &parsed) == nil {
						data[k] = parsed
					}
				}
			}
		}
		res[id(o)] = o
	}
	return res
}

// dropRendererMetadata removes the renderer's labels and annotations from an
// object's (or a pod template's) metadata, and empty maps left behind.
func dropRendererMetadata(o map[string]any) {
	meta, ok := o["metadata"].(map[string]any)
	if !ok {
		return
	}
	if labels, ok := meta["labels"].(map[string]any); ok {
		for _, l := range rendererLabels {
			delete(labels, l)
		}
		if len(labels) == 0 {
			delete(meta, "labels")
		}
	}
	if ann, ok := meta["annotations"].(map[string]any); ok {
		delete(ann, "checksum/config")
		if len(ann) == 0 {
			delete(meta, "annotations")
		}
	}
}

// rename replaces every string equal to a key of renamed.
func rename(v any, renamed map[string]string) any {
	switch t := v.(type) {
	case map[string]any:
		for k, e := range t {
			t[k] = rename(e, renamed)
		}
	case []any:
		for i, e := range t {
			t[i] = rename(e, renamed)
		}
	case string:
		if n, ok := renamed[t]; ok {
			return n
		}
	}
	return v
}

// compare lists the objects only one side has, and the paths where the
// objects both have differ.
func compare(a, b map[string]object) []string {
	var diffs []string
	for k, oa := range a {
		ob, ok := b[k]
		if !ok {
			diffs = append(diffs, k+": only in the first")
			continue
		}
		diffs = append(diffs, diffValues(k, oa, ob)...)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			diffs = append(diffs, k+": only in the second")
		}
	}
	sort.Strings(diffs)
	return diffs
}

func diffValues(path string, a, b any) []string {
	ma, okA := a.(map[string]any)
	mb, okB := b.(map[string]any)
	if okA && okB {
		var d []string
		for k, va := range ma {
			d = append(d, diffValues(path+"."+k, va, mb[k])...)
		}
		for k, vb := range mb {
			if _, ok := ma[k]; !ok {
				d = append(d, diffValues(path+"."+k, nil, vb)...)
			}
		}
		return d
	}
	la, okA := a.([]any)
	lb, okB := b.([]any)
	if okA && okB && len(la) == len(lb) {
		var d []string
		for i := range la {
			d = append(d, diffValues(fmt.Sprintf("%s[%d]", path, i), la[i], lb[i])...)
		}
		return d
	}
	if reflect.DeepEqual(a, b) {
		return nil
	}
	return []string{fmt.Sprintf("%s: %s vs %s", path, short(a), short(b))}
}

func short(v any) string {
	if v == nil {
		return "(absent)"
	}
	s := strings.TrimSpace(fmt.Sprint(v))
	if len(s) > 120 {
		s = s[:120] + "…"
	}
	return s
}
