//! The contract through the gateway, and what the proxy does to requests and responses.

use serde_json::{Value, json};

use crate::helpers::{
    DataService, Key, LOGS, TestUpstream, UPSTREAM_DATE, assert_problem, gateway_settings, spawn_gateway, unique,
};

#[tokio::test]
async fn the_items_contract_works_through_the_gateway() {
    let data = DataService::start().await;
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&data.address, &key, 1000, 1000, &unique()), key.clone()).await;
    let auth = format!("Bearer {}", key.secret);
    let post = |body: Value| {
        gateway.client.post(gateway.url("/api/v1/items")).header("Authorization", &auth).json(&body).send()
    };

    let created = post(json!({"name": "through", "tags": ["gw"]})).await.unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with("/api/v1/items/"), "Location rewritten to the public prefix: {location}");
    assert_eq!(created.headers()["etag"], "\"1\"");
    for header in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(created.headers().contains_key(header), "{header}");
    }
    let item: Value = created.json().await.unwrap();

    let fetched = gateway.get(&location).send().await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.json::<Value>().await.unwrap(), item);
    let not_modified = gateway.get(&location).header("If-None-Match", "\"1\"").send().await.unwrap();
    assert_eq!(not_modified.status(), 304);

    let patched = gateway
        .client
        .patch(gateway.url(&location))
        .header("Authorization", &auth)
        .header("If-Match", "\"1\"")
        .json(&json!({"name": "changed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    assert_eq!(patched.headers()["etag"], "\"2\"");
    let stale = gateway
        .client
        .patch(gateway.url(&location))
        .header("Authorization", &auth)
        .header("If-Match", "\"1\"")
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_problem(stale, 412).await;

    let page: Value = gateway.get("/api/v1/items?limit=10&tag=gw").send().await.unwrap().json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_problem(gateway.get("/api/v1/items?limit=0").send().await.unwrap(), 400).await;
    assert_problem(post(json!({"name": ""})).await.unwrap(), 422).await;

    let deleted = gateway.client.delete(gateway.url(&location)).header("Authorization", &auth).send().await.unwrap();
    assert_eq!(deleted.status(), 204);
    assert_problem(gateway.get(&location).send().await.unwrap(), 404).await;
    assert_problem(gateway.get("/elsewhere").send().await.unwrap(), 404).await;
    // A route prefix matches whole path segments only.
    let beside = gateway.get("/api/v1/itemsx").send().await.unwrap();
    assert!(!beside.headers().contains_key("ratelimit-limit"), "not proxied");
    assert_problem(beside, 404).await;
}

#[tokio::test]
async fn one_request_id_from_client_to_data_service() {
    let data = DataService::start().await;
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&data.address, &key, 1000, 1000, &unique()), key.clone()).await;
    let id = format!("e2e-{}", unique());
    let response = gateway.get("/api/v1/items").header("X-Request-ID", &id).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], id.as_str());
    let lines: Vec<Value> = LOGS.lines().into_iter().filter(|l| l["request_id"] == id.as_str()).collect();
    let routes: Vec<&str> =
        lines.iter().filter(|l| l["target"] == "access_log").filter_map(|l| l["route"].as_str()).collect();
    assert!(routes.contains(&"/v1/items"), "the data service logged it: {routes:?}");
    assert!(routes.iter().any(|r| r.starts_with("/api/v1/items")), "the gateway logged it: {routes:?}");
}

#[tokio::test]
async fn headers_are_forwarded_as_a_proxy_should() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 1000, 1000, &unique()), key.clone()).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = gateway
        .get("/api/v1/items/echo?x=1")
        .header("Connection", "keep-alive, x-custom-hop")
        .header("X-Custom-Hop", "drop me")
        .header("Proxy-Authorization", "Basic abc")
        .header("TE", "trailers")
        .header("X-Kept", "yes")
        .header("X-Request-ID", "hop-test")
        .header("traceparent", traceparent)
        .header("Cookie", "session=1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["location"], "/api/v1/items/elsewhere");
    assert!(response.headers().get("proxy-authenticate").is_none(), "hop-by-hop response header dropped");
    let dates: Vec<_> = response.headers().get_all("date").iter().collect();
    assert_eq!(dates.len(), 1, "one Date: {dates:?}");
    assert_ne!(dates[0], UPSTREAM_DATE, "the gateway dates its responses itself");
    let echoed: Value = response.json().await.unwrap();
    let headers = &echoed["headers"];
    for dropped in ["x-custom-hop", "proxy-authorization", "te", "authorization"] {
        assert!(headers.get(dropped).is_none(), "{dropped} must not be forwarded: {headers}");
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(headers["x-request-id"], "hop-test");
    assert_eq!(headers["traceparent"], traceparent);
    assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(headers["x-forwarded-proto"], "http");
    assert!(headers["x-forwarded-host"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(echoed["query"], "x=1");
    assert!(!LOGS.text().contains("session=1"), "cookies are never logged");
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_until_idle_too_long_and_hosts_may_be_named() {
    let upstream = TestUpstream::start();
    let by_name = upstream.address.replace("127.0.0.1", "localhost");
    let key = Key::new();
    let gateway =
        spawn_gateway(gateway_settings(&format!("{by_name}/"), &key, 1000, 1000, &unique()), key.clone()).await;
    let mut peers = Vec::new();
    for _ in 0..3 {
        let response = gateway.get("/api/v1/items/echo").send().await.unwrap();
        assert_eq!(response.status(), 200);
        let echoed: Value = response.json().await.unwrap();
        assert_eq!(echoed["headers"]["host"], by_name.trim_start_matches("http://"));
        peers.push(echoed["peer"].as_str().unwrap().to_owned());
    }
    assert!(peers.iter().all(|p| *p == peers[0]), "one connection serves one request after another: {peers:?}");

    // A connection idle past proxy.idle_timeout_ms is not reused.
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000, &unique());
    settings.proxy.idle_timeout_ms = 0;
    let gateway = spawn_gateway(settings, key.clone()).await;
    let mut peers = Vec::new();
    for _ in 0..2 {
        let echoed: Value = gateway.get("/api/v1/items/echo").send().await.unwrap().json().await.unwrap();
        peers.push(echoed["peer"].as_str().unwrap().to_owned());
    }
    assert_ne!(peers[0], peers[1]);
}

#[tokio::test]
async fn large_bodies_stream_through_and_the_limit_holds_while_streaming() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000, &unique());
    settings.proxy.body_limit_bytes = 1024 * 1024;
    let gateway = spawn_gateway(settings, key.clone()).await;
    let auth = format!("Bearer {}", key.secret);

    let fits = vec![b'a'; 900 * 1024];
    let response = gateway
        .client
        .post(gateway.url("/api/v1/items/echo"))
        .header("Authorization", &auth)
        .body(fits)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["body_bytes"], 900 * 1024);

    // Declared too large: refused before reading.
    let declared = gateway
        .client
        .post(gateway.url("/api/v1/items/echo"))
        .header("Authorization", &auth)
        .body(vec![b'b'; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_problem(declared, 413).await;

    // Chunked, no length: refused once the limit is crossed mid-stream.
    let chunks = (0..40).map(|_| Ok::<_, std::io::Error>(vec![b'c'; 64 * 1024]));
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let streamed = gateway
        .client
        .post(gateway.url("/api/v1/items/echo"))
        .header("Authorization", &auth)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_problem(streamed, 413).await;
}

#[tokio::test]
async fn large_responses_stream_back_and_the_connection_then_serves_the_next_request() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 1000, 1000, &unique()), key.clone()).await;
    let peer = || async {
        let echoed: Value = gateway.get("/api/v1/items/echo").send().await.unwrap().json().await.unwrap();
        echoed["peer"].as_str().unwrap().to_owned()
    };
    let first = peer().await;

    let sized = gateway.get("/api/v1/items/big?bytes=3000000").send().await.unwrap();
    assert_eq!(sized.status(), 200);
    assert_eq!(sized.headers()["content-length"], "3000000");
    let body = sized.bytes().await.unwrap();
    assert!(body.len() == 3_000_000 && body.iter().all(|b| *b == b'z'));
    assert_eq!(peer().await, first, "the connection is reused once the body has been read");

    let chunked = gateway.get("/api/v1/items/big?bytes=200000&chunked=1").send().await.unwrap();
    assert_eq!(chunked.status(), 200);
    assert!(chunked.headers().get("content-length").is_none());
    assert_eq!(chunked.bytes().await.unwrap().len(), 200_000);
    assert_eq!(peer().await, first);
}

#[tokio::test]
async fn idempotency_keys_are_scoped_to_the_client() {
    let data = DataService::start().await;
    let (first, second) = (Key::new(), Key::new());
    let mut settings = gateway_settings(&data.address, &first, 1000, 1000, &unique());
    let both = format!(
        "[{},{}]",
        first.config(1000, 1000).trim_matches(['[', ']']),
        second.config(1000, 1000).trim_matches(['[', ']'])
    );
    settings.auth.keys = secrecy::SecretString::from(both);
    let gateway = spawn_gateway(settings, first.clone()).await;
    let post = |key: &Key, name: &str| {
        gateway
            .client
            .post(gateway.url("/api/v1/items"))
            .bearer_auth(&key.secret)
            .header("Idempotency-Key", "same-key")
            .json(&json!({"name": name}))
            .send()
    };
    let a = post(&first, "from first").await.unwrap();
    let b = post(&second, "from second").await.unwrap();
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (201, 201), "no cross-client conflict");
    let (a, b): (Value, Value) = (a.json().await.unwrap(), b.json().await.unwrap());
    assert_ne!(a["id"], b["id"]);
    let replay = post(&first, "from first").await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.json::<Value>().await.unwrap()["id"], a["id"]);
}

#[test]
fn a_route_prefix_with_a_pattern_is_refused_at_start() {
    let mut settings = gateway_settings("http://127.0.0.1:1", &Key::new(), 10, 10, &unique());
    settings.routes[0].prefix = "/api/{version}/items".to_owned();
    let service = observability::ServiceInfo { name: "gateway", version: "test", environment: "test".to_owned() };
    match gateway::startup::Application::build(settings, service) {
        Err(error) => assert!(error.to_string().contains("/api/{version}/items"), "{error}"),
        Ok(_) => panic!("a prefix with a pattern must be refused"),
    }
}

#[tokio::test]
async fn the_healthcheck_subcommand_reports_whether_the_gateway_answers() {
    let key = Key::new();
    // Its upstream is down: the gateway is still alive.
    let gateway = spawn_gateway(gateway_settings("http://127.0.0.1:1", &key, 10, 10, &unique()), key).await;
    let port = gateway.address.rsplit(':').next().unwrap().parse().unwrap();
    tokio::task::spawn_blocking(move || {
        test_support::assert_healthcheck_subcommand(env!("CARGO_BIN_EXE_gateway"), port)
    })
    .await
    .unwrap();
}
