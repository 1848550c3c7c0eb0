package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/pod-security-admission/api"
	"k8s.io/pod-security-admission/policy"
)

// restricted is the Pod Security level and version the namespaces enforce
// (pod-security.kubernetes.io/enforce-version: v1.34).
var restricted = api.LevelVersion{Level: api.LevelRestricted, Version: api.MajorMinorVersion(1, 34)}

// pssCmd evaluates every pod and pod template of the files with the
// Kubernetes API server's own Pod Security checks (k8s.io/pod-security-admission)
// at "restricted", as the namespaces enforce it.
func pssCmd(files []string, out io.Writer) error {
	if len(files) == 0 {
		return fmt.Errorf("pss: no files")
	}
	eval, err := policy.NewEvaluator(policy.DefaultChecks())
	if err != nil {
		return err
	}
	var problems []string
	for _, f := range files {
		objs, err := readObjects(f)
		if err != nil {
			return err
		}
		n := 0
		for _, o := range objs {
			tmpl, ok := podTemplate(o)
			if !ok {
				continue
			}
			n++
			var pod corev1.PodTemplateSpec
			raw, err := json.Marshal(tmpl)
			if err == nil {
				err = json.Unmarshal(raw, &pod)
			}
			if err != nil {
				return fmt.Errorf("%s: %s: %w", f, id(o), err)
			}
			for _, r := range eval.EvaluatePod(restricted, &pod.ObjectMeta, &pod.Spec) {
				if !r.Allowed {
					problems = append(problems, fmt.Sprintf("%s: %s: %s (%s)", f, id(o), r.ForbiddenReason, r.ForbiddenDetail))
				}
			}
		}
		fmt.Fprintf(out, "%s: %d pods pass Pod Security %s:%s\n", f, n, restricted.Level, restricted.Version)
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("pss:\n  %s", strings.Join(problems, "\n  "))
	}
	return nil
}

// podTemplate returns the pod an object runs: a Pod itself, the template of
// a workload, or a CronJob's job template's.
func podTemplate(o object) (map[string]any, bool) {
	spec, _ := o["spec"].(map[string]any)
	switch str(o, "kind") {
	case "Pod":
		return o, true
	case "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController":
		t, ok := spec["template"].(map[string]any)
		return t, ok
	case "CronJob":
		jt, _ := spec["jobTemplate"].(map[string]any)
		js, _ := jt["spec"].(map[string]any)
		t, ok := js["template"].(map[string]any)
		return t, ok
	}
	return nil, false
}
