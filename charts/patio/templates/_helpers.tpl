{{/*
Names: everything is prefixed with the release's full name, truncated to the
63 characters Kubernetes allows for names and label values.
*/}}
{{- define "patio.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "patio.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "patio.operatorName" -}}
{{- printf "%s-operator" (include "patio.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "patio.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "patio.selectorLabels" -}}
app.kubernetes.io/name: {{ include "patio.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Labels of the operator's own objects. */}}
{{- define "patio.labels" -}}
{{ include "patio.labelsFor" (dict "ctx" . "component" "operator") }}
{{- end -}}

{{/* Common labels with a component: (dict "ctx" $ "component" "cluster"). */}}
{{- define "patio.labelsFor" -}}
helm.sh/chart: {{ include "patio.chart" .ctx }}
app.kubernetes.io/name: {{ include "patio.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{- define "patio.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "patio.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "patio.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Namespace the operator watches and its RBAC is scoped to ("" = all). */}}
{{- define "patio.watchNamespace" -}}
{{- .Values.watchNamespace -}}
{{- end -}}

{{/*
Combinations the schema cannot express. Included by the Deployment so every
render checks them.
*/}}
{{- define "patio.validate" -}}
{{- if eq (int .Values.metrics.port) (int .Values.health.port) -}}
{{- fail (printf "metrics.port and health.port must differ (both are %v)" .Values.metrics.port) -}}
{{- end -}}
{{- if and .Values.cluster.enabled .Values.watchNamespace (ne .Values.watchNamespace .Release.Namespace) -}}
{{- fail (printf "cluster.enabled creates a PatioCluster in %q, but watchNamespace is %q: the operator would never reconcile it" .Release.Namespace .Values.watchNamespace) -}}
{{- end -}}
{{- range .Values.operator.extraEnv -}}
{{- if has .name (list "POD_IP" "POD_NAMESPACE" "POD_NAME" "PATIO_WORKER_IMAGE") -}}
{{- fail (printf "operator.extraEnv sets %s, which the chart sets itself: use image.*, or drop it" .name) -}}
{{- end -}}
{{- end -}}
{{- range .Values.operator.extraVolumes -}}
{{- if eq .name "tmp" -}}
{{- fail "operator.extraVolumes: the name \"tmp\" is the chart's own /tmp volume; choose another name" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.cluster.enabled (not .Values.crds.install) (not (.Capabilities.APIVersions.Has "patio.dev/v1alpha1/PatioCluster")) -}}
{{- fail "cluster.enabled needs the PatioCluster CRD: set crds.install=true or install the CRD first" -}}
{{- end -}}
{{- if and (gt (int .Values.operator.replicas) 1) (not .Values.operator.leaderElection.enabled) -}}
{{- fail (printf "operator.replicas is %v but operator.leaderElection.enabled is false: every replica would reconcile the same clusters" .Values.operator.replicas) -}}
{{- end -}}
{{- end -}}

{{/*
Monitoring of the workers: what every PatioCluster's pods and mesh Service
carry (operator/src/patio_operator/names.py), and the relabelling that gives
each target the patio_cluster label the dashboards and alerts group by (the
operator's per-cluster ServiceMonitor does the same).
*/}}
{{- define "patio.workerMonitorSelector" -}}
app.kubernetes.io/managed-by: patio-operator
app.kubernetes.io/component: worker
{{- end -}}

{{- define "patio.workerRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_label_patio_dev_cluster]
  targetLabel: patio_cluster
{{- end -}}

{{/* A NamespaceSelector from values: matchNames, when given, replaces the
default any: true (Helm merges maps, and any: true would select everything). */}}
{{- define "patio.namespaceSelector" -}}
namespaceSelector:
{{- if .matchNames }}
  matchNames:
    {{- toYaml .matchNames | nindent 4 }}
{{- else if .any }}
  any: true
{{- else }} {}
{{- end }}
{{- end -}}
