{{/* The trainer's own non-secret settings (WINNOW_TRAINER_*). */}}
{{- define "winnow.trainer.config" -}}
{{- $t := .Values.trainer }}
WINNOW_TRAINER_DATA_DIR: "/data"
WINNOW_TRAINER_DEVICE: {{ ternary "cuda" "cpu" $t.gpu.enabled | quote }}
WINNOW_TRAINER_GROUP_ID: {{ $t.groupId | quote }}
WINNOW_TRAINER_METRICS_PORT: {{ int $t.metricsPort | quote }}
WINNOW_TRAINER_CLASSES: {{ toJson $t.classes | quote }}
WINNOW_TRAINER_INPUT_SIZE: {{ int $t.inputSize | quote }}
WINNOW_TRAINER_PRECISION: {{ $t.precision | quote }}
WINNOW_TRAINER_SAMPLE_CACHE_MB: {{ $t.sampleCacheMB | quote }}
{{- if $t.arch }}
WINNOW_TRAINER_ARCH: {{ $t.arch | quote }}
{{- end }}
{{- end }}
