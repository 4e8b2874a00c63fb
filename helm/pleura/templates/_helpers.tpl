{{/* Names ------------------------------------------------------------------ */}}

{{- define "pleura.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pleura.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pleura.workerName" -}}
{{- printf "%s-worker" (include "pleura.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pleura.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "pleura.labels" -}}
helm.sh/chart: {{ include "pleura.chart" . }}
app.kubernetes.io/name: {{ include "pleura.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pleura
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "pleura.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pleura.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pleura.workerSelectorLabels" -}}
{{ include "pleura.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end -}}

{{- define "pleura.annotations" -}}
{{- with .Values.commonAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Images ----------------------------------------------------------------- */}}

{{/* registry/repository:tag, or @digest when a digest is given. */}}
{{- define "pleura.imageRef" -}}
{{- $img := .image -}}
{{- $ref := printf "%s/%s" $img.registry $img.repository | trimPrefix "/" -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $ref $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .defaultTag $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "pleura.workerImage" -}}
{{- include "pleura.imageRef" (dict "image" .Values.image "defaultTag" .Chart.AppVersion) -}}
{{- end -}}

{{- define "pleura.trainerImage" -}}
{{- $variant := ternary "cuda" "cpu" (gt (int .Values.trainer.job.gpu) 0) -}}
{{- include "pleura.imageRef" (dict "image" .Values.trainer.job.image "defaultTag" (printf "%s-%s" .Chart.AppVersion $variant)) -}}
{{- end -}}

{{/* Settings --------------------------------------------------------------- */}}

{{/* Whole cores of a CPU quantity ("2", "1500m", 2.5), at least 1. */}}
{{- define "pleura.cores" -}}
{{- $q := toString . -}}
{{- if hasSuffix "m" $q -}}
{{- max 1 (div (int (trimSuffix "m" $q)) 1000) -}}
{{- else -}}
{{- max 1 (int (floor (float64 $q))) -}}
{{- end -}}
{{- end -}}

{{/* Inference threads: the explicit value, else the CPU limit, else the request. */}}
{{- define "pleura.inferenceThreads" -}}
{{- $w := .Values.worker -}}
{{- if gt (int $w.inferenceThreads) 0 -}}
{{- $w.inferenceThreads -}}
{{- else if and $w.resources $w.resources.limits $w.resources.limits.cpu -}}
{{- include "pleura.cores" $w.resources.limits.cpu -}}
{{- else if and $w.resources $w.resources.requests $w.resources.requests.cpu -}}
{{- include "pleura.cores" $w.resources.requests.cpu -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* The pod's grace: the worker's drain plus the margin, always the larger. */}}
{{- define "pleura.terminationGracePeriodSeconds" -}}
{{- add (int .Values.worker.shutdownGraceSeconds) (max 1 (int .Values.worker.terminationMarginSeconds)) -}}
{{- end -}}

{{- define "pleura.registryUrl" -}}
{{- if eq .Values.registry.type "s3" -}}
{{- .Values.registry.s3.url -}}
{{- else -}}
{{- printf "file://%s" .Values.registry.file.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "pleura.registryClaim" -}}
{{- default (printf "%s-registry" (include "pleura.fullname" .)) .Values.registry.file.existingClaim -}}
{{- end -}}

{{- define "pleura.trustedKeysDir" -}}/etc/pleura/trusted-keys{{- end -}}

{{- define "pleura.trustedKeys" -}}
{{- $dir := include "pleura.trustedKeysDir" . -}}
{{- $paths := list -}}
{{- range .Values.registry.trustedKeys.files -}}
{{- $paths = append $paths (printf "%s/%s" $dir .) -}}
{{- end -}}
{{- join "," $paths -}}
{{- end -}}

{{/* The scan queues of the fleet's namespace, as the worker declares them. */}}
{{- define "pleura.statQueue" -}}{{ .Values.pleura.namespace }}.scans.stat{{- end -}}
{{- define "pleura.routineQueue" -}}{{ .Values.pleura.namespace }}.scans.routine{{- end -}}
{{- define "pleura.deadQueue" -}}{{ .Values.pleura.namespace }}.dead{{- end -}}

{{/* Environment shared by the workers, the test hook and the trainer:
     connections from Secrets, registry access. */}}
{{- define "pleura.connectionEnv" -}}
- name: PLEURA_AMQP_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.pleura.amqp.existingSecret }}
      key: {{ .Values.pleura.amqp.urlKey }}
- name: PLEURA_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.pleura.redis.existingSecret }}
      key: {{ .Values.pleura.redis.urlKey }}
{{- range $svc := list "amqp" "redis" }}
{{- $tls := (index $.Values.pleura $svc).tls }}
{{- if $tls.existingSecret }}
- name: PLEURA_{{ upper $svc }}_TLS_CA_FILE
  value: /etc/pleura/tls/{{ $svc }}/ca.crt
{{- if $tls.clientCertificate }}
- name: PLEURA_{{ upper $svc }}_TLS_CERT_FILE
  value: /etc/pleura/tls/{{ $svc }}/tls.crt
- name: PLEURA_{{ upper $svc }}_TLS_KEY_FILE
  value: /etc/pleura/tls/{{ $svc }}/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.registry.type "s3") .Values.registry.s3.existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .Values.registry.s3.existingSecret }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.registry.s3.existingSecret }}
      key: AWS_SECRET_ACCESS_KEY
{{- end }}
{{- end -}}

{{/* Validation -------------------------------------------------------------- */}}

{{/* Collects every mistake, then fails once with all of them and their fixes. */}}
{{- define "pleura.validateValues" -}}
{{- $errors := list -}}
{{- if not .Values.pleura.amqp.existingSecret -}}
{{- $errors = append $errors "pleura.amqp.existingSecret is required: create a Secret with the AMQP URL, e.g.\n    kubectl create secret generic pleura-amqp --from-literal=amqp-url='amqp://user:pass@rabbitmq:5672/%2f'\n  and set pleura.amqp.existingSecret=pleura-amqp" -}}
{{- end -}}
{{- if not .Values.pleura.redis.existingSecret -}}
{{- $errors = append $errors "pleura.redis.existingSecret is required: create a Secret with the Redis URL, e.g.\n    kubectl create secret generic pleura-redis --from-literal=redis-url='redis://:pass@redis:6379/0'\n  and set pleura.redis.existingSecret=pleura-redis" -}}
{{- end -}}
{{- if and (not .Values.registry.allowUnsignedModels) (or (not .Values.registry.trustedKeys.existingSecret) (empty .Values.registry.trustedKeys.files)) -}}
{{- $errors = append $errors "workers refuse every unsigned model, so they need trusted keys: create a Secret from the .pub files of `pleura models keygen`, e.g.\n    kubectl create secret generic pleura-trusted-keys --from-file=ops.pub\n  and set registry.trustedKeys.existingSecret=pleura-trusted-keys and registry.trustedKeys.files={ops.pub}\n  (or registry.allowUnsignedModels=true, for development only)" -}}
{{- end -}}
{{- if and (eq .Values.registry.type "s3") (not (hasPrefix "s3://" .Values.registry.s3.url)) -}}
{{- $errors = append $errors "registry.type=s3 needs registry.s3.url=s3://bucket/prefix" -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled -}}
{{- $errors = append $errors "autoscaling.keda.enabled and autoscaling.hpa.enabled are both on: KEDA creates its own HPA; keep one of them" -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled (not .Values.autoscaling.keda.managementSecret) -}}
{{- $errors = append $errors "autoscaling.keda.managementSecret is required with KEDA: KEDA counts queued and in-flight scans through the RabbitMQ management API. Create it, e.g.\n    kubectl create secret generic pleura-rabbitmq-management --from-literal=host='http://user:pass@rabbitmq:15672/%2f'\n  and set autoscaling.keda.managementSecret=pleura-rabbitmq-management" -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled (not .Values.skipApiChecks) (not (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject")) -}}
{{- $errors = append $errors "autoscaling.keda.enabled=true, but this cluster has no keda.sh/v1alpha1 ScaledObject API: install KEDA (https://keda.sh/docs/deploy/) first, or scale on CPU with autoscaling.hpa.enabled=true instead" -}}
{{- end -}}
{{- if and .Values.autoscaling.keda.enabled (gt (int .Values.autoscaling.keda.minReplicaCount) (int .Values.autoscaling.keda.maxReplicaCount)) -}}
{{- $errors = append $errors "autoscaling.keda.minReplicaCount is above maxReplicaCount" -}}
{{- end -}}
{{- if and .Values.autoscaling.hpa.enabled (gt (int .Values.autoscaling.hpa.minReplicas) (int .Values.autoscaling.hpa.maxReplicas)) -}}
{{- $errors = append $errors "autoscaling.hpa.minReplicas is above maxReplicas" -}}
{{- end -}}
{{- if and .Values.autoscaling.hpa.enabled (not (and .Values.worker.resources .Values.worker.resources.requests .Values.worker.resources.requests.cpu)) -}}
{{- $errors = append $errors "autoscaling.hpa.enabled needs worker.resources.requests.cpu: utilisation is a share of the request" -}}
{{- end -}}
{{- if and (or .Values.metrics.serviceMonitor.enabled .Values.metrics.prometheusRule.enabled) (not .Values.skipApiChecks) (not (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}
{{- $errors = append $errors "metrics.serviceMonitor or metrics.prometheusRule is enabled, but this cluster has no monitoring.coreos.com/v1 API: install the Prometheus operator (kube-prometheus-stack) first, or turn them off" -}}
{{- end -}}
{{- if .Values.trainer.job.enabled -}}
{{- if not .Values.trainer.job.dataset.existingClaim -}}
{{- $errors = append $errors "trainer.job.enabled needs trainer.job.dataset.existingClaim: a claim holding effusion/ and nofinding/" -}}
{{- end -}}
{{- if and .Values.trainer.job.publish (not .Values.trainer.job.signingKeySecret) -}}
{{- $errors = append $errors "trainer.job.publish needs trainer.job.signingKeySecret: a Secret with the private key from `pleura models keygen`, e.g.\n    kubectl create secret generic pleura-signing-key --from-file=pleura.key\n  (workers refuse unsigned models)" -}}
{{- end -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\nPleura values cannot work:\n\n- %s\n" (join "\n\n- " $errors)) -}}
{{- end -}}
{{- end -}}

{{/* The TLS Secrets that `pleura.connectionEnv` points at: mounts and
     volumes, for every pod that includes it. */}}
{{- define "pleura.tlsVolumeMounts" -}}
{{- range $svc := list "amqp" "redis" }}
{{- if (index $.Values.pleura $svc).tls.existingSecret }}
- name: tls-{{ $svc }}
  mountPath: /etc/pleura/tls/{{ $svc }}
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{- define "pleura.tlsVolumes" -}}
{{- range $svc := list "amqp" "redis" }}
{{- if (index $.Values.pleura $svc).tls.existingSecret }}
- name: tls-{{ $svc }}
  secret:
    secretName: {{ (index $.Values.pleura $svc).tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end -}}
