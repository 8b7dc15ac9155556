{{/* Names and labels shared by every template. */}}

{{- define "loraserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraserve.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selects the server pods (component=server); the router pods are component=router. */}}
{{- define "loraserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "loraserve.routerSelectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: router
{{- end -}}

{{- define "loraserve.image" -}}
{{- $flavour := ternary "cuda" "cpu" .Values.gpu.enabled -}}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour) -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}

{{- define "loraserve.adaptersClaim" -}}
{{- .Values.adapters.persistence.existingClaim | default (printf "%s-adapters" (include "loraserve.fullname" .)) -}}
{{- end -}}

{{- define "loraserve.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "loraserve.fullname" .)) -}}
{{- end -}}

{{/* The scrape job name Prometheus gives the PodMonitor's targets: <namespace>/<name>. */}}
{{- define "loraserve.job" -}}
{{- printf "%s/%s" .Release.Namespace (include "loraserve.fullname" .) -}}
{{- end -}}
