#!/usr/bin/env python3
"""Lints Grafana dashboards and Prometheus rules against what the services really expose.

Dashboards: a `datasource` variable and `job`/`instance` variables; `timeseries`-style panels
(never the Angular `graph`) with a unit and a description, on `${datasource}`; `rate` and
`increase` over `$__rate_interval`; counters only inside `rate`/`increase`; every query
filtered by `$job` and `$instance` (by `$job` alone for recorded series, which aggregate the
instances).

With --metrics (Prometheus text files scraped from the running services), every metric a
dashboard or rule reads must exist, and every label it groups or filters by must exist on
that metric (or be added by Prometheus, `job` and `instance`): a panel on a label the stack
never produces shows nothing.

Alerts: a severity (page or ticket), a fixed summary, a description with the details, and a
runbook_url to a section of docs/runbooks.md that exists.

  lint_monitoring.py --dashboards DIR --rules FILE... [--metrics FILE...]
"""

import argparse
import json
import pathlib
import re
import sys

import yaml

PROMQL_WORDS = {
    "sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "max", "min", "avg",
    "count", "label_replace", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "time", "vector", "scalar",
    "humanizePercentage", "humanizeDuration", "le", "job", "instance",
}
ADDED_BY_PROMETHEUS = {"job", "instance"}
COUNTER_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def exposition(paths):
    """metric name -> set of label names, from Prometheus text files."""
    metrics = {}
    for path in paths:
        for line in pathlib.Path(path).read_text().splitlines():
            if not line or line.startswith("#"):
                continue
            match = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?", line)
            if not match:
                continue
            labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', match.group(3) or ""))
            metrics.setdefault(match.group(1), set()).update(labels)
    return metrics


def strip_strings(expr):
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)


def metric_names(expr, recorded):
    names = set()
    bare = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", strip_strings(expr))
    bare = re.sub(r"\{[^}]*\}", "{}", bare)
    for name in re.findall(r"(?<![\w:$\[])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?=\{|\[|\)|$|\s)", bare):
        if name in PROMQL_WORDS or name in recorded or re.fullmatch(r"\d+\w*", name):
            continue
        names.add(name)
    return names


def grouping_labels(expr):
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", strip_strings(expr)):
        labels.update(label.strip() for label in group.split(",") if label.strip())
    return labels


def selector_labels(expr):
    labels = set()
    for selector in re.findall(r"\{([^}]*)\}", expr):
        labels.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", selector))
    return labels


def added_labels(expr):
    """Labels an expression makes itself (label_replace's destination)."""
    # label_replace(v, "dst", "replacement", "src", "regex"): the four trailing strings.
    return set(re.findall(r',\s*"([a-zA-Z_]\w*)"\s*,\s*"[^"]*"\s*,\s*"[a-zA-Z_]\w*"\s*,\s*"[^"]*"\s*\)', expr))


def check_expr(where, expr, metrics, recorded, problems):
    names = metric_names(expr, recorded)
    if metrics is None:
        return
    known = set()
    for name in names:
        if name not in metrics:
            problems.append(f"{where}: metric {name} is not exposed by any service")
            continue
        known |= metrics[name]
    available = known | ADDED_BY_PROMETHEUS | added_labels(expr) | {"le"}
    for label in (grouping_labels(expr) | selector_labels(expr)) - available:
        if names and all(n in metrics for n in names):
            problems.append(f"{where}: label {label} is on none of {sorted(names)}")


def lint_dashboard(path, metrics, recorded, problems):
    dashboard = json.loads(pathlib.Path(path).read_text())
    variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append(f"{path}: no `datasource` variable of type datasource")
    for name in ("job", "instance"):
        if name not in variables:
            problems.append(f"{path}: no `{name}` variable")
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            continue
        where = f"{path}: panel {panel.get('title')!r}"
        if panel.get("type") == "graph":
            problems.append(f"{where}: deprecated Angular `graph` panel; use `timeseries`")
        if not panel.get("description"):
            problems.append(f"{where}: no description")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: data source is not ${{datasource}}")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            for window in re.findall(r"\b(?:rate|irate|increase)\s*\([^\[]*\[([^\]]*)\]", expr):
                if window != "$__rate_interval":
                    problems.append(f"{where}: rate window [{window}] instead of [$__rate_interval]")
            for name in metric_names(expr, recorded):
                if name.endswith(COUNTER_SUFFIXES) and not re.search(
                    r"\b(?:rate|irate|increase)\s*\(\s*" + re.escape(name) + r"\b", expr
                ):
                    problems.append(f"{where}: counter {name} used outside rate/increase")
            for name, selector in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
                # Recorded series (the SLOs) aggregate every instance of a job.
                needed = ("$job",) if name in recorded else ("$job", "$instance")
                if not all(variable in selector for variable in needed):
                    problems.append(f"{where}: a selector without the {' and '.join(needed)} filters: {{{selector}}}")
            check_expr(where, expr, metrics, recorded, problems)


def rules_of(path):
    """Every rule of a rule file."""
    document = yaml.safe_load(pathlib.Path(path).read_text())
    return [rule for group in document.get("groups", []) for rule in group.get("rules", [])]


def lint_alert(rule, runbook_anchors, problems):
    """What an on-call engineer needs of an alert: a severity, a summary that stays the same
    (it titles the page), a description with the details, and a runbook that exists."""
    where = f"alert {rule['alert']}"
    if rule.get("labels", {}).get("severity") not in ("page", "ticket"):
        problems.append(f"{where}: severity is neither page nor ticket")
    annotations = rule.get("annotations", {})
    summary, description = annotations.get("summary", ""), annotations.get("description", "")
    if not summary or "{{" in summary:
        problems.append(f"{where}: the summary must be fixed text")
    if "{{" not in description:
        problems.append(f"{where}: the description must carry the details ({{{{ $labels... }}}}, {{{{ $value }}}})")
    url = annotations.get("runbook_url", "")
    match = re.fullmatch(r"https://github\.com/stackline/stackline/blob/main/docs/runbooks\.md#([\w-]+)", url)
    if not match:
        problems.append(f"{where}: runbook_url {url!r} is not a section of docs/runbooks.md")
    elif match.group(1) not in runbook_anchors:
        problems.append(f"{where}: docs/runbooks.md has no section #{match.group(1)}")


def anchors(markdown):
    """GitHub's anchors of a Markdown file's headings."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", pathlib.Path(markdown).read_text(), flags=re.M):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dashboards", required=True)
    parser.add_argument("--rules", nargs="+", default=[])
    parser.add_argument("--metrics", nargs="*")
    args = parser.parse_args()
    metrics = exposition(args.metrics) if args.metrics else None
    if metrics is not None:
        metrics.setdefault("up", set())
    problems = []
    rules = [rule for path in args.rules for rule in rules_of(path)]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    runbook_anchors = anchors(pathlib.Path(__file__).resolve().parents[2] / "docs/runbooks.md")
    for rule in rules:
        check_expr(f"rule {rule.get('record') or rule.get('alert')}", str(rule["expr"]), metrics, recorded, problems)
        if "alert" in rule:
            lint_alert(rule, runbook_anchors, problems)
    dashboards = sorted(pathlib.Path(args.dashboards).glob("*.json"))
    if not dashboards:
        problems.append(f"{args.dashboards}: no dashboards")
    for path in dashboards:
        lint_dashboard(path, metrics, recorded, problems)
    for problem in problems:
        print(problem, file=sys.stderr)
    checked = "against the exposition of the running services" if metrics is not None else "(no metrics given)"
    print(f"{len(dashboards)} dashboard(s), {len(rules)} rule(s) checked {checked}: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
