//! The OpenAPI document served at `/v1/openapi.json` and the routes the router serves agree:
//! no route served but undocumented, none documented but not served.

mod common;

use std::collections::BTreeSet;

use client::Method;
use common::Server;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

#[tokio::test]
async fn openapi_matches_routes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::unix(&dir.path().join("kiln.sock"), api::router(common::state())).await;

    let reply = server.get("/v1/openapi.json").await;
    assert_eq!(reply.status, 200);
    let doc = reply.json();
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "{version}");

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                documented.insert(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    let served: BTreeSet<String> = api::routes().iter().map(ToString::to_string).collect();

    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in the OpenAPI document: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in the OpenAPI document but not served: {unserved:?}"
    );
    assert!(served.contains("GET /v1") && served.contains("GET /metrics"));

    // And the router really answers each documented operation (not the 404 fallback, not 405).
    for op in &documented {
        let (method, path) = op.split_once(' ').unwrap();
        let concrete = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        let reply = server
            .send(method.parse::<Method>().unwrap(), &concrete, &[], "")
            .await;
        assert_ne!(reply.status, 405, "{op}: {}", reply.text());
        if reply.status == 404 {
            let message = reply.json()["error"]["message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(!message.starts_with("no such path"), "{op}: {message}");
        }
    }
    server.stop().await;
}
