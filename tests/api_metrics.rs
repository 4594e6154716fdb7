//! `GET /metrics` of `kiln serve`: instances by state, vCPU exits by reason, console bytes per
//! instance and the API's own request counter and latency histogram, in Prometheus text.

mod common;

use common::server::{action, Server};

use client::Method;
use serde_json::json;

/// The samples of a scrape: (name with labels, value).
fn scrape(s: &Server) -> (String, Vec<(String, f64)>) {
    let (st, headers, text) = s.call(Method::GET, "/metrics", "");
    assert_eq!(st, 200, "{text}");
    let ct = headers["content-type"].to_str().unwrap();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v = v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (k.to_string(), v)
        })
        .collect();
    (text, samples)
}

fn value(samples: &[(String, f64)], key: &str) -> Option<f64> {
    samples.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

const STATES: [&str; 7] = [
    "stopped",
    "starting",
    "running",
    "paused",
    "stopping",
    "rebooting",
    "failed",
];

#[test]
fn metrics_count_instances_exits_console_bytes_and_requests() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &[]);
    for (name, start) in [("busy", true), ("idle", false)] {
        let body = json!({"name": name, "vcpus": 1, "memory": "64MiB", "start": start,
            "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0 probe=cmdline,hlt"}});
        let (st, inst) = s.json(Method::POST, "/v1/instances", body);
        assert!(st == 201 || st == 202, "{st} {inst}");
    }
    assert!(
        s.wait_console("busy", "PROBE-OK hlt", 1),
        "{}",
        s.console("busy")
    );
    let console = s.console("busy");
    assert!(console.starts_with("KILN-PROBE v1 "), "{console}");

    let (text, samples) = scrape(&s);
    let v = |k: &str| value(&samples, k).unwrap_or_else(|| panic!("no {k} in\n{text}"));

    // Instances by state: every state, zeros included.
    assert!(text.contains("# TYPE kiln_instances gauge"), "{text}");
    for state in STATES {
        let want = match state {
            "running" | "stopped" => 1.0,
            _ => 0.0,
        };
        assert_eq!(
            v(&format!("kiln_instances{{state=\"{state}\"}}")),
            want,
            "{state}"
        );
    }

    // vCPU exits by reason: every reason present; the probe's serial output is port I/O.
    assert!(text.contains("# TYPE kiln_vcpu_exits counter"), "{text}");
    for reason in ["io", "mmio", "hlt", "intr", "shutdown", "internal_error"] {
        v(&format!("kiln_vcpu_exits_total{{reason=\"{reason}\"}}"));
    }
    assert!(
        v("kiln_vcpu_exits_total{reason=\"io\"}") >= console.len() as f64,
        "one OUT per console byte at least"
    );
    assert_eq!(v("kiln_vcpu_exits_total{reason=\"internal_error\"}"), 0.0);

    // Console bytes: at least what the console showed, for each instance.
    assert!(text.contains("# TYPE kiln_console_bytes counter"), "{text}");
    assert!(v("kiln_console_bytes_total{instance=\"busy\"}") >= console.len() as f64);
    assert_eq!(v("kiln_console_bytes_total{instance=\"idle\"}"), 0.0);

    // The API's own metrics saw the requests above.
    assert!(
        v("kiln_api_requests_total{method=\"POST\",route=\"/v1/instances\",status=\"201\"}") >= 1.0
    );
    assert!(
        v("kiln_api_requests_total{method=\"GET\",route=\"/v1/instances/{instance}/console\",status=\"200\"}")
            >= 1.0
    );
    assert!(
        samples.iter().any(|(k, n)| k.starts_with(
            "kiln_api_request_duration_seconds_count{method=\"GET\",route=\"/v1/instances/{instance}/console\"}"
        ) && *n >= 1.0),
        "{text}"
    );

    // After a stop the gauges follow; the console counter stays.
    let (st, inst) = action(&s, "busy", json!({"action": "stop", "force": true}));
    assert_eq!(st, 200, "{inst}");
    let (text, samples) = scrape(&s);
    let v = |k: &str| value(&samples, k).unwrap_or_else(|| panic!("no {k} in\n{text}"));
    assert_eq!(v("kiln_instances{state=\"running\"}"), 0.0);
    assert_eq!(v("kiln_instances{state=\"stopped\"}"), 2.0);
    assert!(v("kiln_console_bytes_total{instance=\"busy\"}") >= console.len() as f64);
    assert!(
        v("kiln_vcpu_exits_total{reason=\"intr\"}") >= 1.0,
        "the stop kicked the vCPU"
    );

    // A deleted instance leaves the console family.
    let (st, _, _) = s.call(Method::DELETE, "/v1/instances/idle", "");
    assert_eq!(st, 204);
    let (text, samples) = scrape(&s);
    assert!(
        value(&samples, "kiln_console_bytes_total{instance=\"idle\"}").is_none(),
        "{text}"
    );
    assert_eq!(
        value(&samples, "kiln_instances{state=\"stopped\"}"),
        Some(1.0)
    );
}

#[test]
fn metrics_count_each_disk_of_a_running_instance() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start_with(dir.path(), &[]);
    assert_eq!(
        s.json(
            Method::POST,
            "/v1/disks",
            json!({"name": "d", "size": "1MiB"})
        )
        .0,
        201
    );
    let body = json!({"name": "m", "vcpus": 1, "memory": "64MiB", "disks": [{"disk": "d"}],
        "boot": {"kernel": "kiln-probe",
                 "cmdline": "console=ttyS0 probe=blk-write:0:0:64:3,blk-verify:0:0:64:3,hlt"}});
    assert_eq!(s.json(Method::POST, "/v1/instances", body).0, 201);
    assert_eq!(action(&s, "m", json!({"action": "start"})).0, 200);
    assert!(s.wait_console("m", "PROBE-OK hlt", 1), "{}", s.console("m"));
    let (text, samples) = scrape(&s);
    let key = |c: &str| format!("kiln_block_{c}_total{{instance=\"m\",disk=\"d\"}}");
    assert_eq!(
        value(&samples, &key("write_bytes")),
        Some(32768.0),
        "{text}"
    );
    assert_eq!(value(&samples, &key("read_bytes")), Some(32768.0), "{text}");
    assert!(
        value(&samples, &key("requests")).unwrap_or(0.0) >= 2.0,
        "{text}"
    );
    assert_eq!(value(&samples, &key("errors")), Some(0.0), "{text}");
    assert!(text.contains("# TYPE kiln_net_rx_frames counter"), "{text}");
}
