#!/usr/bin/env python3
"""Checks the Helm chart and the Dockerfiles for real, as `make test` runs them.

- `helm lint --strict` and `helm template` of every `helm/pleura/ci/*-values.yaml`
  and of the values file the README shows,
  under Helm 3 and Helm 4 (both from PyPI wheels, see scripts/tools.sh);
- `kubernetes-validate --strict` of every rendered built-in object, for the
  oldest and the newest Kubernetes the chart's kubeVersion claims;
- KEDA and Prometheus-operator objects against their models (cloudcoil),
  with unknown fields caught by a round trip;
- assertions on the rendered objects that would catch a broken chart;
- the trainer service (`pleura-trainer serve`): GPU defaults, the CPU-only
  and S3 variants, what each setting path points at is mounted;
- values that cannot work fail with a message that says what to do;
- `hadolint` on every Dockerfile, failing at warning level.

Usage: check-chart.py HELM3 HELM4. Prints one line per check and a closing
"N passed, M failed"; exits 1 on any failure.
"""

import json
import pathlib
import subprocess
import sys
import tempfile
import traceback

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "pleura"
CI = sorted((CHART / "ci").glob("*-values.yaml"))
BIN = pathlib.Path(sys.executable).parent
KUBE_VERSIONS = ["1.26.0", "1.37.0"]  # the oldest the chart claims (kubeVersion >=1.26), the newest schemas we have
API_VERSIONS = ["keda.sh/v1alpha1/ScaledObject", "monitoring.coreos.com/v1"]
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}

results = []


def check(name):
    def wrap(fn):
        def run(*args):
            label = name.format(*args)
            try:
                fn(*args)
                results.append((label, None))
                print(f"ok    {label}", flush=True)
            except Exception as e:  # noqa: BLE001 - every failure is reported
                results.append((label, e))
                print(f"FAIL  {label}: {e}", flush=True)
                if not isinstance(e, AssertionError):
                    traceback.print_exc()

        return run

    return wrap


def sh(*cmd, ok=True):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if ok and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def render(helm, values, *extra, kube="1.37.0"):
    args = [helm, "template", "rel", CHART, "--namespace", "imaging", "--kube-version", kube]
    for api in API_VERSIONS:
        args += ["--api-versions", api]
    if values:
        args += ["-f", values]
    p = sh(*args, *extra)
    return [d for d in yaml.safe_load_all(p.stdout) if d]


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


# --- lint and validation -----------------------------------------------------


@check("helm {0} lint --strict {2}")
def lint(tag, helm, values):
    sh(helm, "lint", "--strict", CHART, "-f", values, "--set", "skipApiChecks=true")


@check("helm {0} template {2}: strict schemas for Kubernetes {3} and {4}")
def validate(tag, helm, values, oldest, newest):
    for kube in (oldest, newest):
        docs = render(helm, values, kube=kube)
        builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump_all(builtin, f)
        p = sh(BIN / "kubernetes-validate", "--strict", "-k", kube, f.name, ok=False)
        pathlib.Path(f.name).unlink()
        assert p.returncode == 0, f"kubernetes {kube}:\n{p.stdout}{p.stderr}"
        assert "passed" in p.stdout + p.stderr, p.stdout + p.stderr


def strip_nulls(v):
    if isinstance(v, dict):
        return {k: strip_nulls(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [strip_nulls(x) for x in v]
    return v


@check("custom resources of {0} match their KEDA and Prometheus-operator models")
def custom_resources(values):
    from cloudcoil.models.keda import v1alpha1 as keda
    from cloudcoil.models.prometheus_operator import v1 as prom

    models = {
        "ScaledObject": keda.ScaledObject,
        "TriggerAuthentication": keda.TriggerAuthentication,
        "ServiceMonitor": prom.ServiceMonitor,
        "PrometheusRule": prom.PrometheusRule,
    }
    seen = 0
    for doc in render(HELM[0][1], values):
        model = models.get(doc["kind"])
        if not model:
            continue
        seen += 1
        parsed = model.model_validate(doc)
        back = strip_nulls(parsed.model_dump(by_alias=True, exclude_unset=True))
        assert back == doc, f"{doc['kind']} has fields its model does not know:\n{doc}\nvs\n{back}"
        if doc["kind"] == "ScaledObject":
            for t in doc["spec"]["triggers"]:
                # A trigger's metadata is a free map: its keys are ours to check.
                assert set(t["metadata"]) <= {"protocol", "mode", "queueName", "value", "activationValue", "vhostName"}, t
    assert seen, "no custom resource rendered"


# --- assertions on what is rendered -------------------------------------------


def component(docs, kind, name):
    found = [d for d in by_kind(docs, kind) if d["metadata"]["labels"].get("app.kubernetes.io/component") == name]
    assert len(found) == 1, f"expected one {kind} of the {name}, found {len(found)}"
    return found[0]


def worker_deployment(docs):
    return component(docs, "Deployment", "worker")


def worker_pod(docs):
    return worker_deployment(docs)["spec"]["template"]["spec"]


def trainer_deployment(docs):
    return component(docs, "Deployment", "trainer-service")


def config(docs):
    cms = [d for d in by_kind(docs, "ConfigMap") if "PLEURA_NAMESPACE" in d.get("data", {})]
    assert len(cms) == 1
    return cms[0]["data"]


@check("every pod of {0} runs as non-root, read-only, with no capabilities and no token")
def hardened(values):
    docs = render(HELM[0][1], values)
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    pods += [d["spec"] for d in by_kind(docs, "Pod")]
    assert pods
    for pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, sc
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", sc
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            csc = c["securityContext"]
            assert csc["readOnlyRootFilesystem"] is True, c["name"]
            assert csc["allowPrivilegeEscalation"] is False, c["name"]
            assert csc["capabilities"]["drop"] == ["ALL"], c["name"]


@check("{0}: the pod's grace outlasts the worker's drain, and settings roll the pods")
def grace(values):
    docs = render(HELM[0][1], values)
    pod = worker_pod(docs)
    drain = int(config(docs)["PLEURA_SHUTDOWN_GRACE_SECS"])
    assert pod["terminationGracePeriodSeconds"] > drain, (pod["terminationGracePeriodSeconds"], drain)
    ann = worker_deployment(docs)["spec"]["template"]["metadata"]["annotations"]
    assert len(ann["checksum/config"]) == 64
    # ...and another setting gives another checksum.
    other = render(HELM[0][1], values, "--set", "pleura.logLevel=debug")
    assert worker_deployment(other)["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != ann["checksum/config"]


@check("{0}: credentials come from Secrets, never from the ConfigMap")
def secrets(values):
    docs = render(HELM[0][1], values)
    data = config(docs)
    for k, v in data.items():
        assert "://" not in v or v.startswith(("file://", "s3://", "http://", "https://")), (k, v)
        assert "@" not in v, (k, v)
    env = env_of(worker_pod(docs)["containers"][0])
    for name in ("PLEURA_AMQP_URL", "PLEURA_REDIS_URL"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert "value" not in env["PLEURA_AMQP_URL"]


@check("KEDA: one http QueueLength trigger per scan queue of the namespace, no replicas")
def keda():
    docs = render(HELM[0][1], CHART / "ci" / "keda-values.yaml")
    ns = config(docs)["PLEURA_NAMESPACE"]
    assert "replicas" not in worker_deployment(docs)["spec"], "KEDA owns replicas"
    so = one(docs, "ScaledObject")
    queues = sorted(t["metadata"]["queueName"] for t in so["spec"]["triggers"])
    assert queues == sorted([f"{ns}.scans.stat", f"{ns}.scans.routine"]), queues
    auth = one(docs, "TriggerAuthentication")
    for t in so["spec"]["triggers"]:
        assert t["type"] == "rabbitmq"
        assert t["metadata"]["protocol"] == "http", "amqp would not count unacked scans"
        assert t["metadata"]["mode"] == "QueueLength"
        assert t["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert so["spec"]["scaleTargetRef"]["name"] == worker_deployment(docs)["metadata"]["name"]
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert auth["spec"]["secretTargetRef"][0]["parameter"] == "host"
    # Without KEDA, replicas are back.
    plain = render(HELM[0][1], CHART / "ci" / "minimal-values.yaml")
    assert worker_deployment(plain)["spec"]["replicas"] == 2
    assert not by_kind(plain, "ScaledObject")


@check("inference threads follow the CPU: explicit, the limit, else the request")
def threads():
    cases = {
        "minimal-values.yaml": ([], "2"),
        "hpa-values.yaml": ([], "3"),
        "keda-values.yaml": (["--set", "worker.resources.limits.cpu=null"], "1"),
    }
    for f, (extra, want) in cases.items():
        got = config(render(HELM[0][1], CHART / "ci" / f, *extra))["PLEURA_INFERENCE_THREADS"]
        assert got == want, (f, got, want)
    got = config(render(HELM[0][1], CHART / "ci" / "minimal-values.yaml", "--set", "worker.resources.limits.cpu=4500m"))
    assert got["PLEURA_INFERENCE_THREADS"] == "4", got


@check("HPA on CPU; s3 registry with credentials from a Secret; image by digest")
def hpa_s3_digest():
    hpa = render(HELM[0][1], CHART / "ci" / "hpa-values.yaml")
    h = one(hpa, "HorizontalPodAutoscaler")
    assert h["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "replicas" not in worker_deployment(hpa)["spec"]
    s3 = render(HELM[0][1], CHART / "ci" / "s3-values.yaml")
    data = config(s3)
    assert data["PLEURA_REGISTRY_URL"] == "s3://hospital-models/pleura"
    assert data["AWS_REGION"] == "eu-west-1"
    pod = worker_pod(s3)
    env = env_of(pod["containers"][0])
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "pleura-s3"
    assert not by_kind(s3, "PersistentVolumeClaim"), "no registry volume with s3"
    assert "@sha256:" in pod["containers"][0]["image"]


@check("trainer job: GPU limit, taint tolerated, exit 2 fails the Job, memory-backed /dev/shm")
def trainer():
    docs = render(HELM[0][1], CHART / "ci" / "trainer-gpu-values.yaml")
    job = one(docs, "Job")
    spec = job["spec"]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith("-cuda"), c["image"]
    assert "--publish" in c["args"] and "--device" in c["args"] and "cuda" in c["args"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    rule = spec["podFailurePolicy"]["rules"][0]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    for k in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        assert k in spec, k
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    env = env_of(c)
    assert env["PLEURA_SIGNING_KEY_FILE"]["value"].startswith("/etc/pleura/signing/")
    cpu = render(HELM[0][1], CHART / "ci" / "trainer-gpu-values.yaml", "--set", "trainer.job.gpu=0")
    cc = one(cpu, "Job")["spec"]["template"]["spec"]["containers"][0]
    assert cc["image"].endswith("-cpu") and "nvidia.com/gpu" not in cc["resources"].get("limits", {})


def mount_of(container, path):
    """The volume mount a path lies in (the deepest one), or None."""
    found = [
        m
        for m in container.get("volumeMounts", [])
        if path == m["mountPath"].rstrip("/") or path.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    return max(found, key=lambda m: len(m["mountPath"]), default=None)


def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())


TRAINER_SERVICE = CHART / "ci" / "trainer-service-values.yaml"


@check("trainer service: `serve` on the cuda image with a GPU, the taint tolerated, every path it uses mounted, its own selectors")
def trainer_service():
    docs = render(HELM[0][1], TRAINER_SERVICE)
    dep = trainer_deployment(docs)
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    [c] = pod["containers"]
    assert c["args"] == ["serve"], c["args"]
    assert c["image"] == f"ghcr.io/pleura/trainer:{APP_VERSION}-cuda", c["image"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, c["resources"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout must not need a spare GPU"
    assert pod["terminationGracePeriodSeconds"] == 60
    # Settings roll the trainers as they roll the workers.
    ann = spec["template"]["metadata"]["annotations"]["checksum/config"]
    assert ann == worker_deployment(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    # Its pods are its own: no other Deployment, Job or PDB takes them, and it takes no other pod.
    sel = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    assert matches(sel, labels)
    for d in by_kind(docs, "Deployment") + by_kind(docs, "PodDisruptionBudget"):
        if d["metadata"]["labels"]["app.kubernetes.io/component"] != "trainer-service":
            assert not matches(d["spec"]["selector"]["matchLabels"], labels), d["metadata"]["name"]
    assert not matches(sel, worker_deployment(docs)["spec"]["template"]["metadata"]["labels"])
    job = render(HELM[0][1], TRAINER_SERVICE, "--set", "trainer.job.enabled=true,trainer.job.dataset.existingClaim=nih-cxr,trainer.job.signingKeySecret=pleura-signing-key")
    assert not matches(sel, one(job, "Job")["spec"]["template"]["metadata"]["labels"]), "the trainer Job's pod is not a trainer-service pod"

    # The settings of the service's contract, and every path they name is mounted:
    # writable where it writes (the root is read-only), read-only where it only reads.
    env = env_of(c)
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), names
    val = {k: e.get("value") for k, e in env.items()}
    data = config(docs)
    assert val["PLEURA_RUNS_URL"] == "file:///var/lib/pleura/runs", val
    assert val["PLEURA_TRAINER_WORK_DIR"] == "/var/lib/pleura/trainer", val
    assert (val["PLEURA_TRAINER_LEASE_SECS"], val["PLEURA_TRAINER_MAX_ATTEMPTS"]) == ("30", "3"), val
    assert val["PLEURA_SIGNING_KEY_FILE"] == "/etc/pleura/signing/pleura.key", val
    assert "secretKeyRef" in env["PLEURA_AMQP_URL"]["valueFrom"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    paths = {
        val["PLEURA_RUNS_URL"].removeprefix("file://"): True,
        val["PLEURA_TRAINER_WORK_DIR"]: True,
        data["PLEURA_REGISTRY_URL"].removeprefix("file://"): True,  # it publishes
        "/tmp": True,
        "/dev/shm": True,
        val["PLEURA_SIGNING_KEY_FILE"]: False,
        "/data/cxr": False,
        **{k: False for k in data["PLEURA_TRUSTED_KEYS"].split(",")},
        **{v: False for k, v in val.items() if k.endswith("_FILE") and v},
    }
    for path, writable in paths.items():
        m = mount_of(c, path)
        assert m, f"{path} is not mounted"
        assert bool(m.get("readOnly")) != writable, (path, m)
    claims = {p["metadata"]["name"]: p for p in by_kind(docs, "PersistentVolumeClaim")}
    runs = volumes[mount_of(c, "/var/lib/pleura/runs")["name"]]
    claim = claims[runs["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"] == "nfs-client", claim
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert volumes[mount_of(c, "/var/lib/pleura/trainer")["name"]]["emptyDir"]["sizeLimit"] == "50Gi"
    assert volumes[mount_of(c, "/dev/shm")["name"]]["emptyDir"]["medium"] == "Memory"
    dataset = volumes[mount_of(c, "/data/cxr")["name"]]["persistentVolumeClaim"]
    assert dataset == {"claimName": "nih-cxr", "readOnly": True}, dataset
    assert volumes[mount_of(c, val["PLEURA_SIGNING_KEY_FILE"])["name"]]["secret"]["secretName"] == "pleura-signing-key"

    # Metrics: the port it listens on is the probes', the Service's and the ServiceMonitor's.
    port = int(val["PLEURA_HTTP_ADDR"].rsplit(":", 1)[1])
    [cport] = c["ports"]
    assert cport == {"name": "metrics", "containerPort": port, "protocol": "TCP"}, cport
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics", probe
    svc = component(docs, "Service", "trainer-service")
    assert svc["spec"]["selector"] == sel and svc["spec"]["ports"][0]["port"] == port
    sm = component(docs, "ServiceMonitor", "trainer-service")
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pdb = component(docs, "PodDisruptionBudget", "trainer-service")
    assert pdb["spec"]["selector"]["matchLabels"] == sel and pdb["spec"]["maxUnavailable"] == 1

    # Locked-down traffic: metrics in from monitoring; out to DNS, AMQP, Redis and object stores.
    np = component(docs, "NetworkPolicy", "trainer-service")
    assert np["spec"]["podSelector"]["matchLabels"] == sel
    assert {} not in np["spec"]["egress"]
    ports = {p["port"] for rule in np["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 5672, 6379, 443} <= ports, ports
    assert 15672 not in ports, "a trainer has no use for the management API"

    # Off by default: nothing of it in a plain install.
    plain = render(HELM[0][1], CHART / "ci" / "minimal-values.yaml")
    assert not [d for d in plain if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "trainer-service"]


@check("trainer service variants: CPU-only, runs and datasets in S3, the registry's S3, a per-pod work claim, an existing runs claim")
def trainer_service_variants():
    helm = HELM[0][1]

    def container(docs):
        return trainer_deployment(docs)["spec"]["template"]["spec"]["containers"][0]

    cpu = container(render(helm, TRAINER_SERVICE, "--set", "trainer.service.gpu=0"))
    assert cpu["image"] == f"ghcr.io/pleura/trainer:{APP_VERSION}-cpu", cpu["image"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {}), cpu["resources"]

    # Runs in S3: any number of trainers, whatever the access modes, and no runs volume.
    s3 = render(
        helm, TRAINER_SERVICE, "--set",
        "trainer.service.runs.type=s3,trainer.service.runs.s3.url=s3://hospital-runs/pleura,"
        "trainer.service.s3.region=eu-west-1,trainer.service.s3.existingSecret=pleura-s3,"
        "trainer.service.runs.file.accessModes={ReadWriteOnce},trainer.service.replicaCount=4",
    )
    c = container(s3)
    env = env_of(c)
    assert env["PLEURA_RUNS_URL"]["value"] == "s3://hospital-runs/pleura"
    assert env["AWS_REGION"]["value"] == "eu-west-1"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "pleura-s3"
    assert mount_of(c, "/var/lib/pleura/runs") is None
    assert "rel-pleura-runs" not in {p["metadata"]["name"] for p in by_kind(s3, "PersistentVolumeClaim")}
    assert "AWS_REGION" not in env_of(worker_pod(s3)["containers"][0]), "the trainer's S3 is its own"

    # With the registry in S3, the trainer uses its settings, once.
    reg = render(
        helm, CHART / "ci" / "s3-values.yaml", "--set",
        "trainer.service.enabled=true,trainer.service.signingKeySecret=pleura-signing-key,"
        "trainer.service.runs.type=s3,trainer.service.runs.s3.url=s3://hospital-models/runs",
    )
    c = container(reg)
    names = [e["name"] for e in c["env"]]
    assert names.count("AWS_SECRET_ACCESS_KEY") == 1 and "AWS_REGION" not in names, names
    assert config(reg)["AWS_REGION"] == "eu-west-1"
    assert mount_of(c, "/var/lib/pleura/registry") is None

    # A per-pod claim for the work dir, where node disks are small.
    eph = render(helm, TRAINER_SERVICE, "--set", "trainer.service.workDir.ephemeralClaim.enabled=true,trainer.service.workDir.ephemeralClaim.storageClass=fast-ssd")
    pod = trainer_deployment(eph)["spec"]["template"]["spec"]
    work = next(v for v in pod["volumes"] if v["name"] == mount_of(pod["containers"][0], "/var/lib/pleura/trainer")["name"])
    tmpl = work["ephemeral"]["volumeClaimTemplate"]["spec"]
    assert tmpl["storageClassName"] == "fast-ssd" and tmpl["resources"]["requests"]["storage"] == "100Gi", tmpl

    # An existing runs claim: used as is (offline rendering cannot read its access modes).
    ext = render(helm, TRAINER_SERVICE, "--set", "trainer.service.runs.file.existingClaim=pleura-runs-nfs")
    pod = trainer_deployment(ext)["spec"]["template"]["spec"]
    runs = next(v for v in pod["volumes"] if v["name"] == mount_of(pod["containers"][0], "/var/lib/pleura/runs")["name"])
    assert runs["persistentVolumeClaim"]["claimName"] == "pleura-runs-nfs"
    assert "rel-pleura-runs" not in {p["metadata"]["name"] for p in by_kind(ext, "PersistentVolumeClaim")}

    # NOTES say how to submit a run.
    notes = sh(dict(HELM)["v4"], "install", "rel", CHART, "--dry-run=client", "-f", TRAINER_SERVICE, "--set", "skipApiChecks=true").stdout
    assert "pleura train submit --data file:///data/DATASET" in notes and "--publish --wait" in notes, notes[-2000:]
    assert "pleura.train" in notes and "file:///var/lib/pleura/runs" in notes, notes[-2000:]


@check("network policy: metrics from monitoring only; egress to DNS, AMQP, management, Redis")
def network():
    docs = render(HELM[0][1], CHART / "ci" / "networkpolicy-values.yaml")
    np = one(docs, "NetworkPolicy")
    ingress = np["spec"]["ingress"]
    assert len(ingress) == 1 and ingress[0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert {} not in np["spec"]["egress"], "egress is not open"
    ports = {p["port"] for rule in np["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 5672, 15672, 6379} <= ports, ports
    assert 443 not in ports, "no registry egress for a file registry"
    open_ = render(HELM[0][1], CHART / "ci" / "networkpolicy-values.yaml", "--set", "networkPolicy.allowExternalEgress=true")
    assert {} in one(open_, "NetworkPolicy")["spec"]["egress"]


@check("TLS: each pod that names a CA or client certificate file mounts it from its Secret")
def tls():
    docs = render(HELM[0][1], CHART / "ci" / "networkpolicy-values.yaml")
    docs += render(HELM[0][1], CHART / "ci" / "trainer-gpu-values.yaml")
    docs += render(HELM[0][1], TRAINER_SERVICE)
    want = {
        "PLEURA_AMQP_TLS_CA_FILE": ("pleura-amqp-tls", "ca.crt"),
        "PLEURA_AMQP_TLS_CERT_FILE": ("pleura-amqp-tls", "tls.crt"),
        "PLEURA_AMQP_TLS_KEY_FILE": ("pleura-amqp-tls", "tls.key"),
        "PLEURA_REDIS_TLS_CA_FILE": ("pleura-redis-tls", "ca.crt"),
        "PLEURA_REDIS_TLS_CERT_FILE": ("pleura-redis-tls", "tls.crt"),
        "PLEURA_REDIS_TLS_KEY_FILE": ("pleura-redis-tls", "tls.key"),
    }
    seen = set()
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", spec) if doc["kind"] != "Pod" else spec
        for c in pod.get("containers", []) if isinstance(pod, dict) else []:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for name, (secret, key) in want.items():
                if name not in env:
                    continue
                seen.add((doc["kind"], name))
                seen.add((doc["metadata"]["labels"].get("app.kubernetes.io/component"), name))
                path = env[name]
                assert path.endswith("/" + key), (name, path)
                mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
                assert mount.get("readOnly"), mount
                assert volumes[mount["name"]]["secret"]["secretName"] == secret, volumes[mount["name"]]
    kinds = {k for k, _ in seen}
    assert {"Deployment", "Pod", "Job"} <= kinds, seen
    assert ("Deployment", "PLEURA_AMQP_TLS_KEY_FILE") in seen and ("Deployment", "PLEURA_REDIS_TLS_CA_FILE") in seen
    assert {("trainer-service", "PLEURA_REDIS_TLS_CA_FILE"), ("trainer-service", "PLEURA_REDIS_TLS_KEY_FILE")} <= seen, seen
    locked = env_of(worker_pod(render(HELM[0][1], CHART / "ci" / "networkpolicy-values.yaml"))["containers"][0])
    assert "PLEURA_REDIS_TLS_CA_FILE" in locked and "PLEURA_REDIS_TLS_KEY_FILE" not in locked, "no client certificate unless asked"
    plain = render(HELM[0][1], CHART / "ci" / "minimal-values.yaml")
    assert "PLEURA_AMQP_TLS_CA_FILE" not in str(plain)


@check("helm test hook runs `pleura fleet status --json --require-ready`; NOTES say how to check")
def test_hook():
    docs = render(HELM[0][1], CHART / "ci" / "minimal-values.yaml")
    pods = [d for d in by_kind(docs, "Pod") if d["metadata"]["annotations"].get("helm.sh/hook") == "test"]
    assert len(pods) == 1
    assert pods[0]["spec"]["containers"][0]["command"] == ["pleura", "fleet", "status", "--json", "--require-ready"]
    # Helm 4 renders NOTES offline; Helm 3 wants a cluster even for --dry-run=client.
    notes = sh(dict(HELM)["v4"], "install", "rel", CHART, "--dry-run=client", "-f", CHART / "ci" / "minimal-values.yaml").stdout
    assert "pleura fleet status" in notes and "helm test rel" in notes, notes[-2000:]


@check("{0}: values that cannot work fail with a message that says what to do")
def bad_values(tag):
    helm = dict(HELM)[tag]
    minimal = CHART / "ci" / "minimal-values.yaml"
    cases = [
        (["--set", "worker.replicaCount=-1"], "replicaCount"),
        (["--set", "worker.replicaKount=3"], "replicaKount"),
        (["--set", "pleura.logFormat=xml"], "logFormat"),
        (["--set", "autoscaling.keda.enabled=true"], "kubectl create secret generic pleura-rabbitmq-management"),
        (["--set", "autoscaling.keda.enabled=true,autoscaling.keda.managementSecret=m"], None),
        (["--set", "pleura.amqp.existingSecret="], "pleura.amqp.existingSecret is required"),
        (["--set", "registry.trustedKeys.files=null"], "trusted keys"),
        (["--set", "trainer.job.enabled=true"], "trainer.job.dataset.existingClaim"),
        (["--set", "trainer.service.enabled=true"], "kubectl create secret generic pleura-signing-key"),
        (["--set", "trainer.service.replicas=2"], "replicas"),
        (["--set", "trainer.service.gpu=-1"], "gpu"),
        (["--set", "trainer.service.runs.type=nfs"], "type"),
        (["-f", TRAINER_SERVICE, "--set", "trainer.service.runs.file.accessModes={ReadWriteOnce}"], "trainer.service.runs.s3.url=s3://bucket/runs"),
        (["-f", TRAINER_SERVICE, "--set", "trainer.service.runs.file.accessModes={ReadWriteOnce}"], "not ReadWriteMany"),
        (["-f", TRAINER_SERVICE, "--set", "trainer.service.runs.type=s3"], "trainer.service.runs.s3.url=s3://bucket/prefix"),
        (["-f", TRAINER_SERVICE, "--set", "trainer.service.data.mountPath=/var/lib/pleura/runs/"], "two volumes at /var/lib/pleura/runs"),
        (["-f", CHART / "ci" / "s3-values.yaml", "-f", TRAINER_SERVICE, "--set", "registry.type=s3,trainer.service.s3.region=eu-west-1"], "leave trainer.service.s3 empty"),
    ]
    for extra, needle in cases:
        args = [helm, "template", "rel", CHART, "-f", minimal, *extra]
        p = sh(*args, ok=False)
        if needle is None:
            # KEDA requested without its API in the cluster.
            assert p.returncode != 0 and "install KEDA" in p.stderr, p.stderr
            continue
        assert p.returncode != 0, f"{extra} rendered"
        assert needle in p.stderr, f"{extra}: {p.stderr}"


@check("hadolint --failure-threshold warning {0}")
def hadolint(dockerfile):
    sh(BIN / "hadolint", "--failure-threshold", "warning", dockerfile)


@check("yamllint of the chart's values, its CI values and the compose stack")
def yamllint():
    config = "{extends: default, rules: {line-length: {max: 200}, document-start: disable, comments: {min-spaces-from-content: 1}}}"
    sh(BIN / "yamllint", "-d", config, CHART / "values.yaml", *CI, CHART / "Chart.yaml", ROOT / "docker" / "compose.yaml")


@check("values.schema.json forbids unknown keys at every level; every value is documented, in values.yaml and the README")
def schema_is_strict():
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node, path):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} allows unknown keys"
            for k, v in node["properties"].items():
                walk(v, f"{path}.{k}")

    walk(schema, "values")
    text = (CHART / "values.yaml").read_text()
    params = {line.split()[2] for line in text.splitlines() if line.strip().startswith("## @param")}
    values = yaml.safe_load(text)

    def leaves(v, prefix=""):
        for k, x in v.items():
            p = f"{prefix}{k}"
            if isinstance(x, dict) and x and not any(p == q for q in params):
                yield from leaves(x, p + ".")
            else:
                yield p

    missing = [p for p in leaves(values) if p not in params]
    assert not missing, f"undocumented values: {missing}"
    readme = (CHART / "README.md").read_text()
    absent = [p for p in params if f"| `{p}` |" not in readme]
    assert not absent, f"values missing from the chart README's table: {absent}"


HELM = []
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def readme_values():
    """The values file the README shows operators, so that it cannot drift."""
    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    [block] = [b for b in blocks if b.startswith("# values-hospital.yaml")]
    path = pathlib.Path(tempfile.mkdtemp()) / "readme-values.yaml"
    path.write_text(block)
    return path


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    CI.append(readme_values())
    HELM.extend([("v3", sys.argv[1]), ("v4", sys.argv[2])])
    for tag, helm in HELM:
        version = sh(helm, "version", "--short").stdout.strip()
        assert version.startswith(tag), (tag, version)
        for values in CI:
            lint(tag, helm, values)
            validate(tag, helm, values, *KUBE_VERSIONS)
        bad_values(tag)
    custom_resources(CHART / "ci" / "keda-values.yaml")
    custom_resources(TRAINER_SERVICE)
    for values in CI:
        hardened(values)
        grace(values)
        secrets(values)
    keda()
    threads()
    hpa_s3_digest()
    trainer()
    trainer_service()
    trainer_service_variants()
    network()
    tls()
    test_hook()
    for dockerfile in sorted((ROOT / "docker").glob("*.Dockerfile")):
        hadolint(dockerfile)
    yamllint()
    schema_is_strict()
    failed = [r for r in results if r[1] is not None]
    print(f"chart: {len(results) - len(failed)} passed, {len(failed)} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
