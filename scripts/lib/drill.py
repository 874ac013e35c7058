"""The fault drill: the release binaries on loopback (two data-service instances, two
gateways, a Postgres cluster and a Redis of the drill's own on spare ports) under a bounded
mixed load, through one fault after another. Prints what every phase cost and exits non-zero
when a target is missed. Run by scripts/drill; see docs/reliability.md.

Every fault is the drill's own: it never touches the machine's Postgres or Redis.
"""

import argparse
import hashlib
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid

from local_services import Postgres, Redis, free_port, tear_down, wait_until

API_KEY = "drill-key-" + uuid.uuid4().hex
CLIENTS = 8
DRAIN_DELAY_SECS = 3
# The data service's database.wait_timeout_ms, and what a 503 may take on top of it
# (the gateway's retries of requests safe to repeat).
POOL_WAIT_SECS = 1.0
WRITE_ANSWER_LIMIT_SECS = POOL_WAIT_SECS + 0.5
REQUEST_TIMEOUT_SECS = 10
# No phase may run longer, whatever happens.
PHASE_LIMIT_SECS = 60
MAX_REQUESTS = 400_000


# Loopback only: never through a proxy the environment may name.
urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))


def log(message):
    print(f"==> drill: {message}", file=sys.stderr, flush=True)


def http_status(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def scrape(url):
    """Prometheus text as {(name, frozenset(labels)): value}."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, labels = series.partition("{")
        pairs = []
        for pair in labels.rstrip("}").split('",'):
            if "=" in pair:
                key, _, val = pair.partition("=")
                pairs.append((key, val.strip('"')))
        samples[(name, frozenset(pairs))] = float(value)
    return samples


def metric_sum(samples, name, **labels):
    wanted = set(labels.items())
    return sum(v for (n, l), v in samples.items() if n == name and wanted <= set(l))


class Service:
    """One process of ours, configured by a file of its own, logging to a file."""

    def __init__(self, work, name, binary, config, ready_url):
        self.name, self.binary, self.ready_url = name, binary, ready_url
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "drill.yaml"), "w") as file:
            file.write(config)
        self.process = None

    def start(self, *args):
        env = {k: v for k, v in os.environ.items() if not k.startswith("APP_") and k != "RUST_LOG"}
        env.update({"APP_ENV": "drill", "APP_CONFIG_DIR": self.dir, "RUST_LOG": "warn"})
        with open(os.path.join(self.dir, "output.log"), "ab") as output:
            self.process = subprocess.Popen([self.binary, *args], env=env, stdout=output, stderr=output)
        return self.process

    def wait_ready(self):
        return wait_until(f"{self.name} to be ready", lambda: http_status(self.ready_url) == 200)

    def signal(self, number):
        self.process.send_signal(number)

    def wait_exit(self, timeout=30):
        return self.process.wait(timeout=timeout)


class Result:
    __slots__ = ("phase", "kind", "status", "error", "started", "ended", "problem", "item")

    def __init__(self, phase, kind, started):
        self.phase, self.kind, self.started = phase, kind, started
        self.status = self.error = self.ended = self.item = None
        self.problem = False


class Load:
    """CLIENTS threads sending a mix of reads and writes through the gateways. Each client
    keeps its connection alive and moves to the other gateway when one refuses to connect
    (its request was never sent)."""

    KINDS = [("get", 55), ("post_keyed", 15), ("post", 10), ("patch", 10), ("list", 10)]

    def __init__(self, gateways, warm_ids, patch_ids):
        self.gateways = gateways
        self.warm_ids, self.patch_ids = warm_ids, patch_ids
        self.phase = "warmup"
        self.results = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(CLIENTS)]
        self.failovers = 0

    def start(self):
        for thread in self.threads:
            thread.start()

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=REQUEST_TIMEOUT_SECS + 5)

    def client(self, number):
        rng = random.Random(number)
        order = self.gateways[number % 2 :] + self.gateways[: number % 2]
        connection = None
        kinds, weights = zip(*self.KINDS)
        while not self.stopping.is_set() and len(self.results) < MAX_REQUESTS:
            kind = rng.choices(kinds, weights)[0]
            method, path, body, headers = self.request(kind, rng)
            result = Result(self.phase, kind, time.monotonic())
            for _attempt in range(len(order)):
                fresh = connection is None
                if fresh:
                    connection = http.client.HTTPConnection("127.0.0.1", order[0], timeout=REQUEST_TIMEOUT_SECS)
                try:
                    connection.request(method, path, body=body, headers=headers)
                    response = connection.getresponse()
                    payload = response.read()
                    result.status = response.status
                    result.problem = response.getheader("content-type") == "application/problem+json"
                    if response.status == 201:
                        result.item = json.loads(payload)["id"]
                    if response.will_close:
                        connection.close()
                        connection = None
                    break
                except (ConnectionRefusedError, ConnectionResetError) as error:
                    if not (fresh or isinstance(error, ConnectionRefusedError)):
                        result.error = f"{type(error).__name__}: {error}"
                        connection.close()
                        connection = None
                        break
                    # Refused, or reset before any answer on a connection opened for this
                    # request: the gateway never read it (the kernel resets connections still
                    # queued when a listener closes). The request goes to the other gateway.
                    connection.close()
                    connection = None
                    order = order[1:] + order[:1]
                    with self.lock:
                        self.failovers += 1
                except (OSError, http.client.HTTPException) as error:
                    result.error = f"{type(error).__name__}: {error}"
                    connection.close()
                    connection = None
                    break
            result.ended = time.monotonic()
            if result.status is None and result.error is None:
                result.error = "every gateway refused the connection"
            with self.lock:
                self.results.append(result)

    def request(self, kind, rng):
        auth = {"Authorization": f"Bearer {API_KEY}"}
        if kind == "get":
            return "GET", f"/api/v1/items/{rng.choice(self.warm_ids)}", None, auth
        if kind == "list":
            return "GET", "/api/v1/items?limit=20", None, auth
        if kind == "patch":
            body = json.dumps({"description": f"patched {uuid.uuid4().hex}"})
            headers = {**auth, "Content-Type": "application/merge-patch+json"}
            return "PATCH", f"/api/v1/items/{rng.choice(self.patch_ids)}", body, headers
        key = uuid.uuid4().hex
        headers = {**auth, "Content-Type": "application/json"}
        if kind == "post_keyed":
            headers["Idempotency-Key"] = key
            return "POST", "/api/v1/items", json.dumps({"name": f"drill-keyed-{key}"}), headers
        return "POST", "/api/v1/items", json.dumps({"name": f"drill-plain-{key}"}), headers

    def of(self, phase):
        with self.lock:
            return [r for r in self.results if r.phase == phase]


def expected(result, database_down=False):
    """Whether a result is what a client should get: the success status, or, while the
    database is down, a 503 problem for anything that needs it."""
    success = {"get": 200, "list": 200, "patch": 200, "post": 201, "post_keyed": 201}[result.kind]
    if result.status == success:
        return True
    return database_down and result.kind != "get" and result.status == 503 and result.problem


class Sampler:
    """Scrapes both gateways every 50 ms: when each endpoint was last sent a request."""

    def __init__(self, admin_urls, endpoint):
        self.admin_urls, self.endpoint = admin_urls, endpoint
        self.samples = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stopping.is_set():
            now = time.monotonic()
            scrapes = [scrape(url) for url in self.admin_urls]
            attempts = sum(metric_sum(s, "gateway_endpoint_requests_total", endpoint=self.endpoint) for s in scrapes)
            answered = sum(
                metric_sum(s, "gateway_endpoint_requests_total", endpoint=self.endpoint, outcome="2xx") for s in scrapes
            )
            self.samples.append((now, attempts, answered))
            time.sleep(0.05)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *_):
        self.stopping.set()
        self.thread.join()

    def last_increase(self, column, after, before):
        last, previous = None, None
        for sample in self.samples:
            if previous is not None and after <= sample[0] <= before and sample[column] > previous[column]:
                last = sample[0]
            previous = sample
        return last

    def first_increase(self, column, after):
        previous = None
        for sample in self.samples:
            if previous is not None and sample[0] >= after and sample[column] > previous[column]:
                return sample[0]
            previous = sample
        return None


def summarize(results, database_down_between=None):
    """Requests, failures and failures by kind. A request in progress at any moment of
    `database_down_between` may meet the outage."""
    failed = []
    for r in results:
        down = (
            database_down_between is not None
            and r.started <= database_down_between[1]
            and r.ended >= database_down_between[0]
        )
        if not expected(r, down):
            failed.append(r)
    by_kind = {}
    for r in failed:
        label = f"{r.kind} {r.status or r.error}"
        by_kind[label] = by_kind.get(label, 0) + 1
    return {"requests": len(results), "failed": len(failed), "failures": by_kind}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gateway", required=True)
    parser.add_argument("--data-service", required=True)
    parser.add_argument("--report", required=True, help="where the JSON report goes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="stackline-drill-")
    os.chmod(work, 0o755)
    log(f"work directory {work}")
    postgres = Postgres(work)
    postgres.start()
    redis = Redis(work)
    redis.start()
    processes = []
    try:
        report = drill(args, work, postgres, redis, processes)
    finally:
        for service in processes:
            if service.process and service.process.poll() is None:
                service.process.kill()
                service.process.wait()
        tear_down(postgres, redis, work, keep=args.keep)
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as file:
        json.dump(report, file, indent=2)
    print_report(report)
    missed = [f"{t['phase']}: {t['target']}" for t in report["targets"] if not t["met"]]
    if missed:
        log("targets missed:\n  " + "\n  ".join(missed))
        sys.exit(1)
    log("every target met")


def drill(args, work, postgres, redis, processes):
    database_url = f"postgres://postgres@127.0.0.1:{postgres.port}/stackline_drill"
    redis_port = redis.port
    data_ports = [free_port(), free_port()]
    data_services = []
    for number, port in enumerate(data_ports, 1):
        config = f"""
server: {{host: 127.0.0.1, port: {port}, workers: 1}}
shutdown: {{drain_delay_secs: {DRAIN_DELAY_SECS}, grace_period_secs: 10}}
database: {{url: "{database_url}", create_database: true, migrate_on_start: false, wait_timeout_ms: {int(POOL_WAIT_SECS * 1000)}}}
cache: {{url: "redis://127.0.0.1:{redis_port}/0"}}
"""
        data_services.append(
            Service(work, f"data-service-{number}", args.data_service, config, f"http://127.0.0.1:{port}/ready")
        )
    processes.extend(data_services)
    log("migrations")
    migrate = data_services[0].start("migrate")
    if migrate.wait(timeout=60) != 0:
        raise SystemExit("drill: data-service migrate failed")
    for service in data_services:
        service.start()
    for service in data_services:
        service.wait_ready()

    key_hash = hashlib.sha256(API_KEY.encode()).hexdigest()
    keys = json.dumps([{"id": "drill", "sha256": key_hash, "rate_per_sec": 1000000, "burst": 1000000}])
    urls = ", ".join(f'"http://127.0.0.1:{port}"' for port in data_ports)
    gateway_ports = [free_port(), free_port()]
    admin_ports = [free_port(), free_port()]
    gateways = []
    for number, (port, admin) in enumerate(zip(gateway_ports, admin_ports), 1):
        config = f"""
server: {{host: 127.0.0.1, port: {port}, workers: 1}}
admin: {{host: 127.0.0.1, port: {admin}}}
shutdown: {{drain_delay_secs: {DRAIN_DELAY_SECS}, grace_period_secs: 10}}
upstreams:
  data-service: {{urls: [{urls}]}}
auth: {{keys: '{keys}', keys_file: ""}}
rate_limit: {{redis_url: "redis://127.0.0.1:{redis_port}/0", key_prefix: "drill:rl:"}}
"""
        gateways.append(Service(work, f"gateway-{number}", args.gateway, config, f"http://127.0.0.1:{port}/ready"))
    processes.extend(gateways)
    for gateway in gateways:
        gateway.start()
    for gateway in gateways:
        gateway.wait_ready()
    admin_urls = [f"http://127.0.0.1:{admin}/metrics" for admin in admin_ports]

    log("seeding items")
    seeded = []
    for i in range(60):
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway_ports[0]}/api/v1/items",
            data=json.dumps({"name": f"drill-seed-{i}"}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            seeded.append(json.loads(response.read())["id"])
    warm_ids, patch_ids = seeded[:40], seeded[40:]

    def warm_cache():
        for item in warm_ids:
            for _ in range(2):
                request = urllib.request.Request(
                    f"http://127.0.0.1:{gateway_ports[1]}/api/v1/items/{item}",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
                urllib.request.urlopen(request, timeout=5).read()

    warm_cache()
    load = Load(gateway_ports, warm_ids, patch_ids)
    load.start()
    report = {"phases": {}, "targets": []}
    targets = report["targets"]

    def target(phase, description, met, measured):
        targets.append({"phase": phase, "target": description, "met": bool(met), "measured": measured})

    def phase(name):
        load.phase = name
        return time.monotonic()

    def settle(seconds=1.5):
        time.sleep(seconds)

    settle(2)

    # 1. SIGTERM and restart each data-service instance in turn.
    phase("rolling restart")
    for service in data_services:
        service.signal(signal.SIGTERM)
        code = service.wait_exit()
        target("rolling restart", f"{service.name} exits 0 on SIGTERM", code == 0, code)
        service.start()
        service.wait_ready()
        settle(1.5)
    summary = summarize(load.of("rolling restart"))
    report["phases"]["rolling restart"] = summary
    target("rolling restart", "0 failed requests", summary["failed"] == 0, summary["failed"])

    # 2. SIGKILL one instance, restart it a second later.
    phase("kill")
    victim = data_services[0]
    endpoint = f"127.0.0.1:{data_ports[0]}"
    with Sampler(admin_urls, endpoint) as sampler:
        settle(1)
        in_flight = sum(
            metric_sum(scrape(url), "gateway_endpoint_in_flight", endpoint=endpoint) for url in admin_urls
        )
        killed_at = time.monotonic()
        victim.signal(signal.SIGKILL)
        victim.wait_exit()
        time.sleep(1)
        restarted_at = time.monotonic()
        victim.start()
        ready_at = victim.wait_ready()
        # Bounded: a gateway that never sends it requests again misses the target below.
        deadline = time.monotonic() + 10
        while sampler.first_increase(2, ready_at) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        settle(1)
    results = load.of("kill")
    summary = summarize(results)
    report["phases"]["kill"] = summary
    failed = [r for r in results if not expected(r)]
    safe = [r for r in failed if r.kind in ("get", "post_keyed")]
    last_attempt = sampler.last_increase(1, killed_at, restarted_at)
    taken_over_secs = round((last_attempt or killed_at) - killed_at, 3)
    back_at = sampler.first_increase(2, ready_at)
    back_secs = round(back_at - ready_at, 3) if back_at is not None else None
    summary.update({"in_flight_on_killed_instance": in_flight, "all_traffic_on_the_other_secs": taken_over_secs,
                    "back_in_rotation_after_ready_secs": back_secs})
    target("kill", f"failures at most the requests in flight on the killed instance (at most {CLIENTS}, one per client)",
           len(failed) <= CLIENTS, len(failed))
    target("kill", "GETs and keyed POSTs: 0 failed", not safe, len(safe))
    target("kill", "the other instance takes all traffic within 1 s", taken_over_secs <= 1.0, taken_over_secs)
    target("kill", "the restarted instance is back in rotation within 2 s of being ready",
           back_secs is not None and back_secs <= 2.0, back_secs)

    # 3. Redis stopped for 5 s.
    before = [scrape(url) for url in admin_urls]
    phase("redis")
    redis.stop()
    time.sleep(5)
    during = [scrape(url) for url in admin_urls]
    redis.start()
    settle(3)
    after = [scrape(url) for url in admin_urls]
    summary = summarize(load.of("redis"))
    report["phases"]["redis"] = summary

    def decisions(scrapes, decision):
        return sum(metric_sum(s, "gateway_ratelimit_decisions_total", decision=decision) for s in scrapes)

    local = decisions(during, "allowed_local") - decisions(before, "allowed_local")
    shared_again = decisions(after, "allowed") - decisions(during, "allowed")
    summary.update({"decided_locally": local, "decided_in_redis_after": shared_again})
    target("redis", "0 failed requests", summary["failed"] == 0, summary["failed"])
    target("redis", "rate limits fall back to each replica", local > 0, local)
    target("redis", "rate limits come back to Redis", shared_again > 0, shared_again)

    # 4. Postgres stopped for 5 s, then started.
    warm_cache()
    phase("postgres")
    settle(0.5)
    down_at = time.monotonic()
    postgres.stop()
    time.sleep(5)
    postgres.start()
    up_at = time.monotonic()
    settle(3)
    results = load.of("postgres")
    # While it is down, and for the 2 s the target gives writes to come back.
    summary = summarize(results, (down_at, up_at + 2.0))
    report["phases"]["postgres"] = summary
    gets = [r for r in results if r.kind == "get"]
    get_failures = [r for r in gets if not expected(r)]
    writes_during = [r for r in results if r.kind not in ("get", "list") and r.started <= up_at and r.ended >= down_at]
    refused = [r for r in writes_during if r.status == 503]
    slowest_refusal = round(max((r.ended - r.started for r in refused), default=0.0), 3)
    recovered = [r.ended for r in results if r.kind in ("post", "post_keyed", "patch") and expected(r) and r.ended > up_at]
    writes_back_secs = round(min(recovered) - up_at, 3) if recovered else None
    summary.update({"gets": len(gets), "writes_refused_503": len(refused),
                    "slowest_refusal_secs": slowest_refusal, "writes_back_after_secs": writes_back_secs})
    target("postgres", "GETs of cached items: 0 failed", not get_failures, len(get_failures))
    target("postgres", "writes: only 503 problem responses, never another failure", summary["failed"] == 0,
           summary["failures"])
    target("postgres", f"each refusal within the pool's wait timeout ({POOL_WAIT_SECS} s, +0.5 s for retries)",
           refused and slowest_refusal <= WRITE_ANSWER_LIMIT_SECS, slowest_refusal)
    target("postgres", "writes succeed again within 2 s of Postgres being back",
           writes_back_secs is not None and writes_back_secs <= 2.0, writes_back_secs)

    # 5. SIGTERM of one gateway; clients move to the other when it refuses.
    settle(1)
    failovers_before = load.failovers
    phase("gateway")
    gateways[0].signal(signal.SIGTERM)
    code = gateways[0].wait_exit()
    settle(2)
    summary = summarize(load.of("gateway"))
    summary["failovers"] = load.failovers - failovers_before
    report["phases"]["gateway"] = summary
    target("gateway", "the gateway exits 0 on SIGTERM", code == 0, code)
    target("gateway", "0 failed requests", summary["failed"] == 0, summary["failed"])
    load.stop()

    # 6. Nothing acknowledged was lost, nothing repeated was doubled.
    acknowledged = {r.item for r in load.results if r.item}
    stored = set(postgres.sql("SELECT id FROM items", database="stackline_drill"))
    missing = acknowledged - stored
    doubled = postgres.sql(
        "SELECT name FROM items WHERE name LIKE 'drill-keyed-%' GROUP BY name HAVING count(*) > 1",
        database="stackline_drill",
    )
    sample = random.Random(1).sample(sorted(acknowledged), min(200, len(acknowledged)))
    unreadable = [item for item in sample if http_status_with_key(gateway_ports[1], item) != 200]
    report["phases"]["after"] = {"writes_acknowledged": len(acknowledged), "missing": len(missing),
                                 "keyed_posts_doubled": len(doubled), "read_back": len(sample),
                                 "unreadable": len(unreadable)}
    target("after", "every write acknowledged with 201 is stored", not missing, len(missing))
    target("after", "and readable through the gateway", not unreadable, len(unreadable))
    target("after", "no retried keyed POST created two items", not doubled, len(doubled))
    report["requests"] = len(load.results)
    return report


def http_status_with_key(port, item):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/items/{item}", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def print_report(report):
    print("\n| phase | requests | failed | what failed | figures |")
    print("|---|---:|---:|---|---|")
    for name, summary in report["phases"].items():
        figures = ", ".join(f"{k}: {v}" for k, v in summary.items() if k not in ("requests", "failed", "failures"))
        failures = ", ".join(f"{k} x{v}" for k, v in summary.get("failures", {}).items()) or "-"
        print(f"| {name} | {summary.get('requests', '')} | {summary.get('failed', '')} | {failures} | {figures} |")
    print("\n| phase | target | met | measured |")
    print("|---|---|---|---|")
    for t in report["targets"]:
        print(f"| {t['phase']} | {t['target']} | {'yes' if t['met'] else 'NO'} | {t['measured']} |")


if __name__ == "__main__":
    main()
