"""Holds the rendered Kubernetes manifests against the code they deploy.

For every overlay given (the output of `kubectl kustomize`), fails on:
- an `APP__SECTION__KEY` or `APP_FILE__SECTION__KEY` variable that names no key of the
  service's settings (services/<service>/config/base.yaml, which holds every key);
- a container port the service does not listen on, or one it listens on but does not
  declare; a probe on a port the container does not declare;
- a Secret, ConfigMap or ServiceAccount a workload references that the overlay does not
  create (an ExternalSecret's target counts), a Service named in a service's URL that the
  environment does not create, a Service or autoscaler whose target matches nothing;
- an image without a version (no tag, or `latest`);
- a termination grace period that does not cover the drain delay plus the grace period
  (plus a preStop sleep), a Deployment that sets `replicas` under an autoscaler, an
  autoscaler minimum below the PodDisruptionBudget's `minAvailable` + 1.

  check_k8s.py RENDERED.yaml...        one file per overlay; overlays of one environment
                                       (file names sharing the part before the first '-')
                                       may name each other's Services
  check_k8s.py --self-test RENDERED.yaml   breaks a copy of the manifests in each way above
                                       and fails unless every break is caught
"""

import argparse
import copy
import pathlib
import re
import sys
from urllib.parse import urlsplit

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES = {"gateway": ROOT / "services/gateway", "data-service": ROOT / "services/data-service"}
# Variables that hold URLs, and whose host must be a Service of the environment.
URL_KEYS = ("upstreams.", "database.url", "cache.url", "rate_limit.redis_url")


def deep_merge(base, override):
    merged = dict(base)
    for key, value in (override or {}).items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def settings_of(service):
    config = SERVICES[service] / "config"
    base = yaml.safe_load((config / "base.yaml").read_text())
    return deep_merge(base, yaml.safe_load((config / "production.yaml").read_text()))


def lookup(tree, path):
    node = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None, False
        node = node[part]
    return node, True


def service_of(container):
    image = container.get("image", "")
    name = re.split(r"[:@]", image.rsplit("/", 1)[-1])[0]
    return name if name in SERVICES else None


def workloads(docs):
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def pod_labels(workload):
    return workload["spec"]["template"]["metadata"].get("labels", {})


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def environment_of(container, docs):
    """The container's variables: its ConfigMap-sourced ones, then its own `env`; secrets
    referenced from the environment stand as `None`."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps.get(source["configMapRef"]["name"], {}))
    for variable in container.get("env", []):
        env[variable["name"]] = variable.get("value")
    return env


def check_overlay(name, docs, environment_services):
    problems = []
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    secrets = by_kind.get("Secret", set()) | {
        d["spec"]["target"]["name"] for d in docs if d["kind"] == "ExternalSecret"
    }

    def problem(what):
        problems.append(f"{name}: {what}")

    for workload in workloads(docs):
        wname = f"{workload['kind']} {workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        account = pod.get("serviceAccountName")
        if account and account not in by_kind.get("ServiceAccount", set()):
            problem(f"{wname}: ServiceAccount {account} is not created here")
        for volume in pod.get("volumes", []):
            sources = [volume] + [s for s in volume.get("projected", {}).get("sources", [])]
            for source in sources:
                if "secret" in source:
                    secret = source["secret"].get("secretName") or source["secret"].get("name")
                    if secret not in secrets:
                        problem(f"{wname}: Secret {secret} is not created here")
                if "configMap" in source and source["configMap"]["name"] not in by_kind.get("ConfigMap", set()):
                    problem(f"{wname}: ConfigMap {source['configMap']['name']} is not created here")
        containers = pod.get("initContainers", []) + pod.get("containers", [])
        for container in containers:
            for source in container.get("envFrom", []):
                ref = source.get("configMapRef") or source.get("secretRef")
                kind = "ConfigMap" if "configMapRef" in source else "Secret"
                known = by_kind.get("ConfigMap", set()) if kind == "ConfigMap" else secrets
                if ref["name"] not in known:
                    problem(f"{wname}: {kind} {ref['name']} is not created here")
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {})
                if "secretKeyRef" in ref and ref["secretKeyRef"]["name"] not in secrets:
                    problem(f"{wname}: Secret {ref['secretKeyRef']['name']} is not created here")
                if "configMapKeyRef" in ref and ref["configMapKeyRef"]["name"] not in by_kind.get("ConfigMap", set()):
                    problem(f"{wname}: ConfigMap {ref['configMapKeyRef']['name']} is not created here")
        for container in containers:
            image = container.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if "@sha256:" not in image and tag in ("", "latest"):
                problem(f"{wname} container {container['name']}: image {image} names no version (set it in the overlay's images:)")
            service = service_of(container)
            if not service:
                continue
            cname = f"{wname} container {container['name']}"
            settings = copy.deepcopy(settings_of(service))
            env = environment_of(container, docs)
            for variable, value in env.items():
                prefix = "APP_FILE__" if variable.startswith("APP_FILE__") else "APP__" if variable.startswith("APP__") else None
                if not prefix:
                    continue
                path = variable[len(prefix):].lower().split("__")
                node, found = lookup(settings, path)
                if not found or isinstance(node, dict):
                    problem(f"{cname}: {variable} names no setting of the {service} ({'.'.join(path)})")
                    continue
                if prefix == "APP__" and value is not None:
                    parent, _ = lookup(settings, path[:-1])
                    parent[path[-1]] = value
                    key = ".".join(path)
                    if key.startswith(URL_KEYS):
                        for url in str(value).split(","):
                            host = urlsplit(url.strip()).hostname
                            if host and not re.fullmatch(r"[\d.]+|localhost", host):
                                short = host.split(".")[0]
                                if short not in environment_services:
                                    problem(f"{cname}: {variable} names host {host}, no Service of this environment")
            if container["name"] == "migrate" or container.get("args", [None])[0] == "migrate":
                continue
            listening = {int(settings["server"]["port"])}
            if "admin" in settings:
                listening.add(int(settings["admin"]["port"]))
            declared = {p["containerPort"]: p.get("name") for p in container.get("ports", [])}
            for port in sorted(set(declared) - listening):
                problem(f"{cname}: declares port {port}, which the {service} does not listen on ({sorted(listening)})")
            for port in sorted(listening - set(declared)):
                problem(f"{cname}: does not declare port {port}, which the {service} listens on")
            names = {v: k for k, v in declared.items() if v}
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = container.get(probe_name)
                if not probe:
                    problem(f"{cname}: no {probe_name}")
                    continue
                port = probe.get("httpGet", {}).get("port")
                number = names.get(port, port)
                if number not in declared:
                    problem(f"{cname}: {probe_name} on port {port}, which the container does not declare")
            drain = int(settings["shutdown"]["drain_delay_secs"])
            grace = int(settings["shutdown"]["grace_period_secs"])
            pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            termination = pod.get("terminationGracePeriodSeconds", 30)
            if termination <= drain + grace + pre_stop:
                problem(
                    f"{cname}: terminationGracePeriodSeconds {termination} does not exceed the drain delay {drain} s "
                    f"+ grace period {grace} s + preStop {pre_stop} s"
                )

    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        matched = [w for w in workloads(docs) if w["kind"] == target["kind"] and w["metadata"]["name"] == target["name"]]
        if not matched:
            problem(f"HorizontalPodAutoscaler {hpa['metadata']['name']}: no {target['kind']} {target['name']} here")
            continue
        workload = matched[0]
        if "replicas" in workload["spec"]:
            problem(f"{target['kind']} {target['name']}: sets replicas, which its autoscaler owns")
        for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
            if selects(pdb["spec"]["selector"].get("matchLabels"), pod_labels(workload)):
                minimum, available = hpa["spec"].get("minReplicas", 1), pdb["spec"].get("minAvailable")
                if isinstance(available, int) and minimum < available + 1:
                    problem(
                        f"HorizontalPodAutoscaler {hpa['metadata']['name']}: minReplicas {minimum} leaves no pod that "
                        f"may be disrupted (PodDisruptionBudget minAvailable {available})"
                    )
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"].get("selector")
        targets = [w for w in workloads(docs) if selects(selector, pod_labels(w))]
        if not targets:
            problem(f"Service {service['metadata']['name']}: selects no workload here")
            continue
        ports = {
            p.get("name")
            for w in targets
            for c in w["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        } | {p["containerPort"] for w in targets for c in w["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for port in service["spec"].get("ports", []):
            if port.get("targetPort", port["port"]) not in ports:
                problem(f"Service {service['metadata']['name']}: targetPort {port.get('targetPort')} is no container port")
    return problems


def load(path):
    return [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]


def check(files):
    overlays = {pathlib.Path(f).stem: load(f) for f in files}
    environments = {}
    for name, docs in overlays.items():
        environment = name.split("-")[0]
        environments.setdefault(environment, set()).update(
            d["metadata"]["name"] for d in docs if d["kind"] == "Service"
        )
    problems = []
    for name, docs in overlays.items():
        problems += check_overlay(name, docs, environments[name.split("-")[0]])
    return problems


def find(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def container(docs, workload, name):
    pod = find(docs, "Deployment", workload)["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def self_test(files):
    """Each break must be caught; the unbroken manifests must pass."""
    clean = check(files)
    if clean:
        return clean
    overlays = {pathlib.Path(f).stem: load(f) for f in files}
    target = next(name for name, docs in overlays.items() if any(d["kind"] == "Deployment" and d["metadata"]["name"] == "gateway" for d in docs))

    def misspelt(docs):
        settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("gateway-settings"))
        settings["data"]["APP__SHUTDOWN__DRAIN_DELAY_SEC"] = "5"

    def missing_secret(docs):
        volume = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["volumes"][0]
        volume["projected"]["sources"][0]["secret"]["name"] = "no-such-secret"

    def short_grace(docs):
        find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20

    def low_minimum(docs):
        find(docs, "HorizontalPodAutoscaler", "gateway")["spec"]["minReplicas"] = 1

    def wrong_port(docs):
        container(docs, "gateway", "gateway")["ports"][1]["containerPort"] = 9090

    def probe_port(docs):
        container(docs, "gateway", "gateway")["readinessProbe"]["httpGet"]["port"] = "metrics"

    def unknown_host(docs):
        settings = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("gateway-settings"))
        settings["data"]["APP__UPSTREAMS__DATA-SERVICE__URLS"] = "http://data-servce:8081"

    def replicas(docs):
        find(docs, "Deployment", "gateway")["spec"]["replicas"] = 3

    def unversioned(docs):
        container(docs, "gateway", "gateway")["image"] = "stackline/gateway:latest"

    failures = []
    for break_it in (
        misspelt, missing_secret, short_grace, low_minimum, wrong_port, probe_port, unknown_host, replicas, unversioned
    ):
        broken = copy.deepcopy(overlays)
        break_it(broken[target])
        environments = {}
        for name, docs in broken.items():
            environments.setdefault(name.split("-")[0], set()).update(
                d["metadata"]["name"] for d in docs if d["kind"] == "Service"
            )
        caught = check_overlay(target, broken[target], environments[target.split("-")[0]])
        if not caught:
            failures.append(f"self-test: {break_it.__name__} in {target} was not caught")
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--self-test", action="store_true")
    args = parser.parse_args()
    problems = self_test(args.files) if args.self_test else check(args.files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{'self-test passed' if args.self_test else 'manifests match the code'}: {len(args.files)} overlays")


if __name__ == "__main__":
    main()
