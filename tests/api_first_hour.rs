//! The API as a new user meets it, over a real `kiln serve`: JSON bodies as curl sends them,
//! strict queries (unknown parameters, states and fields named in a 400), operations paged and
//! filtered by instance, events that name their resource, boot settings changed by PATCH while
//! stopped, vCPUs bounded by the host's CPUs as memory is by its memory.

mod common;

use client::Method;
use common::server::{action, Server};
use serde_json::{json, Value};

fn create(s: &Server, name: &str, cmdline: &str) {
    let (st, v) = s.json(
        Method::POST,
        "/v1/instances",
        json!({"name": name, "vcpus": 1, "memory": "64MiB",
               "boot": {"kernel": "kiln-probe", "cmdline": cmdline}}),
    );
    assert_eq!(st, 201, "{v}");
}

#[test]
fn json_bodies_as_curl_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let body = br#"{"name": "d1", "size": "1MiB"}"#.to_vec();
    // curl -d: application/x-www-form-urlencoded.
    let (st, _, b) = s.request(
        Method::POST,
        "/v1/disks",
        "application/x-www-form-urlencoded",
        &[],
        body,
    );
    assert_eq!(st, 201, "{}", String::from_utf8_lossy(&b));
    // No Content-Type at all.
    let reply = s
        .block_on(
            s.client()
                .request(Method::POST, "/v1/disks")
                .raw_body(client::body::bytes(
                    br#"{"name": "d2", "size": "1MiB"}"#.to_vec(),
                ))
                .send(),
        )
        .unwrap();
    assert_eq!(reply.status.as_u16(), 201, "{:?}", reply.body);
    // A type that is clearly not JSON is still 415.
    let (st, _, b) = s.request(
        Method::POST,
        "/v1/disks",
        "text/plain",
        &[],
        br#"{"name": "d3", "size": "1MiB"}"#.to_vec(),
    );
    assert_eq!(st, 415, "{}", String::from_utf8_lossy(&b));
}

#[test]
fn unknown_query_parameters_states_and_fields_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "q1", "console=ttyS0 probe=hlt");
    for (path, word) in [
        ("/v1/instances?sort=name", "sort"),
        ("/v1/instances?state=bogus", "bogus"),
        ("/v1/instances?fields=bogus", "bogus"),
        ("/v1/disks?state=running", "running"),
        ("/v1/images?state=running", "running"),
        ("/v1/operations?colour=red", "colour"),
        ("/v1/operations?state=bogus", "bogus"),
        ("/v1/events?since=0&follow=false&x=1", "x"),
        ("/v1/instances/q1/console?lines=3", "lines"),
    ] {
        let (st, v) = s.json(Method::GET, path, Value::Null);
        assert_eq!(st, 400, "{path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(word), "{path}: {msg}");
    }
    // What is right still works.
    let (st, v) = s.json(
        Method::GET,
        "/v1/instances?state=stopped&fields=name,state",
        Value::Null,
    );
    assert_eq!((st, v), (200, json!([{"name": "q1", "state": "stopped"}])));
}

#[test]
fn operations_page_and_filter_by_instance_and_events_name_resources() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "o1", "console=ttyS0 probe=wait-powerbutton");
    create(&s, "o2", "console=ttyS0 probe=wait-powerbutton");
    for name in ["o1", "o2", "o1"] {
        assert_eq!(action(&s, name, json!({"action": "start"})).0, 200);
        assert_eq!(action(&s, name, json!({"action": "stop"})).0, 200);
    }
    let (st, all) = s.json(Method::GET, "/v1/operations?instance=o1", Value::Null);
    assert_eq!(st, 200);
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
    let (_, id) = s.json(Method::GET, "/v1/instances/o1", Value::Null);
    let resource = format!("/v1/instances/{}", id["id"].as_str().unwrap());
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["resource"] == resource));
    let (st, headers, body) = s.call(Method::GET, "/v1/operations?instance=o1&limit=3", "");
    assert_eq!(st, 200);
    let page: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(page.as_array().unwrap().len(), 3);
    let token = headers["x-next-page-token"].to_str().unwrap().to_string();
    let (_, rest) = s.json(
        Method::GET,
        &format!("/v1/operations?instance=o1&limit=3&page_token={token}"),
        Value::Null,
    );
    assert_eq!(rest.as_array().unwrap().len(), 1);
    let (st, v) = s.json(Method::GET, "/v1/operations?instance=ghost", Value::Null);
    assert_eq!((st, v["error"]["code"].as_str()), (404, Some("not_found")));
    // Events name what they are about; follow=false ends the stream.
    let (st, _, text) = s.call(Method::GET, "/v1/events?since=0&follow=false", "");
    assert_eq!(st, 200);
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| serde_json::from_str(d.trim()).unwrap())
        .collect();
    assert!(!events.is_empty());
    for e in &events {
        assert!(
            e["name"] == "o1" || e["name"] == "o2",
            "an event without its name: {e}"
        );
    }
}

#[test]
fn patch_changes_boot_settings_while_stopped_and_vcpus_are_bounded_by_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "p1", "console=ttyS0 probe=wait-powerbutton");
    let (st, v) = s.json(
        Method::PATCH,
        "/v1/instances/p1",
        json!({"boot": {"cmdline": "console=ttyS0 probe=cmdline,wait-powerbutton"}}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v["boot"]["cmdline"],
        "console=ttyS0 probe=cmdline,wait-powerbutton"
    );
    assert_eq!(v["generation"], 2);
    assert_eq!(action(&s, "p1", json!({"action": "start"})).0, 200);
    assert!(s.wait_console("p1", "PROBE-OK cmdline console=ttyS0 probe=cmdline", 1));
    let (st, v) = s.json(
        Method::PATCH,
        "/v1/instances/p1",
        json!({"boot": {"cmdline": "x"}}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (409, Some("invalid_state"))
    );
    assert_eq!(action(&s, "p1", json!({"action": "stop"})).0, 200);
    let (st, v) = s.json(
        Method::PATCH,
        "/v1/instances/p1",
        json!({"boot": {"kernel": "no-such-image"}}),
    );
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("boot.kernel"),
        "{v}"
    );
    // More vCPUs than the host has: refused as too much memory is.
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    let (st, v) = s.json(
        Method::POST,
        "/v1/instances",
        json!({"name": "big", "vcpus": cpus + 1, "memory": "64MiB",
               "boot": {"kernel": "kiln-probe"}}),
    );
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("insufficient_capacity")),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("CPUs"),
        "{v}"
    );
    let (st, _) = s.json(
        Method::PATCH,
        "/v1/instances/p1",
        json!({"vcpus": cpus + 1}),
    );
    assert_eq!(st, 413);
    let (st, v) = s.json(Method::PATCH, "/v1/instances/p1", json!({"vcpus": cpus}));
    assert_eq!(st, 200, "{v}");
}

#[test]
fn if_none_match_gives_304_until_the_answer_changes() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "c1", "console=ttyS0 probe=wait-powerbutton");
    let (st, h, _) = s.call(Method::GET, "/v1/instances/c1", "");
    assert_eq!(st, 200);
    let tag = h["etag"].to_str().unwrap().to_string();
    let (st, h2, body) = s.request(
        Method::GET,
        "/v1/instances/c1",
        "",
        &[("if-none-match", &tag)],
        vec![],
    );
    assert_eq!(st, 304, "{}", String::from_utf8_lossy(&body));
    assert!(body.is_empty());
    assert_eq!(h2["etag"].to_str().unwrap(), tag);
    // The state changes without a new definition: the tag changes with it.
    assert_eq!(action(&s, "c1", json!({"action": "start"})).0, 200);
    let (st, h3, _) = s.request(
        Method::GET,
        "/v1/instances/c1",
        "",
        &[("if-none-match", &tag)],
        vec![],
    );
    assert_eq!(st, 200);
    let running = h3["etag"].to_str().unwrap().to_string();
    assert_ne!(running, tag);
    // The GET's tag still guards a change (If-Match reads the definition's revision in it).
    let (st, _, v) = s.json_with(
        Method::PATCH,
        "/v1/instances/c1",
        json!({"description": "web"}),
        &[("if-match", &running)],
    );
    assert_eq!(st, 200, "{v}");
    let (st, _, v) = s.json_with(
        Method::PATCH,
        "/v1/instances/c1",
        json!({"description": "web"}),
        &[("if-match", &running)],
    );
    assert_eq!(st, 412, "{v}");
    assert_eq!(action(&s, "c1", json!({"action": "stop"})).0, 200);
}

#[test]
fn a_reset_has_happened_when_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    create(&s, "r1", "console=ttyS0 probe=hlt");
    assert_eq!(action(&s, "r1", json!({"action": "start"})).0, 200);
    // Each reset (and forced reboot) answers once the guest has booted again: the next
    // action finds the instance running, never rebooting.
    for (i, a) in [
        json!({"action": "reset"}),
        json!({"action": "reboot", "force": true}),
        json!({"action": "reset"}),
    ]
    .into_iter()
    .enumerate()
    {
        // (Once the guest has halted: a reset early in a boot can leave the next boot silent,
        // a VMM matter reported separately.)
        assert!(s.wait_console("r1", "PROBE-OK hlt", i + 1));
        let (st, v) = action(&s, "r1", a);
        assert_eq!((st, v["state"].as_str()), (200, Some("running")), "{v}");
        assert!(
            s.wait_console("r1", "KILN-PROBE v1", i + 2),
            "{i}: {}",
            s.console("r1")
        );
    }
    let (st, v) = action(&s, "r1", json!({"action": "stop", "force": true}));
    assert_eq!(st, 200, "{v}");
}
