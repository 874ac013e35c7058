"""Holds the GitHub workflows to the rules that keep them what CI runs here, and locked down:

- every `run:` line calls a script of scripts/ that exists and is executable (the same
  scripts .ci/run calls), so what GitHub runs and what is tested here cannot drift apart;
- every action is pinned by a full commit SHA, with its version in a comment;
- every job has a timeout and its own `permissions`; every checkout keeps no credentials;
- no `pull_request_target` trigger.

  check_workflows.py WORKFLOW.yml...
"""

import pathlib
import re
import shlex
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
PINNED = re.compile(r"^\s*-?\s*uses:\s*[\w.-]+/[\w./-]+@[0-9a-f]{40}\s+#\s*v\d+(\.\d+)*\s*$")


def triggers(workflow):
    # YAML 1.1 reads the key `on` as True.
    on = workflow.get("on", workflow.get(True, {}))
    return set(on) if isinstance(on, (dict, list)) else {on}


def check(path):
    text = path.read_text()
    workflow = yaml.safe_load(text)
    problems = []

    def problem(what):
        problems.append(f"{path.relative_to(ROOT)}: {what}")

    if "pull_request_target" in triggers(workflow):
        problem("pull_request_target runs untrusted code with the repository's secrets")
    for number, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*-?\s*uses:", line) and not line.strip().startswith("uses: ./") and not PINNED.match(line):
            problem(f"line {number}: an action not pinned by commit SHA with its version in a comment: {line.strip()}")
    for name, job in workflow.get("jobs", {}).items():
        if "timeout-minutes" not in job:
            problem(f"job {name}: no timeout-minutes")
        if "permissions" not in job:
            problem(f"job {name}: no permissions of its own")
        for step in job.get("steps", []):
            label = step.get("name", step.get("uses", "a step"))
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                if step.get("with", {}).get("persist-credentials") is not False:
                    problem(f"job {name}, {label}: checkout without persist-credentials: false")
            for line in str(step.get("run", "")).splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                command = shlex.split(line)[0]
                script = ROOT / command
                if not command.startswith("scripts/") or not script.is_file() or not script.stat().st_mode & 0o111:
                    problem(f"job {name}, {label}: `{line}` is not a script of scripts/ (so CI here would not run it)")
    return problems


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    problems = [p for path in sys.argv[1:] for p in check(pathlib.Path(path).resolve())]
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"{len(sys.argv) - 1} workflows: every run: is a script, every action pinned, every job bounded")


if __name__ == "__main__":
    main()
