{{/* The scorer's own non-secret settings (WINNOW_*, WINNOW_SCORER_*, WINNOW_POLICY_*, WINNOW_HTTP_*). */}}
{{- define "winnow.scorer.config" -}}
{{- $s := .Values.scorer }}
{{- if $s.gpu.enabled }}
{{- /* auto: on a node whose CUDA is unusable the scorer still scores, on CPU, and
winnow_gpu_requested lets an alert say so. */}}
WINNOW_DEVICE: "auto"
WINNOW_GPU_REQUESTED: "true"
{{- else }}
WINNOW_DEVICE: "cpu"
{{- end }}
WINNOW_HTTP_HOST: "0.0.0.0"
WINNOW_HTTP_PORT: {{ int $s.port | quote }}
WINNOW_SCORER_GROUP_ID: {{ $s.groupId | quote }}
WINNOW_SCORER_MAX_BATCH_SIZE: {{ int $s.maxBatchSize | quote }}
WINNOW_SCORER_MAX_WAIT_MS: {{ int $s.maxWaitMs | quote }}
WINNOW_SCORER_STALL_TIMEOUT_S: {{ $s.stallTimeoutS | quote }}
WINNOW_SCORER_DECODE_WORKERS: {{ int $s.decodeWorkers | quote }}
WINNOW_SCORER_DECODER: {{ $s.decoder | quote }}
WINNOW_SCORER_CPU_PARALLELISM: {{ $s.cpuParallelism | quote }}
WINNOW_WORKERS: {{ int $s.workers | quote }}
WINNOW_SCORER_PUBLISH_PREDICTIONS: {{ $s.publishPredictions | quote }}
WINNOW_SCORER_FOLLOW_RELEASES: "true"
WINNOW_POLICY_NAME: {{ $s.policy.name | quote }}
WINNOW_POLICY_BUDGET: {{ $s.policy.budget | quote }}
{{- if not (kindIs "invalid" $s.policy.labelsPerHour) }}
WINNOW_POLICY_LABELS_PER_HOUR: {{ $s.policy.labelsPerHour | quote }}
{{- end }}
{{- end }}
