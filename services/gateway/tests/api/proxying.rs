//! The contract through the gateway, and what the proxy does to requests and responses.

use serde_json::{Value, json};

use crate::helpers::{
    DataService, Key, LOGS, TestUpstream, UPSTREAM_DATE, assert_problem, gateway_settings, spawn_gateway, unique,
};

#[tokio::test]
async fn the_items_contract_works_through_the_gateway() {
    let data = DataService::start().await;
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&data.address, &key, 1000, 1000), key.clone()).await;
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
    let gateway = spawn_gateway(gateway_settings(&data.address, &key, 1000, 1000), key.clone()).await;
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
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 1000, 1000), key.clone()).await;
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
    let gateway = spawn_gateway(gateway_settings(&format!("{by_name}/"), &key, 1000, 1000), key.clone()).await;
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
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000);
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
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000);
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
    let gateway = spawn_gateway(gateway_settings(&upstream.address, &key, 1000, 1000), key.clone()).await;
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
    let mut settings = gateway_settings(&data.address, &first, 1000, 1000);
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

#[tokio::test]
async fn a_route_prefix_with_a_pattern_is_refused_at_start() {
    let mut settings = gateway_settings("http://127.0.0.1:1", &Key::new(), 10, 10);
    settings.routes[0].prefix = "/api/{version}/items".to_owned();
    let service = observability::ServiceInfo { name: "gateway", version: "test", environment: "test".to_owned() };
    match gateway::startup::Application::build(settings, service).await {
        Err(error) => assert!(error.to_string().contains("/api/{version}/items"), "{error}"),
        Ok(_) => panic!("a prefix with a pattern must be refused"),
    }
}

#[tokio::test]
async fn the_healthcheck_subcommand_reports_whether_the_gateway_answers() {
    let key = Key::new();
    // Its upstream is down: the gateway is still alive.
    let gateway = spawn_gateway(gateway_settings("http://127.0.0.1:1", &key, 10, 10), key).await;
    let port = gateway.address.rsplit(':').next().unwrap().parse().unwrap();
    tokio::task::spawn_blocking(move || {
        test_support::assert_healthcheck_subcommand(env!("CARGO_BIN_EXE_gateway"), port)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn head_is_answered_wherever_get_is() {
    let data = DataService::start().await;
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&data.address, &key, 1000, 1000), key.clone()).await;
    let created = gateway.post("/api/v1/items").json(&json!({"name": "headed"})).send().await.unwrap();
    let location = created.headers()["location"].to_str().unwrap().to_owned();
    let got = gateway.get(&location).send().await.unwrap();
    let length = got.headers()["content-length"].clone();
    let etag = got.headers()["etag"].clone();
    for path in [location.as_str(), "/api/v1/items?limit=5"] {
        let head = gateway.client.head(gateway.url(path)).bearer_auth(&key.secret).send().await.unwrap();
        assert_eq!(head.status(), 200, "HEAD {path}");
        if path == location {
            assert_eq!(head.headers()["content-length"], length, "the length a GET would have");
            assert_eq!(head.headers()["etag"], etag);
        }
        assert!(head.bytes().await.unwrap().is_empty(), "no body");
    }
    // The data service itself, and the gateway's own endpoints.
    let direct = reqwest::Client::new().head(format!("{}{}", data.address, location.replace("/api/v1", "/v1")));
    assert_eq!(direct.send().await.unwrap().status(), 200);
    assert_eq!(gateway.client.head(gateway.url("/health")).send().await.unwrap().status(), 200);
    assert_eq!(gateway.client.head(format!("{}/metrics", gateway.admin)).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_idempotency_key_the_data_service_forbids_is_refused_with_its_own_problem() {
    let data = DataService::start().await;
    let key = Key::new();
    let gateway = spawn_gateway(gateway_settings(&data.address, &key, 1000, 1000), key.clone()).await;
    let long = "k".repeat(256);
    let direct = reqwest::Client::new()
        .post(format!("{}/v1/items", data.address))
        .header("Idempotency-Key", long.as_str())
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    let expected = assert_problem(direct, 400).await;
    let values: [&[u8]; 3] = [long.as_bytes(), b"caf\xc3\xa9", b"tab\tkey"];
    for value in values {
        let value = reqwest::header::HeaderValue::from_bytes(value).unwrap();
        let response =
            gateway.post("/api/v1/items").header("Idempotency-Key", value).json(&json!({"name": "x"})).send().await;
        let problem = assert_problem(response.unwrap(), 400).await;
        assert_eq!(problem["detail"], expected["detail"], "the data service's own words");
    }
    let listed: Value = gateway.get("/api/v1/items").send().await.unwrap().json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().is_empty(), "nothing was created");
}

/// The status line the gateway answers a request whose body stops after `sent` bytes.
async fn status_of_stalled_request(gateway: &crate::helpers::TestGateway, head: &str, sent: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = gateway.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let request = format!(
        "POST /api/v1/items/echo HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n{head}\r\n\r\n",
        gateway.key.secret
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(sent).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer, not a hang")
        .unwrap();
    String::from_utf8_lossy(&answer[..read]).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_not_504() {
    let upstream = TestUpstream::start();
    let key = Key::new();
    let mut settings = gateway_settings(&upstream.address, &key, 1000, 1000);
    settings.routes[0].timeout_ms = 300;
    let gateway = spawn_gateway(settings, key.clone()).await;
    // Small: read whole before sending. Large: streamed. Chunked: streamed.
    let cases: [(&str, &[u8]); 3] = [
        ("Content-Length: 100", b"only ten b"),
        ("Content-Length: 200000", b"only ten b"),
        ("Transfer-Encoding: chunked", b"a\r\nonly ten b\r\n"),
    ];
    for (head, sent) in cases {
        let status = status_of_stalled_request(&gateway, head, sent).await;
        assert!(status.starts_with("HTTP/1.1 408"), "{head}: {status}");
    }
    // A slow upstream is still a 504.
    assert_eq!(gateway.get("/api/v1/items/slow?ms=2000").send().await.unwrap().status(), 504);
}
