{{/* The label app's own non-secret settings (WINNOW_LABEL_APP_*). */}}
{{- define "winnow.labelApp.config" -}}
{{- $a := .Values.labelApp }}
{{- $secure := $a.cookieSecure }}
{{- if kindIs "invalid" $secure }}
{{- $secure = and $a.ingress.enabled $a.ingress.tls.enabled }}
{{- end }}
WINNOW_LABEL_APP_HOST: "0.0.0.0"
WINNOW_LABEL_APP_PORT: {{ int $a.port | quote }}
WINNOW_LABEL_APP_GROUP_ID: {{ $a.groupId | quote }}
WINNOW_LABEL_APP_LEASE_S: {{ $a.leaseS | quote }}
WINNOW_LABEL_APP_SECOND_OPINION: {{ $a.secondOpinion | quote }}
WINNOW_LABEL_APP_COOKIE_SECURE: {{ $secure | quote }}
{{- end }}
