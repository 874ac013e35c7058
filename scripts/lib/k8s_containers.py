"""Runs the containers of a rendered overlay (`kubectl kustomize k8s/overlays/dev`) under
podman, as the kubelet would: the same variables (from the ConfigMaps), the same Secret
files at the same paths with the same modes, the pod's user, a read-only root, no
capabilities, the binary as PID 1. Then every probe of every container must answer 200, a
request through the gateway must reach the data, and SIGTERM must end each container with 0
within its terminationGracePeriodSeconds.

Podman here has host networking only, so what cannot be the same is the addresses: the
cluster's names and ports (postgres:5432, redis:6379, data-service:8081, the containers' own
ports) are replaced by this check's own Postgres and Redis on spare ports and by spare ports
for the containers. Everything else is the manifests'.

  k8s_containers.py RENDERED.yaml --image stackline/gateway=localhost/stackline/gateway:ci ...
"""

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

from local_services import Postgres, Redis, free_port, tear_down, wait_until

urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
DEV_API_KEY = "stackline-dev-key"


def log(message):
    print(f"==> k8s containers: {message}", file=sys.stderr, flush=True)


def status(url, headers=None, data=None, method=None):
    request = urllib.request.Request(url, headers=headers or {}, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


class Overlay:
    def __init__(self, path):
        self.docs = [d for d in yaml.safe_load_all(open(path)) if d]

    def find(self, kind, name):
        """`name` as written, or as a kustomize generator named it (a hash of the content after it)."""
        for doc in self.docs:
            if doc["kind"] == kind and re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", doc["metadata"]["name"]):
                return doc
        raise SystemExit(f"the overlay has no {kind} {name}")

    def secret(self, name):
        data = self.find("Secret", name).get("data", {})
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    def configmap(self, name):
        return self.find("ConfigMap", name).get("data", {})


class Addresses:
    """The cluster's host:port pairs and what they become here."""

    def __init__(self):
        self.map = {}

    def add(self, host, port, local_port):
        self.map[(host, int(port))] = local_port

    def rewrite(self, text):
        def replace(match):
            host, port = match.group(1), int(match.group(2))
            local = self.map.get((host.split(".")[0], port))
            return f"127.0.0.1:{local}" if local else match.group(0)

        return re.sub(r"([A-Za-z0-9.-]+):(\d+)", replace, text)


class Pod:
    """One workload's pod: its containers run one after another (init containers first)."""

    def __init__(self, overlay, workload, images, addresses, work, ports):
        self.overlay, self.workload, self.images, self.addresses = overlay, workload, images, addresses
        self.spec = workload["spec"]["template"]["spec"]
        self.name = workload["metadata"]["name"]
        self.dir = os.path.join(work, self.name)
        self.ports = ports
        self.volumes = self.write_volumes()

    def write_volumes(self):
        """Each Secret volume as files, as the kubelet would project them."""
        mounts = {}
        group = self.spec.get("securityContext", {}).get("fsGroup")
        for volume in self.spec.get("volumes", []):
            directory = os.path.join(self.dir, volume["name"])
            os.makedirs(directory)
            if "projected" in volume:
                sources, mode = volume["projected"]["sources"], volume["projected"].get("defaultMode", 0o644)
            elif "secret" in volume:
                sources = [{"secret": {"name": volume["secret"]["secretName"], "items": volume["secret"].get("items")}}]
                mode = volume["secret"].get("defaultMode", 0o644)
            else:
                raise SystemExit(f"{self.name}: volume {volume['name']}: only Secret volumes are expected")
            for source in sources:
                values = self.overlay.secret(source["secret"]["name"])
                items = source["secret"].get("items") or [{"key": k, "path": k} for k in values]
                for item in items:
                    path = os.path.join(directory, item["path"])
                    with open(path, "w") as file:
                        file.write(self.addresses.rewrite(values[item["key"]]))
                    if group is not None and os.geteuid() == 0:
                        os.chown(path, 0, group)
                    os.chmod(path, mode if os.geteuid() == 0 else 0o444)
            os.chmod(directory, 0o755)
            mounts[volume["name"]] = directory
        return mounts

    def arguments(self, container, name):
        pod_security = self.spec.get("securityContext", {})
        security = {**pod_security, **container.get("securityContext", {})}
        args = ["--pull=never", "--network", "host", "--name", name]
        args += ["--user", f"{security['runAsUser']}:{security.get('runAsGroup', security['runAsUser'])}"]
        if security.get("readOnlyRootFilesystem"):
            args.append("--read-only")
        if "ALL" in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop", "ALL"]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt", "no-new-privileges"]
        environment = {}
        for source in container.get("envFrom", []):
            environment.update(self.overlay.configmap(source["configMapRef"]["name"]))
        for variable in container.get("env", []):
            environment[variable["name"]] = variable["value"]
        environment.update(self.ports)
        for key, value in environment.items():
            args += ["-e", f"{key}={self.addresses.rewrite(value)}"]
        for mount in container.get("volumeMounts", []):
            args += ["-v", f"{self.volumes[mount['name']]}:{mount['mountPath']}:ro"]
        image = container["image"]
        local = self.images.get(image.split(":")[0].split("@")[0])
        if not local:
            raise SystemExit(f"{self.name}: no local image given for {image}")
        return args + [local] + container.get("args", [])

    def run_init_containers(self):
        for container in self.spec.get("initContainers", []):
            name = f"k8s-{self.name}-{container['name']}-{os.getpid()}"
            log(f"{self.name}: init container {container['name']}")
            result = subprocess.run(["podman", "run", "--rm", *self.arguments(container, name)], capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"{self.name}: init container {container['name']} exited {result.returncode}:\n{result.stderr[-2000:]}")

    def start(self):
        self.names = []
        for container in self.spec["containers"]:
            name = f"k8s-{self.name}-{container['name']}-{os.getpid()}"
            subprocess.run(["podman", "run", "-d", *self.arguments(container, name)], check=True, capture_output=True)
            self.names.append(name)

    def probe_urls(self):
        urls = []
        for container in self.spec["containers"]:
            named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = container[probe]["httpGet"]
                port = named.get(get["port"], get["port"])
                local = self.addresses.map[(self.name, int(port))]
                urls.append((probe, f"http://127.0.0.1:{local}{get['path']}"))
        return urls

    def stop(self):
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        for name in self.names:
            started = time.monotonic()
            subprocess.run(["podman", "stop", "-t", str(grace), name], capture_output=True)
            code = subprocess.run(["podman", "inspect", "--format", "{{.State.ExitCode}}", name], capture_output=True, text=True).stdout.strip()
            took = time.monotonic() - started
            if code != "0":
                logs = subprocess.run(["podman", "logs", "--tail", "20", name], capture_output=True, text=True)
                raise SystemExit(f"{name}: exited {code} on SIGTERM\n{logs.stdout}{logs.stderr}")
            log(f"{self.name}: exited 0 on SIGTERM after {took:.1f} s (grace {grace} s)")

    def remove(self):
        for name in getattr(self, "names", []):
            subprocess.run(["podman", "rm", "-f", "-t", "0", name], capture_output=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rendered")
    parser.add_argument("--image", action="append", default=[], help="NAME=LOCAL image to run for NAME")
    args = parser.parse_args()
    images = dict(pair.split("=", 1) for pair in args.image)
    overlay = Overlay(args.rendered)
    work = tempfile.mkdtemp(prefix="stackline-k8s-")
    os.chmod(work, 0o755)
    postgres = Postgres(work, host_auth="scram-sha-256")
    redis = Redis(work)
    pods = []
    try:
        postgres.start()
        redis.start()
        database = overlay.secret("data-service-database")
        match = re.match(r"postgres://([^@:/]+)@([^:/]+):(\d+)/(\w+)", database["url"])
        user, host, port, name = match.groups()
        postgres.sql(f"CREATE ROLE {user} LOGIN PASSWORD '{database['password']}'")
        postgres.sql(f"CREATE DATABASE {name} OWNER {user}")
        addresses = Addresses()
        addresses.add(host, port, postgres.port)
        for url in (overlay.secret("data-service-cache")["url"], overlay.secret("gateway-redis")["url"]):
            redis_host, redis_port = re.match(r"redis://([^:/]+):(\d+)", url).groups()
            addresses.add(redis_host, redis_port, redis.port)
        # The containers' own ports: spare ones here, for each setting that names one.
        ds_port, gw_port, admin_port = free_port(), free_port(), free_port()
        addresses.add("data-service", 8081, ds_port)
        addresses.add("gateway", 8080, gw_port)
        addresses.add("gateway", 9080, admin_port)
        plan = [
            ("data-service", {"APP__SERVER__PORT": str(ds_port)}),
            ("gateway", {"APP__SERVER__PORT": str(gw_port), "APP__ADMIN__PORT": str(admin_port)}),
        ]
        for name, ports in plan:
            pod = Pod(overlay, overlay.find("Deployment", name), images, addresses, work, ports)
            pods.append(pod)
            pod.run_init_containers()
            pod.start()
            for probe, url in pod.probe_urls():
                wait_until(f"{name} {probe} {url}", lambda url=url: status(url) == 200, timeout=30)
                log(f"{name}: {probe} answers 200 ({url.split('/', 3)[-1]})")
        headers = {"Authorization": f"Bearer {DEV_API_KEY}", "Content-Type": "application/json"}
        created = status(f"http://127.0.0.1:{gw_port}/api/v1/items", headers, json.dumps({"name": "k8s check"}).encode(), "POST")
        listed = status(f"http://127.0.0.1:{gw_port}/api/v1/items", headers)
        if (created, listed) != (201, 200):
            raise SystemExit(f"through the gateway: POST {created}, GET {listed} (expected 201, 200)")
        log("through the gateway: POST 201, GET 200")
        for pod in reversed(pods):
            pod.stop()
        log("the manifests' configuration starts the real services")
    finally:
        for pod in pods:
            pod.remove()
        tear_down(postgres, redis, work)


if __name__ == "__main__":
    main()
