{{/* Chart name. */}}
{{- define "claude-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every object of the release. */}}
{{- define "claude-relay.fullname" -}}
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

{{- define "claude-relay.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. The component label keeps the operator's pods apart
from the proxy pods the operator creates (component=proxy).
*/}}
{{- define "claude-relay.labels" -}}
helm.sh/chart: {{ include "claude-relay.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: claude-relay
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
{{- end }}

{{- define "claude-relay.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "claude-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "claude-relay.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "claude-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end }}

{{- define "claude-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "claude-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "claude-relay.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The proxy image the operator renders into relays' Deployments. */}}
{{- define "claude-relay.proxyImage" -}}
{{- printf "%s:%s" .Values.proxyImage.repository (.Values.proxyImage.tag | default .Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "claude-relay.leaseName" -}}
{{- default (include "claude-relay.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/* Leader election is forced on with more than one replica. */}}
{{- define "claude-relay.leaderElection" -}}
{{- if and (gt (int .Values.replicas) 1) (not .Values.leaderElection.enabled) }}
{{- fail "leaderElection.enabled must be true when replicas > 1: two operators must never reconcile at once" }}
{{- end }}
{{- if .Values.leaderElection.enabled }}true{{ end }}
{{- end }}

{{- define "claude-relay.redis.fullname" -}}
{{- printf "%s-redis" (include "claude-relay.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The operator's permissions, for its ClusterRole or, with watchNamespace, its
Role in that namespace. Owned objects are written with server-side apply: a
PATCH, which the API server also authorizes as `create` when the object does
not exist yet.
*/}}
{{- define "claude-relay.operatorRules" -}}
# Its API: watched, and status reported with server-side apply (regions:
# a merge patch also removes entries older operator versions wrote).
- apiGroups: ["relay.claude-relay.dev"]
  resources: ["clauderelays", "upstreamregions"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["relay.claude-relay.dev"]
  resources: ["clauderelays/status", "upstreamregions/status"]
  verbs: ["patch"]
# Owned objects. ConfigMaps also need `get`: the Role the operator creates
# for each relay's proxies grants get/list/watch on one ConfigMap, and RBAC
# lets it grant only what it holds itself (no `escalate`/`bind` needed).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["services", "serviceaccounts"]
  verbs: ["list", "watch", "create", "patch"]
# Deployments also need `get`: handing spec.replicas over to an HPA reads
# who owns it (operator/src/handover.rs).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch"]
# The HPA is deleted when a relay turns autoscaling off; everything else
# goes with the relay through ownerReferences.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Watches Secrets to see that referenced keys exist, keeping only key
# names in memory (values are dropped as they arrive); reads a Redis URL or
# password with `get` when its Secret changes.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
# Events on relays: problems, owned objects created or changed, Redis
# unreachable, breakers opening and closing.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
