{{/* Names ------------------------------------------------------------------- */}}

{{- define "winnow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "winnow.fullname" -}}
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

{{/* "<fullname>-<component>", e.g. winnow-scorer. Call with (dict "root" $ "component" "scorer"). */}}
{{- define "winnow.componentName" -}}
{{- printf "%s-%s" (include "winnow.fullname" .root | trunc 45 | trimSuffix "-") .component }}
{{- end }}

{{- define "winnow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "winnow.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ------------------------------------------------------------------ */}}

{{- define "winnow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "winnow.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Every object's labels; (dict "root" $ "component" "scorer"). */}}
{{- define "winnow.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{ include "winnow.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: winnow
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Images ------------------------------------------------------------------ */}}

{{/* repository:tag, or repository:tag@digest; call with (dict "root" $ "image" .Values.scorer.image). */}}
{{- define "winnow.image" -}}
{{- $tag := default .root.Chart.AppVersion .image.tag }}
{{- if .image.digest }}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/* Security ---------------------------------------------------------------- */}}

{{- define "winnow.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
fsGroupChangePolicy: OnRootMismatch
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "winnow.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod spec fields every role shares (service account, pull secrets, security). */}}
{{- define "winnow.podCommon" -}}
serviceAccountName: {{ include "winnow.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- include "winnow.podSecurityContext" . | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Kafka ------------------------------------------------------------------- */}}

{{- define "winnow.kafka.sasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{- define "winnow.kafka.tls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* The non-secret WINNOW_KAFKA_* settings, as a YAML map of strings (fromYaml it). */}}
{{- define "winnow.kafka.config" -}}
{{- $k := .Values.kafka }}
WINNOW_KAFKA_BOOTSTRAP: {{ $k.bootstrap | quote }}
WINNOW_KAFKA_TOPIC_PREFIX: {{ $k.topicPrefix | quote }}
WINNOW_KAFKA_PARTITIONS: {{ int $k.partitions | quote }}
WINNOW_KAFKA_REPLICATION_FACTOR: {{ int $k.replicationFactor | quote }}
WINNOW_KAFKA_SESSION_TIMEOUT_MS: {{ int $k.sessionTimeoutMs | quote }}
WINNOW_KAFKA_SECURITY_PROTOCOL: {{ $k.securityProtocol | quote }}
{{- if include "winnow.kafka.sasl" . }}
WINNOW_KAFKA_SASL_MECHANISM: {{ $k.sasl.mechanism | quote }}
WINNOW_KAFKA_SASL_USERNAME: {{ $k.sasl.username | quote }}
{{- end }}
{{- if include "winnow.kafka.tls" . }}
{{- if $k.tls.caSecret.name }}
WINNOW_KAFKA_SSL_CAFILE: "/etc/winnow/kafka-ca/ca.crt"
{{- end }}
{{- if $k.tls.clientSecret.name }}
WINNOW_KAFKA_SSL_CERTFILE: "/etc/winnow/kafka-client/tls.crt"
WINNOW_KAFKA_SSL_KEYFILE: "/etc/winnow/kafka-client/tls.key"
{{- end }}
{{- end }}
{{- end }}

{{/*
A role's ConfigMap data: the Kafka settings, the role's own (a YAML map given as
"own"), then the user's "settings" map over both; every value a string.
Call with (dict "root" $ "own" (include "winnow.scorer.config" $) "settings" .Values.scorer.settings).
*/}}
{{- define "winnow.configData" -}}
{{- $data := include "winnow.kafka.config" .root | fromYaml }}
{{- $data = merge (fromYaml .own) $data }}
{{- range $name, $value := .settings }}
{{- $_ := set $data $name (toString $value) }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/* The SASL password, by reference to its Secret. */}}
{{- define "winnow.kafka.env" -}}
{{- if include "winnow.kafka.sasl" . }}
- name: WINNOW_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.passwordSecret.name }}
      key: {{ .Values.kafka.sasl.passwordSecret.key }}
{{- end }}
{{- end }}

{{- define "winnow.kafka.volumeMounts" -}}
{{- if and (include "winnow.kafka.tls" .) .Values.kafka.tls.caSecret.name }}
- name: kafka-ca
  mountPath: /etc/winnow/kafka-ca
  readOnly: true
{{- end }}
{{- if and (include "winnow.kafka.tls" .) .Values.kafka.tls.clientSecret.name }}
- name: kafka-client
  mountPath: /etc/winnow/kafka-client
  readOnly: true
{{- end }}
{{- end }}

{{- define "winnow.kafka.volumes" -}}
{{- $tls := .Values.kafka.tls }}
{{- if and (include "winnow.kafka.tls" .) $tls.caSecret.name }}
- name: kafka-ca
  secret:
    secretName: {{ $tls.caSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $tls.caSecret.key }}
        path: ca.crt
{{- end }}
{{- if and (include "winnow.kafka.tls" .) $tls.clientSecret.name }}
- name: kafka-client
  secret:
    secretName: {{ $tls.clientSecret.name }}
    defaultMode: 0440
    items:
      - key: {{ $tls.clientSecret.certKey }}
        path: tls.crt
      - key: {{ $tls.clientSecret.keyKey }}
        path: tls.key
{{- end }}
{{- end }}

{{/* Winnow's own secrets ---------------------------------------------------- */}}

{{/*
One env var per (list NAME KEY-IN-secrets.keys REQUIRED), from secrets.existingSecret.
Call with (dict "root" $ "vars" (list (list "WINNOW_ADMIN_TOKEN" "adminToken" false) ...)).
Optional keys may be missing from the Secret: the variable is then unset.
*/}}
{{- define "winnow.secretEnv" -}}
{{- $secrets := .root.Values.secrets }}
{{- if $secrets.existingSecret }}
{{- range .vars }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $secrets.existingSecret }}
      key: {{ index $secrets.keys (index . 1) }}
      optional: {{ not (index . 2) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes every role has: a writable /tmp (the root filesystem is read-only). */}}
{{- define "winnow.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end }}

{{- define "winnow.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{/* Scheduling: GPU extras merged with the role's own; (dict "root" $ "role" .Values.scorer). */}}
{{- define "winnow.scheduling" -}}
{{- $role := .role }}
{{- $gpu := $role.gpu | default dict }}
{{- $nodeSelector := $role.nodeSelector }}
{{- $tolerations := $role.tolerations }}
{{- if $gpu.enabled }}
{{- $nodeSelector = merge (deepCopy $role.nodeSelector) $gpu.nodeSelector }}
{{- $tolerations = concat $role.tolerations $gpu.tolerations }}
{{- if $gpu.runtimeClassName }}
runtimeClassName: {{ $gpu.runtimeClassName }}
{{- end }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $role.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Resources, with the GPU limit (and request) when the role runs on a GPU. */}}
{{- define "winnow.resources" -}}
{{- $resources := deepCopy .resources }}
{{- $gpu := .gpu | default dict }}
{{- if $gpu.enabled }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits $gpu.resourceName $gpu.count }}
{{- $_ := set $resources "limits" $limits }}
{{- $requests := get $resources "requests" | default dict }}
{{- $_ := set $requests $gpu.resourceName $gpu.count }}
{{- $_ := set $resources "requests" $requests }}
{{- end }}
{{- toYaml $resources }}
{{- end }}
