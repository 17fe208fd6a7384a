{{/* Checks across values that the schema cannot express; each fails the render with what to set. */}}
{{- define "winnow.validate" -}}
{{- $v := .Values }}
{{- if not $v.kafka.bootstrap }}
{{- fail "kafka.bootstrap is required: the brokers' host:port list (Kubernetes has no embedded broker)" }}
{{- end }}
{{- if include "winnow.kafka.sasl" . }}
{{- if not $v.kafka.sasl.username }}
{{- fail (printf "kafka.securityProtocol is %s: set kafka.sasl.username" $v.kafka.securityProtocol) }}
{{- end }}
{{- if not $v.kafka.sasl.passwordSecret.name }}
{{- fail (printf "kafka.securityProtocol is %s: set kafka.sasl.passwordSecret.name to the Secret holding the SASL password" $v.kafka.securityProtocol) }}
{{- end }}
{{- end }}
{{- $keda := $v.scorer.autoscaling.keda }}
{{- $workers := int (default 1 $v.scorer.workers) }}
{{- if and $v.scorer.enabled $keda.enabled }}
{{- if gt (int $keda.maxReplicaCount) (int $v.kafka.partitions) }}
{{- fail (printf "scorer.autoscaling.keda.maxReplicaCount (%d) is larger than kafka.partitions (%d): a scorer replica without a frames partition has no work and never becomes ready" (int $keda.maxReplicaCount) (int $v.kafka.partitions)) }}
{{- end }}
{{- if gt (mul (int $keda.maxReplicaCount) $workers) (int $v.kafka.partitions) }}
{{- fail (printf "scorer.autoscaling.keda.maxReplicaCount (%d) × scorer.workers (%d) is larger than kafka.partitions (%d): a scorer worker without a frames partition has no work, and its pod never becomes ready" (int $keda.maxReplicaCount) $workers (int $v.kafka.partitions)) }}
{{- end }}
{{- if gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount) }}
{{- fail (printf "scorer.autoscaling.keda.minReplicaCount (%d) is larger than maxReplicaCount (%d)" (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- end }}
{{- else if and $v.scorer.enabled (gt (int $v.scorer.replicas) (int $v.kafka.partitions)) }}
{{- fail (printf "scorer.replicas (%d) is larger than kafka.partitions (%d): a scorer replica without a frames partition has no work and never becomes ready" (int $v.scorer.replicas) (int $v.kafka.partitions)) }}
{{- else if and $v.scorer.enabled (gt (mul (int $v.scorer.replicas) $workers) (int $v.kafka.partitions)) }}
{{- fail (printf "scorer.replicas (%d) × scorer.workers (%d) is larger than kafka.partitions (%d): a scorer worker without a frames partition has no work, and its pod never becomes ready" (int $v.scorer.replicas) $workers (int $v.kafka.partitions)) }}
{{- end }}
{{- if and $v.trainer.enabled (lt (len $v.trainer.classes) 2) }}
{{- fail "trainer.classes needs at least two class names: the trainer builds its first model from them" }}
{{- end }}
{{- if and $v.labelApp.enabled (not $v.secrets.existingSecret) }}
{{- fail (printf "labelApp needs secrets.existingSecret: a Secret with the key %q (the team's token) or %q (per-user tokens)" $v.secrets.keys.labelAppTeamToken $v.secrets.keys.labelAppUserTokens) }}
{{- end }}
{{- if and $v.labelStudioBridge.enabled (not $v.secrets.existingSecret) }}
{{- fail (printf "labelStudioBridge needs secrets.existingSecret: a Secret with the keys %q and %q" $v.secrets.keys.labelStudioApiKey $v.secrets.keys.labelStudioWebhookToken) }}
{{- end }}
{{- if and $v.labelApp.enabled $v.labelApp.ingress.enabled $v.labelApp.ingress.tls.enabled (not $v.labelApp.ingress.tls.secretName) }}
{{- fail "labelApp.ingress.tls.enabled needs labelApp.ingress.tls.secretName" }}
{{- end }}
{{- end }}
