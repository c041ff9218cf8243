{{- define "keygate.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "keygate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "keygate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "keygate.labels" -}}
{{ include "keygate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The secret files the pod mounts: env variable, Secret name, key. */}}
{{- define "keygate.secretFiles" -}}
{{- $files := list -}}
{{- $s := .Values.secrets -}}
{{- $files = append $files (dict "env" "KEYGATE_PEPPER" "name" $s.pepper.name "key" $s.pepper.key) -}}
{{- $files = append $files (dict "env" "KEYGATE_ADMIN_TOKEN" "name" $s.adminToken.name "key" $s.adminToken.key) -}}
{{- if $s.watchToken.name -}}
{{- $files = append $files (dict "env" "KEYGATE_WATCH_TOKEN" "name" $s.watchToken.name "key" $s.watchToken.key) -}}
{{- end -}}
{{- if $s.redisPassword.name -}}
{{- $files = append $files (dict "env" "KEYGATE_REDIS_PASSWORD" "name" $s.redisPassword.name "key" $s.redisPassword.key) -}}
{{- end -}}
{{- range $s.extra -}}
{{- $files = append $files (dict "env" .env "name" .name "key" .key) -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}
