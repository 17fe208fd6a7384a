{{/* The bridge's own non-secret settings (WINNOW_LABEL_STUDIO_*). */}}
{{- define "winnow.labelStudioBridge.config" -}}
{{- $b := .Values.labelStudioBridge }}
WINNOW_LABEL_STUDIO_HOST: "0.0.0.0"
WINNOW_LABEL_STUDIO_PORT: {{ int $b.port | quote }}
WINNOW_LABEL_STUDIO_URL: {{ $b.url | quote }}
WINNOW_LABEL_STUDIO_PROJECT_ID: {{ int $b.projectId | quote }}
WINNOW_LABEL_STUDIO_GROUP_ID: {{ $b.groupId | quote }}
{{- end }}
