{{/* Names and labels shared by every template. */}}

{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.operatorName" -}}
{{- printf "%s-operator" (include "tandem.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tandem.operatorSelectorLabels" -}}
app.kubernetes.io/name: tandem
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tandem.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tandem.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "tandem.operatorSubject" -}}
- kind: ServiceAccount
  name: {{ include "tandem.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{/* The namespaces ServiceMonitors look in: the watched ones, or all. */}}
{{- define "tandem.namespaceSelector" -}}
{{- if .Values.watchNamespaces -}}
matchNames:
{{- toYaml .Values.watchNamespaces | nindent 2 }}
{{- else -}}
any: true
{{- end -}}
{{- end -}}

{{/* What the operator does in the namespaces it serves (a ClusterRole's or each Role's rules): kopf watches
TandemModels and the children, patches its bookkeeping annotations and the status; the reconciler creates,
JSON-patches and deletes children (owner references with blockOwnerDeletion need update on
tandemmodels/finalizers); a failed group member restarts its whole group (pods deleted). */}}
{{- define "tandem.operatorRules" -}}
- apiGroups: [tandem.dev]
  resources: [tandemmodels]
  verbs: [get, list, watch, patch]
- apiGroups: [tandem.dev]
  resources: [tandemmodels/status]
  verbs: [patch]
# children carry blockOwnerDeletion; with OwnerReferencesPermissionEnforcement that needs update here
- apiGroups: [tandem.dev]
  resources: [tandemmodels/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments, statefulsets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [leaderworkerset.x-k8s.io]
  resources: [leaderworkersets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, delete]
# the key of groups spanning pods: made once, never patched (the garbage collector deletes it); no list or
# watch, so the operator reads no Secret but its own, by name
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
