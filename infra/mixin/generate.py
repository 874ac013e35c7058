"""Generates, from the few files that are the source of Stackline's monitoring:

- infra/prometheus/rules/slo-<service>.yml, from infra/slo/<service>.yaml (slo.py);
- infra/grafana/dashboards/stackline-{slo,gateway,data-service}.json (dashboards.py);
- k8s/components/monitoring, from every rule file and dashboard of infra/ (k8s.py).

The overview dashboard and infra/prometheus/rules/stackline.yml (the alerts that are not
about an SLO) are written by hand. With --check nothing is written, and the exit status
says whether the committed files are what this would write.

  generate.py [--check]
"""

import argparse
import difflib
import json
import pathlib
import sys

import dashboards
import k8s
import slo

ROOT = pathlib.Path(__file__).resolve().parents[2]
RULES = ROOT / "infra/prometheus/rules"
DASHBOARDS = ROOT / "infra/grafana/dashboards"
GENERATED_DASHBOARDS = ("stackline-slo.json", "stackline-gateway.json", "stackline-data-service.json")


def expected():
    services = slo.load(ROOT / "infra/slo")
    generated_rules = {RULES / f"slo-{s['service']}.yml": slo.rules(s) for s in services}
    boards = {
        "stackline-slo.json": dashboards.slo_dashboard(services),
        "stackline-gateway.json": dashboards.gateway_dashboard(),
        "stackline-data-service.json": dashboards.data_service_dashboard(),
    }
    generated_dashboards = {DASHBOARDS / name: json.dumps(board, indent=2) + "\n" for name, board in boards.items()}
    by_hand_rules = {p: p.read_text() for p in RULES.glob("*.yml") if not p.name.startswith("slo-")}
    by_hand_dashboards = {p: p.read_text() for p in DASHBOARDS.glob("*.json") if p.name not in GENERATED_DASHBOARDS}
    rules = {**by_hand_rules, **generated_rules}
    all_dashboards = {**by_hand_dashboards, **generated_dashboards}
    return {**generated_rules, **generated_dashboards, **k8s.files(rules, all_dashboards)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only say whether the files are up to date")
    args = parser.parse_args()
    files = expected()
    generated_dirs = [k8s.COMPONENT / "rules", k8s.COMPONENT / "dashboards"]
    stale = [p for d in generated_dirs if d.exists() for p in d.iterdir() if p not in files]
    stale += [p for p in RULES.glob("slo-*.yml") if p not in files]
    if args.check:
        problems = []
        for path, text in files.items():
            current = path.read_text() if path.exists() else ""
            if current != text:
                diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(path.relative_to(ROOT)), "generated", lineterm="", n=1)
                problems.append("\n".join(list(diff)[:20]))
        problems += [f"{p.relative_to(ROOT)}: no longer generated" for p in stale]
        if problems:
            print("generated monitoring files are out of date; run scripts/generate-monitoring:", file=sys.stderr)
            print("\n".join(problems), file=sys.stderr)
            sys.exit(1)
        print(f"generated monitoring files are up to date ({len(files)} files)")
        return
    for path in stale:
        path.unlink()
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(files)} files")


if __name__ == "__main__":
    main()
