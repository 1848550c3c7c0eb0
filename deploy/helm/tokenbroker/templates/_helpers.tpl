{{/* The chart's name. */}}
{{- define "tokenbroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The objects' name: fullnameOverride, else the release name when it
contains the chart name, else RELEASE-CHART. */}}
{{- define "tokenbroker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object's metadata. */}}
{{- define "tokenbroker.labels" -}}
app.kubernetes.io/name: {{ include "tokenbroker.name" . }}
app.kubernetes.io/part-of: tokenbroker
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* The pods' selector (kept as the kustomize manifests have it, so that
either can take over a Deployment the other created). */}}
{{- define "tokenbroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenbroker.name" . }}
{{- end }}

{{/* registry/repository:tag@digest */}}
{{- define "tokenbroker.image" -}}
{{- $i := .Values.image }}
{{- printf "%s/%s" $i.registry $i.repository }}{{ if $i.tag }}:{{ $i.tag }}{{ end }}@{{ $i.digest }}
{{- end }}

{{/* The broker's configuration file, with admin_tls when metricsTLS is on. */}}
{{- define "tokenbroker.config" -}}
{{- if .Values.metricsTLS.enabled }}
{{- $cfg := include "tokenbroker.configSource" . | fromYaml }}
{{- $tls := dict "cert_file" .Values.metricsTLS.certFile "key_file" .Values.metricsTLS.keyFile }}
{{- with .Values.metricsTLS.clientCAFile }}{{ $_ := set $tls "client_ca_file" . }}{{ end }}
{{- $_ := set $cfg "admin_tls" $tls }}
{{- toYaml $cfg }}
{{- else }}
{{- include "tokenbroker.configSource" . }}
{{- end }}
{{- end }}

{{/* The configuration as given: configFile, config, or the chart's file. */}}
{{- define "tokenbroker.configSource" -}}
{{- if .Values.configFile }}
{{- .Values.configFile }}
{{- else if .Values.config }}
{{- toYaml .Values.config }}
{{- else }}
{{- .Files.Get "files/config.yaml" }}
{{- end }}
{{- end }}
