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

{{/* keygate.yaml as the pods read it: `config`, with the HTTP authorization listener
when `httpAuthz.enabled`. */}}
{{- define "keygate.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- if .Values.httpAuthz.enabled -}}
{{- $listen := $config.listen | default dict -}}
{{- $_ := set $listen "http_authz" (printf "0.0.0.0:%v" .Values.httpAuthz.port) -}}
{{- $_ := set $config "listen" $listen -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* The settings a running keygate cannot take live (docs/operations.md, "Changing the
policy"): a change to them rolls the pods. The rest reaches running pods through the
mounted ConfigMap and keygate's live reload. */}}
{{- define "keygate.restartConfig" -}}
{{- $config := include "keygate.config" . | fromYaml -}}
{{- if .Values.rollOnAnyConfigChange -}}
{{- toYaml $config -}}
{{- else -}}
{{- $restart := pick $config "listen" "store" "revocation" "cache" "logging" "traces" -}}
{{- $_ := set $restart "api_keys" (pick ($config.api_keys | default dict) "prefix" "argon2") -}}
{{- toYaml $restart -}}
{{- end -}}
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
