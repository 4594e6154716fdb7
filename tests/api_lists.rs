//! The list options of API.md: `limit` + `page_token`, `fields`, `ndjson`, filters.

mod common;

use common::server::Server;

use client::Method;
use serde_json::{json, Value};

#[test]
fn lists_page_project_filter_and_stream_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    for i in 0..5 {
        let (st, d) = s.json(
            Method::POST,
            "/v1/disks",
            json!({"name": format!("d{i}"), "size": "1MiB"}),
        );
        assert_eq!(st, 201, "{d}");
    }
    // Pages of two, following x-next-page-token, give every disk once, in creation order.
    let mut names = Vec::new();
    let mut path = "/v1/disks?limit=2".to_string();
    loop {
        let (st, headers, text) = s.call(Method::GET, &path, "");
        assert_eq!(st, 200, "{text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        assert!(page.as_array().unwrap().len() <= 2);
        names.extend(
            page.as_array()
                .unwrap()
                .iter()
                .map(|d| d["name"].as_str().unwrap().to_string()),
        );
        match headers.get("x-next-page-token") {
            Some(t) => path = format!("/v1/disks?limit=2&page_token={}", t.to_str().unwrap()),
            None => break,
        }
    }
    assert_eq!(names, ["d0", "d1", "d2", "d3", "d4"]);

    let (_, list) = s.json(
        Method::GET,
        "/v1/disks?fields=name,size&name=d3",
        Value::Null,
    );
    assert_eq!(list, json!([{"name": "d3", "size": 1 << 20}]));

    let (st, headers, text) = s.call(Method::GET, "/v1/disks?ndjson=true&fields=name", "");
    assert_eq!(st, 200);
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[4], json!({"name": "d4"}));

    let (st, e) = s.json(Method::GET, "/v1/disks?limit=0", Value::Null);
    assert_eq!(
        (st, e["error"]["code"].as_str()),
        (400, Some("invalid_value")),
        "{e}"
    );
    let (st, e) = s.json(Method::GET, "/v1/disks?page_token=nope", Value::Null);
    assert_eq!(st, 400, "{e}");
    assert_eq!(
        s.json(Method::GET, "/v1/instances?state=running", Value::Null)
            .1,
        json!([])
    );
    let (_, images) = s.json(Method::GET, "/v1/images?fields=name,kind", Value::Null);
    assert_eq!(images, json!([{"name": "kiln-probe", "kind": "kernel"}]));
}
