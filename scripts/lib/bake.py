"""Reads docker-bake.hcl as `docker buildx bake` does (targets, `inherits`, variables with
their defaults or the environment's values) for the builders that cannot read it themselves.

  bake.py podman-args TARGET      the `podman build` arguments that build TARGET
  bake.py check-compose FILE      fails unless every service FILE builds is built as its
                                  bake target is (Dockerfile, context, build arguments)
"""

import os
import pathlib
import re
import sys

import hcl2
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]


def unquote(value):
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def load(path=ROOT / "docker-bake.hcl"):
    with open(path) as file:
        parsed = hcl2.load(file)
    variables = {}
    for block in parsed.get("variable", []):
        for name, body in block.items():
            name = unquote(name)
            variables[name] = os.environ.get(name, unquote(body.get("default", "")))
    targets = {}
    for block in parsed.get("target", []):
        for name, body in block.items():
            targets[unquote(name)] = {k: v for k, v in body.items() if k != "__is_block__"}

    def interpolate(value):
        if isinstance(value, list):
            return [interpolate(v) for v in value]
        if isinstance(value, dict):
            return {unquote(k): interpolate(v) for k, v in value.items()}
        if not isinstance(value, str):
            return value
        if value in variables:  # a bare reference
            return variables[value]
        return re.sub(r"\$\{(\w+)\}", lambda m: variables[m.group(1)], unquote(value))

    def resolve(name, seen=()):
        if name in seen:
            raise SystemExit(f"docker-bake.hcl: target {name} inherits itself")
        body = targets[name]
        merged = {}
        for parent in interpolate(body.get("inherits", [])):
            for key, value in resolve(parent, seen + (name,)).items():
                merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        for key, value in interpolate(body).items():
            if key == "inherits":
                continue
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
        return merged

    return {name: resolve(name) for name in targets if not name.startswith("_")}


def podman_args(target):
    spec = load()[target]
    args = ["-f", spec["dockerfile"]]
    for key, value in sorted(spec.get("args", {}).items()):
        args += ["--build-arg", f"{key}={value}"]
    return args + [spec.get("context", ".")]


def check_compose(path):
    targets = load()
    compose = yaml.safe_load(pathlib.Path(path).read_text())
    base = pathlib.Path(path).resolve().parent
    problems = []
    for name, service in compose.get("services", {}).items():
        build = service.get("build")
        if not build:
            continue
        args = {k: str(v) for k, v in build.get("args", {}).items()}
        target = targets.get(args.get("SERVICE", ""))
        if target is None:
            problems.append(f"{name}: builds SERVICE={args.get('SERVICE')}, which no bake target builds")
            continue
        context = (base / build.get("context", ".")).resolve()
        if context != (ROOT / target.get("context", ".")).resolve():
            problems.append(f"{name}: context {context} is not the bake target's")
        if (context / build.get("dockerfile", "Dockerfile")).resolve() != (ROOT / target["dockerfile"]).resolve():
            problems.append(f"{name}: Dockerfile {build.get('dockerfile')} is not the bake target's")
        if set(args) != set(target.get("args", {})):
            problems.append(f"{name}: build arguments {sorted(args)} differ from the bake target's {sorted(target['args'])}")
        for key in ("SERVICE", "PORTS"):
            if args.get(key) != target["args"].get(key):
                problems.append(f"{name}: {key}={args.get(key)!r}, the bake target says {target['args'].get(key)!r}")
    if problems:
        sys.exit("compose builds differently from docker-bake.hcl:\n  " + "\n  ".join(problems))
    print(f"{path} builds every image as docker-bake.hcl does")


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("podman-args", "check-compose"):
        sys.exit(__doc__)
    if sys.argv[1] == "podman-args":
        print("\n".join(podman_args(sys.argv[2])))
    else:
        check_compose(sys.argv[2])


if __name__ == "__main__":
    main()
