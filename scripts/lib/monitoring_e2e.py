"""Proves the dashboards and rules on a real Prometheus: starts the release binaries (a data
service and a gateway, on a Postgres and a Redis of this check's own) and the machine's
Prometheus (the Debian package) with every rule of infra/prometheus/rules, scraping both
services every second; sends traffic through the gateway that produces successes, 4xx, 429s
and 5xx (Postgres and then the data service are stopped for a moment); then evaluates every
dashboard panel's queries (variables substituted) and every recording rule through
Prometheus's HTTP API, and fails on any that returns no series, naming it.

  monitoring_e2e.py --gateway BIN --data-service BIN [--prometheus BIN]
"""

import argparse
import calendar
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

from local_services import Postgres, Redis, free_port, tear_down, wait_until

urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
ROOT = pathlib.Path(__file__).resolve().parents[2]
KEY, SLOW_KEY = "monitoring-key", "monitoring-slow-key"
# What the dashboards' variables become: every job, instance and upstream; a rate window of
# a few 1 s scrapes.
VARIABLES = {"$__rate_interval": "15s", "$job": ".+", "$instance": ".+", "$upstream": ".+"}


def log(message):
    print(f"==> monitoring: {message}", file=sys.stderr, flush=True)


def request(url, method="GET", body=None, key=KEY):
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return None, b""


def query(prometheus, expr):
    url = f"{prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.loads(response.read())
    if answer["status"] != "success":
        raise SystemExit(f"Prometheus refused {expr}: {answer}")
    return answer["data"]["result"]


class Process:
    def __init__(self, work, name, command, env=None):
        self.name, self.command, self.env = name, command, env or {}
        self.log = os.path.join(work, f"{name}.log")
        self.process = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("APP_") and k != "RUST_LOG"}
        env.update(self.env)
        with open(self.log, "ab") as output:
            self.process = subprocess.Popen(self.command, env=env, stdout=output, stderr=output)

    def stop(self, sig=signal.SIGTERM):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)


def in_prometheus(server, expr, what):
    """Waits until Prometheus holds what `expr` asks for (the services count, Prometheus
    scrapes every second)."""
    wait_until(what, lambda: bool(query(server, expr)), timeout=30, interval=0.2)


def rules_evaluated_since(server, moment):
    """Whether every rule group has been evaluated since `moment` (seconds since the epoch)."""
    with urllib.request.urlopen(f"{server}/api/v1/rules", timeout=10) as response:
        groups = json.loads(response.read())["data"]["groups"]
    evaluated = [group.get("lastEvaluation", "") for group in groups]
    moments = [calendar.timegm(time.strptime(e[:19], "%Y-%m-%dT%H:%M:%S")) for e in evaluated if e[:4] > "2000"]
    return len(moments) == len(groups) and min(moments) > moment


def traffic(gateway, data_service, postgres, server):
    api = f"{gateway}/api/v1/items"
    outcomes = {}

    def count(status):
        outcomes[status] = outcomes.get(status, 0) + 1

    for round_ in range(30):
        status, body = request(api, "POST", {"name": f"monitoring {round_}"})
        count(status)
        if status == 201:
            item = json.loads(body)["id"]
            for _ in range(3):
                count(request(f"{api}/{item}")[0])
            count(request(f"{api}/{item}", "PATCH", {"description": "changed"})[0])
        count(request(f"{api}?limit=5")[0])
        count(request(f"{api}/not-an-id")[0])
        count(request(f"{api}/00000000-0000-0000-0000-000000000000")[0])
    keyed = urllib.request.Request(
        api,
        json.dumps({"name": "keyed"}).encode(),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "Idempotency-Key": "monitoring-replay"},
        method="POST",
    )
    for _ in range(2):
        with urllib.request.urlopen(keyed, timeout=5) as response:
            count(response.status)
    for _ in range(10):
        count(request(f"{api}?limit=1", key=SLOW_KEY)[0])
    count(request(api, key="no-such-key")[0])
    log("Postgres stopped for a moment")
    postgres.stop()
    for _ in range(10):
        count(request(api, "POST", {"name": "during"})[0])
        count(request(f"{api}?limit=5")[0])
    postgres.start()
    # Its 5xx in Prometheus before the process (and its counters) go.
    in_prometheus(server, 'count_over_time(api_requests_total{job="data-service",status=~"5.."}[5m]) >= 2', "the data service's 5xx in Prometheus")
    log("the data service stopped for a moment")
    data_service.stop(signal.SIGKILL)
    for _ in range(10):
        count(request(f"{api}?limit=5")[0])
    data_service.start()
    wait_until("the data service", lambda: request(f"{api}?limit=1")[0] == 200)
    for _ in range(20):
        count(request(f"{api}?limit=5")[0])
    return outcomes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--data-service", required=True)
    parser.add_argument("--prometheus", default="prometheus")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="stackline-monitoring-")
    os.chmod(work, 0o755)
    postgres, redis = Postgres(work), Redis(work)
    processes = []
    try:
        postgres.start()
        redis.start()
        ports = {name: free_port() for name in ("data", "gateway", "admin", "prometheus")}
        data_service = Process(work, "data-service", [args.data_service], {
            "APP__SERVER__PORT": str(ports["data"]),
            "APP__SERVER__WORKERS": "1",
            "APP__SHUTDOWN__DRAIN_DELAY_SECS": "0",
            "APP__DATABASE__URL": f"postgres://postgres@127.0.0.1:{postgres.port}/stackline",
            "APP__CACHE__URL": f"redis://127.0.0.1:{redis.port}/0",
            "RUST_LOG": "warn",
        })
        keys = [
            {"id": "monitoring", "sha256": hashlib.sha256(KEY.encode()).hexdigest(), "rate_per_sec": 100000, "burst": 100000},
            {"id": "monitoring-slow", "sha256": hashlib.sha256(SLOW_KEY.encode()).hexdigest(), "rate_per_sec": 1, "burst": 2},
        ]
        gateway = Process(work, "gateway", [args.gateway], {
            "APP__SERVER__PORT": str(ports["gateway"]),
            "APP__SERVER__WORKERS": "1",
            "APP__ADMIN__PORT": str(ports["admin"]),
            "APP__SHUTDOWN__DRAIN_DELAY_SECS": "0",
            "APP__UPSTREAMS__DATA-SERVICE__URLS": f"http://127.0.0.1:{ports['data']}",
            "APP__AUTH__KEYS": json.dumps(keys),
            "APP__RATE_LIMIT__REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
            "RUST_LOG": "warn",
        })
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(path) for path in sorted((ROOT / "infra/prometheus/rules").glob("*.yml"))],
            "scrape_configs": [
                {"job_name": "gateway", "static_configs": [{"targets": [f"127.0.0.1:{ports['admin']}"]}]},
                {"job_name": "data-service", "static_configs": [{"targets": [f"127.0.0.1:{ports['data']}"]}]},
            ],
        }
        pathlib.Path(work, "prometheus.yml").write_text(yaml.safe_dump(config))
        prometheus = Process(work, "prometheus", [
            args.prometheus,
            f"--config.file={work}/prometheus.yml",
            f"--storage.tsdb.path={work}/tsdb",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
        ])
        processes += [data_service, gateway, prometheus]
        for process in processes:
            process.start()
        server = f"http://127.0.0.1:{ports['prometheus']}"
        wait_until("Prometheus", lambda: request(f"{server}/-/ready")[0] == 200)
        wait_until("the gateway", lambda: request(f"http://127.0.0.1:{ports['gateway']}/api/v1/items?limit=1")[0] == 200)
        wait_until("Prometheus to scrape both services", lambda: len(query(server, "up == 1")) == 2, timeout=60)
        outcomes = traffic(f"http://127.0.0.1:{ports['gateway']}", data_service, postgres, server)
        log(f"traffic through the gateway: {dict(sorted(outcomes.items(), key=lambda kv: str(kv[0])))}")
        for wanted in (200, 201, 400, 404, 429, 503):
            if not outcomes.get(wanted):
                raise SystemExit(f"the traffic produced no {wanted}: {outcomes}")
        # Every rule group evaluated since the traffic ended (the SLO groups every 30 s).
        ended = time.time()
        wait_until("every rule group to be evaluated", lambda: rules_evaluated_since(server, ended), timeout=90, interval=1)
        with urllib.request.urlopen(f"{server}/api/v1/rules", timeout=10) as response:
            groups = json.loads(response.read())["data"]["groups"]
        problems = [
            f"rule {rule['name']} of {group['file']}: {rule.get('lastError')}"
            for group in groups for rule in group["rules"] if rule.get("health") != "ok"
        ]
        recording = 0
        for group in groups:
            for rule in group["rules"]:
                if rule["type"] != "recording":
                    continue
                recording += 1
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(rule.get("labels", {}).items()))
                if not query(server, f"{rule['name']}{{{labels}}}"):
                    problems.append(f"recording rule {rule['name']}{{{labels}}} ({group['file']}): no series")
        panels = 0
        for path in sorted((ROOT / "infra/grafana/dashboards").glob("*.json")):
            dashboard = json.loads(path.read_text())
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"]
                    for variable, value in VARIABLES.items():
                        expr = expr.replace(variable, value)
                    panels += 1
                    if not query(server, expr):
                        problems.append(f"{path.name}: panel {panel['title']!r} ({target['refId']}): no series for {expr}")
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            raise SystemExit(f"{len(problems)} queries or rules answered nothing")
        log(f"{panels} panel queries and {recording} recording rules answered on a real Prometheus")
    finally:
        for process in reversed(processes):
            try:
                process.stop(signal.SIGKILL)
            except subprocess.TimeoutExpired:
                pass
        tear_down(postgres, redis, work)


if __name__ == "__main__":
    main()
