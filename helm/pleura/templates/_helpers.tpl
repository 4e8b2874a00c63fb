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

{{- define "pleura.trainerServiceName" -}}
{{- printf "%s-trainer" (include "pleura.fullname" .) | trunc 63 | trimSuffix "-" -}}
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

{{/* The trainer service's pods; not the trainer Job's (component: trainer). */}}
{{- define "pleura.trainerServiceSelectorLabels" -}}
{{ include "pleura.selectorLabels" . }}
app.kubernetes.io/component: trainer-service
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

{{/* The trainer image of the Job or the service: `<appVersion>-cuda` with a
     GPU, `<appVersion>-cpu` without, unless a tag or digest is given.
     Takes (dict "trainer" .Values.trainer.job|service "root" $). */}}
{{- define "pleura.trainerImageOf" -}}
{{- $variant := ternary "cuda" "cpu" (gt (int .trainer.gpu) 0) -}}
{{- include "pleura.imageRef" (dict "image" .trainer.image "defaultTag" (printf "%s-%s" .root.Chart.AppVersion $variant)) -}}
{{- end -}}

{{- define "pleura.trainerImage" -}}
{{- include "pleura.trainerImageOf" (dict "trainer" .Values.trainer.job "root" .) -}}
{{- end -}}

{{- define "pleura.trainerServiceImage" -}}
{{- include "pleura.trainerImageOf" (dict "trainer" .Values.trainer.service "root" .) -}}
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

{{/* The trainer service's runs store (`runs_url`) and its volume. */}}
{{- define "pleura.runsUrl" -}}
{{- $runs := .Values.trainer.service.runs -}}
{{- if eq $runs.type "s3" -}}
{{- $runs.s3.url -}}
{{- else -}}
{{- printf "file://%s" $runs.file.mountPath -}}
{{- end -}}
{{- end -}}

{{- define "pleura.runsClaim" -}}
{{- default (printf "%s-runs" (include "pleura.fullname" .)) .Values.trainer.service.runs.file.existingClaim -}}
{{- end -}}

{{/* The GPU resource a trainer asks for, added to its resources' limits.
     Takes (dict "resources" ... "gpu" N). */}}
{{- define "pleura.trainerResources" -}}
{{- $res := deepCopy (default (dict) .resources) -}}
{{- if gt (int .gpu) 0 -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpu) -}}
{{- $_ := set $res "limits" $limits -}}
{{- end -}}
{{- toYaml $res -}}
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
{{- if .Values.trainer.service.enabled -}}
{{- $s := .Values.trainer.service -}}
{{- if and (not $s.signingKeySecret) (not .Values.registry.allowUnsignedModels) -}}
{{- $errors = append $errors "trainer.service.enabled needs trainer.service.signingKeySecret: the trainer service publishes the runs submitted with --publish, and workers refuse unsigned models. Create a Secret with the private key from `pleura models keygen`, e.g.\n    kubectl create secret generic pleura-signing-key --from-file=pleura.key\n  and set trainer.service.signingKeySecret=pleura-signing-key" -}}
{{- end -}}
{{- if and (eq $s.runs.type "s3") (not (hasPrefix "s3://" $s.runs.s3.url)) -}}
{{- $errors = append $errors "trainer.service.runs.type=s3 needs trainer.service.runs.s3.url=s3://bucket/prefix" -}}
{{- end -}}
{{- /* A released run is resumed by whichever trainer claims it next, from
       the checkpoints in the runs store: with several trainers, a file
       store must be one volume they all mount. A created claim is judged by
       its accessModes; an existing one where the chart can read it (at
       install; offline rendering cannot, and trusts it). */ -}}
{{- if and (eq $s.runs.type "file") (gt (int $s.replicaCount) 1) -}}
{{- $modes := $s.runs.file.accessModes -}}
{{- $what := printf "the created claim's accessModes are %s" (toJson $modes) -}}
{{- with $s.runs.file.existingClaim -}}
{{- $modes = list "ReadWriteMany" -}}
{{- $pvc := lookup "v1" "PersistentVolumeClaim" $.Release.Namespace . -}}
{{- if $pvc -}}
{{- $modes = $pvc.spec.accessModes -}}
{{- $what = printf "claim %s is %s" . (toJson $modes) -}}
{{- end -}}
{{- end -}}
{{- if not (has "ReadWriteMany" $modes) -}}
{{- $errors = append $errors (printf "trainer.service.replicaCount=%d keeps runs on a file volume that is not ReadWriteMany (%s): a trainer that takes over a released run resumes from the checkpoints another one wrote, so every trainer must mount the same runs volume. Either\n    set trainer.service.runs.file.accessModes={ReadWriteMany} with a storage class that offers it (trainer.service.runs.file.storageClass: NFS, CephFS, EFS, Filestore, Azure Files), or trainer.service.runs.file.existingClaim=<a ReadWriteMany claim>,\n  or keep runs in S3: trainer.service.runs.type=s3 and trainer.service.runs.s3.url=s3://bucket/runs,\n  or run one trainer: trainer.service.replicaCount=1" (int $s.replicaCount) $what) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.registry.type "s3") (or $s.s3.region $s.s3.endpoint $s.s3.allowHttp $s.s3.existingSecret) -}}
{{- $errors = append $errors "trainer.service.s3 is set, but registry.type=s3: a trainer has one set of AWS_* variables, and with the registry in S3 they are registry.s3's, for the runs store and s3:// datasets too. Put region, endpoint and credentials in registry.s3 and leave trainer.service.s3 empty" -}}
{{- end -}}
{{- /* Kubernetes refuses a pod whose mounts share a path, but only at install. */ -}}
{{- $mounts := list "/tmp" "/dev/shm" $s.workDir.path "/etc/pleura/signing" (include "pleura.trustedKeysDir" .) "/etc/pleura/tls/amqp" "/etc/pleura/tls/redis" -}}
{{- if eq $s.runs.type "file" -}}{{- $mounts = append $mounts $s.runs.file.mountPath -}}{{- end -}}
{{- if $s.data.existingClaim -}}{{- $mounts = append $mounts $s.data.mountPath -}}{{- end -}}
{{- if eq .Values.registry.type "file" -}}{{- $mounts = append $mounts .Values.registry.file.mountPath -}}{{- end -}}
{{- $seen := list -}}
{{- range $mounts -}}
{{- $p := trimSuffix "/" . -}}
{{- if has $p $seen -}}
{{- $errors = append $errors (printf "the trainer service would mount two volumes at %s: give trainer.service.workDir.path, trainer.service.runs.file.mountPath, trainer.service.data.mountPath and registry.file.mountPath distinct paths (outside /tmp, /dev/shm and /etc/pleura)" $p) -}}
{{- end -}}
{{- $seen = append $seen $p -}}
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
