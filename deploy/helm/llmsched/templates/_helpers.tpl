{{/* Names and labels (Helm conventions). */}}
{{- define "llmsched.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmsched.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llmsched.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmsched.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llmsched.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llmsched.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llmsched.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "llmsched.authSecretName" -}}
{{- default (printf "%s-auth" (include "llmsched.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The Ray custom resource naming a GPU type; must match scheduler.control.placement.gpu_type_resource. */}}
{{- define "llmsched.gpuResource" -}}
{{- printf "llmsched_gpu_%s" (regexReplaceAll "[^A-Za-z0-9_]" . "_") }}
{{- end }}

{{/* How much of that resource one worker of a GPU type advertises. */}}
{{- define "llmsched.gpuSlots" -}}
{{- if gt (int .gpusPerNode) 0 }}{{ int .gpusPerNode }}{{ else }}{{ int .slots }}{{ end }}
{{- end }}

{{/*
The live RayCluster's worker groups by name, as JSON: {} on install, under `helm template` and a client-side
--dry-run (lookup is empty there), and for a RayCluster without groups.
*/}}
{{- define "llmsched.liveWorkerGroups" -}}
{{- $rc := lookup "ray.io/v1" "RayCluster" .Release.Namespace (include "llmsched.fullname" .) | default dict }}
{{- $groups := dict }}
{{- range (dig "spec" "workerGroupSpecs" list $rc) }}
{{- $_ := set $groups .groupName . }}
{{- end }}
{{- toJson $groups }}
{{- end }}

{{/*
The replicas a worker group renders with; called with (dict "group" <a gpuTypes entry> "live" <liveWorkerGroups>).
The Controller sizes the groups by patching the live RayCluster (scheduler/deploy/k8s.py), and `helm upgrade`
replaces workerGroupSpecs whole (a list): rendering values.replicas would shrink a grown group, and KubeRay would
delete workers, possibly ones hosting instances. So the live group's replicas win, clamped to the new
[minReplicas, maxReplicas]; values.replicas is the size at install and of a group the live cluster lacks.
*/}}
{{- define "llmsched.workerReplicas" -}}
{{- $g := .group }}
{{- $live := get .live $g.name | default dict }}
{{- if hasKey $live "replicas" }}
{{- min (max (int $live.replicas) (int (default 0 $g.minReplicas))) (int $g.maxReplicas) }}
{{- else }}
{{- include "llmsched.valuesReplicas" $g }}
{{- end }}
{{- end }}

{{/* A gpuTypes entry's replicas as values give them (minReplicas when unset). */}}
{{- define "llmsched.valuesReplicas" -}}
{{- int (default (default 0 .minReplicas) .replicas) }}
{{- end }}

{{/*
Cross-field checks a JSON schema cannot express. They fail `helm lint/template/install` with a message naming
the key and the allowed values, like the project's own config errors.
*/}}
{{- define "llmsched.validate" -}}
{{- $types := dict }}
{{- range $i, $g := .Values.gpuTypes }}
{{- if hasKey $types $g.name }}
{{- fail (printf "gpuTypes[%d].name: duplicate GPU type %q" $i $g.name) }}
{{- end }}
{{- $_ := set $types $g.name $g }}
{{- range $k := list "resources" "num-gpus" }}
{{- if hasKey (default dict $g.rayStartParams) $k }}
{{- fail (printf "gpuTypes[%d].rayStartParams.%s: set by the chart (from gpusPerNode/slots); a second key renders a duplicate YAML key" $i $k) }}
{{- end }}
{{- end }}
{{- $min := int (default 0 $g.minReplicas) }}
{{- $max := int $g.maxReplicas }}
{{- $rep := include "llmsched.valuesReplicas" $g | int }}
{{- if or (gt $min $max) (lt $rep $min) (gt $rep $max) }}
{{- fail (printf "gpuTypes[%d] (%s): need minReplicas <= replicas <= maxReplicas, got %d <= %d <= %d" $i $g.name $min $rep $max) }}
{{- end }}
{{- end }}
{{- range $k := list "dashboard-host" "num-gpus" }}
{{- if hasKey (default dict $.Values.ray.head.rayStartParams) $k }}
{{- fail (printf "ray.head.rayStartParams.%s: set by the chart; a second key renders a duplicate YAML key" $k) }}
{{- end }}
{{- end }}
{{- $allowed := keys $types | sortAlpha | join ", " }}
{{- range $i, $p := .Values.config.pools }}
{{- if not (hasKey $types $p.gpu) }}
{{- /* NOTE: `helm lint` does not stop at fail, hence else rather than falling through. */}}
{{- fail (printf "config.pools[%d].gpu: unknown GPU type %q; allowed: %s (gpuTypes[].name)" $i $p.gpu $allowed) }}
{{- else }}
{{- $g := get $types $p.gpu }}
{{- $tp := int (default 1 $p.tp) }}
{{- if and (gt (int $g.gpusPerNode) 0) (gt $tp (int $g.gpusPerNode)) }}
{{- fail (printf "config.pools[%d].tp: %d exceeds gpuTypes %s gpusPerNode %d (an instance must fit one node)" $i $tp $p.gpu (int $g.gpusPerNode)) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* Helm merges config.model over the defaults (the tiny test model's name and shape): a path given alone would
       serve those weights under the tiny model's shape, and a repo id not yet in the HF cache is not checked
       before its engine downloads it. The name marks the defaults. */}}
{{- if and .Values.config.model.path (eq (toString .Values.config.model.name) "tiny-llama") }}
{{- fail (printf "config.model.path: %q, but config.model is still the chart default's tiny test model (name tiny-llama, its 2-layer shape); give that model's name and shape fields too (values/single-gpu-type.yaml)" .Values.config.model.path) }}
{{- end }}
{{- /* The head pod's containers share one network namespace: a metrics port another listener holds makes
       `llmsched serve` fail to bind at start-up. */}}
{{- $taken := dict "6379" "Ray GCS" "8265" "the Ray dashboard" "10001" "the Ray client server" "8080" "Ray's metrics export (KubeRay's default)" "52365" "the Ray dashboard agent" "50051" "llmsched gRPC" "8000" "llmsched HTTP" }}
{{- $mport := toString (int .Values.metrics.port) }}
{{- if hasKey $taken $mport }}
{{- fail (printf "metrics.port: %s is already used in the head pod by %s; pick another port" $mport (get $taken $mport)) }}
{{- end }}
{{- if and .Values.workerDrain.enabled .Values.tls.enabled .Values.tls.clientCASecretName }}
{{- fail "workerDrain.enabled: the workers' preStop drain has no client certificate for mTLS (tls.clientCASecretName); set workerDrain.enabled=false" }}
{{- end }}
{{- with .Values.weights.volume }}
{{- if and .existingClaim .hostPath }}
{{- fail "weights.volume: set existingClaim or hostPath, not both" }}
{{- end }}
{{- $mount := trimSuffix "/" .mountPath }}
{{- range $taken := list "/dev/shm" "/tmp/ray" "/etc/llmsched" }}
{{- if or (eq $mount $taken) (hasPrefix (printf "%s/" $taken) $mount) (hasPrefix (printf "%s/" $mount) $taken) }}
{{- fail (printf "weights.volume.mountPath: %s overlaps the chart's own mount %s; pick another path" $.Values.weights.volume.mountPath $taken) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.auth.clientToken .Values.auth.adminToken (eq .Values.auth.clientToken .Values.auth.adminToken) }}
{{- fail "auth.adminToken: must differ from auth.clientToken (the admin API needs a distinct credential)" }}
{{- end }}
{{- end }}

{{/*
The ClusterConfig the scheduler loads: values.config plus gpus rendered from gpuTypes. gpus_per_node lets the
config check that the pools pack onto maxReplicas workers (an instance never spans nodes), not only that their
GPUs add up.
*/}}
{{- define "llmsched.config" -}}
{{- $gpus := dict }}
{{- range .Values.gpuTypes }}
{{- $slots := include "llmsched.gpuSlots" . | int }}
{{- $_ := set $gpus .name (merge (dict "name" .name "count" (mul $slots (int .maxReplicas)) "gpus_per_node" $slots) (deepCopy .spec)) }}
{{- end }}
{{- $cfg := deepCopy .Values.config }}
{{- $_ := set $cfg "gpus" $gpus }}
{{- toYaml $cfg }}
{{- end }}

{{- define "llmsched.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llmsched.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Model weights (values.weights): what every engine (workers) and the ingress tokenizer (the llmsched container)
need to load config.model.path -- HF_HOME, HF_TOKEN from an existing Secret, and the weights volume.
*/}}
{{- define "llmsched.weightsEnv" -}}
{{- with .Values.weights }}
{{- if .hfHome }}
- {name: HF_HOME, value: {{ .hfHome | quote }}}
{{- end }}
{{- if .hfTokenSecret.name }}
- name: HF_TOKEN
  valueFrom: {secretKeyRef: {name: {{ .hfTokenSecret.name | quote }}, key: {{ .hfTokenSecret.key | default "HF_TOKEN" | quote }}}}
{{- end }}
{{- end }}
{{- end }}

{{- define "llmsched.weightsMount" -}}
{{- with .Values.weights.volume }}
{{- if or .existingClaim .hostPath }}
- {name: weights, mountPath: {{ .mountPath | quote }}, readOnly: {{ .readOnly }}}
{{- end }}
{{- end }}
{{- end }}

{{- define "llmsched.weightsVolume" -}}
{{- with .Values.weights.volume }}
{{- if .existingClaim }}
- name: weights
  persistentVolumeClaim: {claimName: {{ .existingClaim | quote }}, readOnly: {{ .readOnly }}}
{{- else if .hostPath }}
- name: weights
  hostPath: {path: {{ .hostPath | quote }}, type: DirectoryOrCreate}
{{- end }}
{{- end }}
{{- end }}
