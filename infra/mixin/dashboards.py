"""The Grafana dashboards beside the overview: the SLOs, the gateway and the data service.

Every dashboard has the `datasource`, `job` and `instance` variables, a stable uid, links to
the others (by the tag `stackline`), and panels with a unit and a description whose queries
use `$__rate_interval`. The SLO panels read the rules generated from infra/slo (recorded per
`job`, across instances).
"""

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECT = 'job=~"$job", instance=~"$instance"'


def target(expr, legend, ref):
    return {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def panel(title, description, unit, queries, kind="timeseries", stack=False, minimum=None):
    defaults = {"unit": unit, "custom": {}}
    if kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        if stack:
            defaults["custom"]["stacking"] = {"mode": "normal", "group": "A"}
    if minimum is not None:
        defaults["min"] = minimum
    options = (
        {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi", "sort": "desc"}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "none", "graphMode": "area"}
    )
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)],
    }


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


def variable_query(name, label, query):
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".+",
        "current": {"text": "All", "value": "$__all"},
        "sort": 1,
    }


def dashboard(uid, title, description, layout, jobs):
    """`layout`: rows, each a list of panels laid out side by side."""
    panels, y, ident = [], 0, 1
    for entry in layout:
        if isinstance(entry, dict):
            entry = dict(entry, id=ident, gridPos={"h": 1, "w": 24, "x": 0, "y": y})
            panels.append(entry)
            ident, y = ident + 1, y + 1
            continue
        width = 24 // len(entry)
        for column, item in enumerate(entry):
            panels.append(dict(item, id=ident, gridPos={"h": 8, "w": width, "x": column * width, "y": y}))
            ident += 1
        y += 8
    job_values = "|".join(jobs)
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["stackline"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "schemaVersion": 39,
        "links": [
            {
                "title": "Stackline dashboards",
                "type": "dashboards",
                "tags": ["stackline"],
                "asDropdown": False,
                "icon": "external link",
                "includeVars": False,
                "keepTime": True,
                "targetBlank": False,
                "tooltip": "",
            }
        ],
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "type": "datasource",
                    "name": "datasource",
                    "label": "Data source",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                },
                variable_query("job", "Service", f'label_values(up{{job=~"{job_values}"}}, job)'),
                variable_query("instance", "Instance", 'label_values(up{job=~"$job"}, instance)'),
            ]
        },
        "panels": panels,
    }


def slo_dashboard(services):
    """Per service and SLO: its SLI, the burn rate per window, the error budget left."""
    layout = []
    for service in services:
        for slo in service["slos"]:
            job, name = service["service"], slo["name"]
            selector = f'{{job=~"$job", job="{job}", slo="{name}"}}'
            what = slo["description"].rstrip(".").lower()
            layout.append(row(f"{job}: {name} {slo['objective']}% ({what})"))
            layout.append([
                panel(
                    f"{job} {name}: SLI",
                    f"Share of the requests counted by the {job}'s {name} SLO that meet it ({what}), over 5 minutes "
                    f"and over 30 days, against the objective of {slo['objective']}%.",
                    "percentunit",
                    [
                        (f"1 - slo:sli_error:ratio_rate5m{selector}", "5m"),
                        (f"1 - slo:sli_error:ratio_rate30d{selector}", "30d"),
                        (f"slo:objective:ratio{selector}", "objective"),
                    ],
                ),
                panel(
                    f"{job} {name}: burn rate",
                    "How fast the error budget burns, per window: 1 spends it in exactly 30 days. A page fires at "
                    "14.4 over 1h and 5m (or 6 over 6h and 30m), a ticket at 3 over 1d and 2h (or 1 over 3d and 6h).",
                    "none",
                    [
                        (f"slo:sli_error:ratio_rate{window}{selector} / (1 - slo:objective:ratio{selector})", window)
                        for window in ["5m", "1h", "6h", "1d", "3d"]
                    ],
                ),
                panel(
                    f"{job} {name}: error budget left",
                    "The share of the 30-day error budget not yet spent (below 0: the objective is missed).",
                    "percentunit",
                    [(f"slo:error_budget_remaining:ratio{selector}", "budget left")],
                    kind="stat",
                ),
            ])
    return dashboard(
        "stackline-slo",
        "Stackline SLOs",
        "Service-level objectives (infra/slo): SLIs, burn rates and the 30-day error budgets.",
        layout,
        [service["service"] for service in services],
    )


def gateway_dashboard():
    upstream = f'{SELECT}, upstream=~"$upstream"'
    board = dashboard(
        "stackline-gateway",
        "Stackline gateway",
        "The gateway: traffic per upstream endpoint, their health, retries and their budget, rate limits per key.",
        [
            row("Upstream endpoints"),
            [
                panel(
                    "Requests per endpoint",
                    "Attempts sent to each upstream endpoint, by outcome (a status class or a failure kind).",
                    "reqps",
                    [(f"sum by (endpoint, outcome) (rate(gateway_endpoint_requests_total{{{upstream}}}[$__rate_interval]))", "{{endpoint}} {{outcome}}")],
                    stack=True,
                ),
                panel(
                    "Latency per endpoint (p99)",
                    "99th percentile of the time from sending an attempt to an endpoint to its response head.",
                    "s",
                    [(f"histogram_quantile(0.99, sum by (endpoint, le) (rate(gateway_endpoint_duration_seconds_bucket{{{upstream}}}[$__rate_interval])))", "{{endpoint}}")],
                ),
            ],
            [
                panel(
                    "Endpoints in rotation",
                    "Endpoints taking requests (healthy and not ejected) and those out of rotation; while too few are "
                    "in rotation (panic), every endpoint takes requests.",
                    "short",
                    [
                        (f"sum by (state) (gateway_upstream_endpoints{{{upstream}}})", "{{state}}"),
                        (f"max(gateway_upstream_panic{{{upstream}}})", "panic"),
                    ],
                    minimum=0,
                ),
                panel(
                    "Ejections",
                    "Times outlier detection took an endpoint out of rotation, by reason (consecutive 5xx or failed connects).",
                    "short",
                    [(f"sum by (endpoint, reason) (increase(gateway_endpoint_ejections_total{{{upstream}}}[$__rate_interval]))", "{{endpoint}} {{reason}}")],
                ),
                panel(
                    "Requests in flight per endpoint",
                    "Requests waiting for each endpoint's answer: what the balancer compares.",
                    "short",
                    [(f"sum by (endpoint) (gateway_endpoint_in_flight{{{upstream}}})", "{{endpoint}}")],
                ),
            ],
            row("Retries and the breaker"),
            [
                panel(
                    "Retries",
                    "Attempts sent again, by reason: never sent (connect failed), lost mid-exchange, or answered 503; and "
                    "retries the budget refused.",
                    "reqps",
                    [
                        (f"sum by (reason) (rate(gateway_upstream_retries_total{{{upstream}}}[$__rate_interval]))", "{{reason}}"),
                        (f"sum(rate(gateway_retry_budget_exhausted_total{{{upstream}}}[$__rate_interval]))", "refused by the budget"),
                    ],
                ),
                panel(
                    "Retry budget left",
                    "Retries the budget allows right now (at most 10 saved up; each request adds its share).",
                    "short",
                    [(f"min by (upstream) (gateway_retry_budget_available{{{upstream}}})", "{{upstream}}")],
                    minimum=0,
                ),
                panel(
                    "Circuit breaker",
                    "0 closed, 1 open (every endpoint failing: requests are shed), 2 half-open (one probes).",
                    "short",
                    [(f"max by (upstream) (gateway_circuit_state{{{upstream}}})", "{{upstream}}")],
                    minimum=0,
                ),
            ],
            row("Rate limits and keys"),
            [
                panel(
                    "Rate-limit decisions per key",
                    "Requests allowed and limited per API key id; *_local while Redis could not be asked and each "
                    "replica decides alone.",
                    "reqps",
                    [(f"sum by (key_id, decision) (rate(gateway_ratelimit_decisions_total{{{SELECT}}}[$__rate_interval]))", "{{key_id}} {{decision}}")],
                    stack=True,
                ),
                panel(
                    "Authentication failures",
                    "Requests refused for a missing, malformed or unknown API key.",
                    "reqps",
                    [(f"sum by (reason) (rate(gateway_auth_failures_total{{{SELECT}}}[$__rate_interval]))", "{{reason}}")],
                ),
                panel(
                    "Redis errors (rate limits)",
                    "Rate-limit Redis commands that failed or timed out; the gateway then limits locally.",
                    "reqps",
                    [(f"sum by (operation) (rate(gateway_ratelimit_redis_errors_total{{{SELECT}}}[$__rate_interval]))", "{{operation}}")],
                ),
            ],
        ],
        ["gateway"],
    )
    board["templating"]["list"].append(
        variable_query("upstream", "Upstream", 'label_values(gateway_upstream_endpoints{job=~"$job"}, upstream)')
    )
    return board


def data_service_dashboard():
    return dashboard(
        "stackline-data-service",
        "Stackline data service",
        "The data service: its Postgres pool and queries, the Redis cache, idempotent replays.",
        [
            row("Postgres"),
            [
                panel(
                    "Pool connections",
                    "Postgres connections of every pool of the instance: the most allowed, open, and idle among them.",
                    "short",
                    [(f"sum by (state) (db_pool_connections{{{SELECT}}})", "{{state}}")],
                    minimum=0,
                ),
                panel(
                    "Requests waiting for a connection",
                    "Requests waiting for a pooled Postgres connection (they give up after database.wait_timeout_ms).",
                    "short",
                    [(f"sum by (instance) (db_pool_waiting{{{SELECT}}})", "{{instance}}")],
                    minimum=0,
                ),
            ],
            [
                panel(
                    "Query latency by operation (p99)",
                    "99th percentile of the time spent in Postgres per operation, waiting for a connection included.",
                    "s",
                    [(f"histogram_quantile(0.99, sum by (operation, le) (rate(db_query_duration_seconds_bucket{{{SELECT}}}[$__rate_interval])))", "{{operation}}")],
                ),
                panel(
                    "Queries by operation",
                    "Postgres operations per second.",
                    "ops",
                    [(f"sum by (operation) (rate(db_query_duration_seconds_count{{{SELECT}}}[$__rate_interval]))", "{{operation}}")],
                    stack=True,
                ),
            ],
            row("Redis cache and idempotency"),
            [
                panel(
                    "Cache hit ratio",
                    "Share of item reads answered from Redis.",
                    "percentunit",
                    [(
                        f"sum(rate(cache_hits_total{{{SELECT}}}[$__rate_interval])) / "
                        f"(sum(rate(cache_hits_total{{{SELECT}}}[$__rate_interval])) + sum(rate(cache_misses_total{{{SELECT}}}[$__rate_interval])))",
                        "hit ratio",
                    )],
                    minimum=0,
                ),
                panel(
                    "Cache errors",
                    "Redis commands that failed or timed out, by operation; Redis is then bypassed for a while.",
                    "ops",
                    [(f"sum by (operation) (rate(cache_errors_total{{{SELECT}}}[$__rate_interval]))", "{{operation}}")],
                ),
                panel(
                    "Cache updates pending",
                    "Writes whose cache update failed and waits for Redis (their reads go to Postgres meanwhile).",
                    "short",
                    [(f"sum by (instance) (cache_pending_updates{{{SELECT}}})", "{{instance}}")],
                    minimum=0,
                ),
            ],
            [
                panel(
                    "Idempotent replays",
                    "Keyed POSTs answered with their stored first response (a client retried).",
                    "reqps",
                    [(f"sum(rate(idempotent_replays_total{{{SELECT}}}[$__rate_interval]))", "replays")],
                ),
                panel(
                    "Redis pool connections",
                    "Connections of the Redis pool: the most allowed, open, and idle.",
                    "short",
                    [(f"sum by (state) (cache_pool_connections{{{SELECT}}})", "{{state}}")],
                    minimum=0,
                ),
            ],
        ],
        ["data-service"],
    )
