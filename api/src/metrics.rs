//! The Prometheus registry of the process and the API's own metrics.
//!
//! [`Metrics`] wraps a `prometheus-client` registry (prefix `kiln_`). The API records
//! `kiln_api_requests_total{method,route,status}` and
//! `kiln_api_request_duration_seconds{method,route}` for every request; other parts of Kiln add
//! their own metrics with [`Metrics::register`] (a counter or gauge they keep and update) or
//! [`Metrics::register_collector`] (values computed at each scrape, such as instances by state).
//! `GET /metrics` serves the registry as OpenMetrics text.
//!
//! [`Metrics::register_vmm`] adds the VMM's scrape-time families: `kiln_instances{state}`
//! (every state, zeros included), `kiln_vcpu_exits_total{reason}` (every vCPU of the process,
//! every reason, zeros included) and `kiln_console_bytes_total{instance}` (serial output bytes
//! of each instance since it was defined or loaded), and for running instances the device
//! counters `kiln_block_*_total{instance,disk}` and `kiln_net_*_total{instance,nic}`.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use control::{InstanceState, Manager};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Metric, Registry};

use crate::error::ApiError;

/// Content type of `GET /metrics` (the text format `prometheus-client` writes).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Route label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RouteLabels {
    method: String,
    route: String,
}

/// The metrics registry shared by the whole process. Cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with the API's request counter and latency histogram.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kiln");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "api_requests",
            "API requests by method, route and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~26 s
            Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
        });
        registry.register(
            "api_request_duration_seconds",
            "API request latency by method and route, in seconds",
            latency.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
        }
    }

    /// Adds a metric (a `Counter`, `Gauge`, `Family`, `Histogram`… of `prometheus-client`)
    /// that the caller keeps a clone of and updates. `name` gets the `kiln_` prefix.
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        self.lock().register(name, help, metric);
    }

    /// Adds a collector whose values are computed at each scrape.
    pub fn register_collector(&self, collector: Box<dyn Collector>) {
        self.lock().register_collector(collector);
    }

    /// Adds the VMM's metrics, computed at each scrape: instances of `manager` by state,
    /// vCPU exits of the process by reason, console bytes per instance. The registry keeps
    /// only a weak reference to `manager`.
    pub fn register_vmm(&self, manager: &Arc<Manager>) {
        self.register_collector(Box::new(VmmCollector {
            manager: Arc::downgrade(manager),
        }));
    }

    /// The registry as OpenMetrics text.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.lock())?;
        Ok(text)
    }

    /// Counts one finished request.
    pub fn record_request(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status,
            })
            .inc();
        self.latency
            .get_or_create(&RouteLabels {
                method: method.to_string(),
                route: route.to_string(),
            })
            .observe(seconds);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every instance state, in the order `kiln_instances` lists them.
const STATES: [InstanceState; 7] = InstanceState::ALL;

/// Position of `state` in [`STATES`].
fn state_index(state: InstanceState) -> usize {
    STATES
        .iter()
        .position(|s| *s == state)
        .expect("ALL has every state")
}

/// The VMM's scrape-time metrics (see [`Metrics::register_vmm`]).
struct VmmCollector {
    manager: Weak<Manager>,
}

impl std::fmt::Debug for VmmCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmCollector").finish_non_exhaustive()
    }
}

impl Collector for VmmCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let manager = self.manager.upgrade();
        let instances = manager.as_ref().map(|m| m.list()).unwrap_or_default();

        let mut by_state = [0i64; STATES.len()];
        for i in &instances {
            by_state[state_index(i.status.state)] += 1;
        }
        let mut family = encoder.encode_descriptor(
            "instances",
            "Instances by state.",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in STATES.iter().zip(by_state) {
            let labels = [("state", state.to_string())];
            ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "vcpu_exits",
            "vCPU exits (KVM_RUN returns) of every VM of the process, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in vmm::exit_counts() {
            let labels = [("reason", reason.label())];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "vm_pool_ready",
            "VMs built ahead of starts and ready now, by guest memory size in bytes (kiln serve --vm-pool).",
            None,
            MetricType::Gauge,
        )?;
        for (memory, n) in manager
            .as_ref()
            .map(|m| m.vm_shells_ready())
            .unwrap_or_default()
        {
            let labels = [("memory", memory.to_string())];
            ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "console_bytes",
            "Serial console output bytes by instance (since the instance was created or loaded).",
            None,
            MetricType::Counter,
        )?;
        for i in &instances {
            let Some(ring) = manager
                .as_ref()
                .and_then(|m| m.console(&i.def.id.to_string()).ok())
            else {
                continue; // deleted since the list was taken
            };
            let labels = [("instance", i.def.name.as_str())];
            ConstCounter::new(ring.bounds().1).encode(family.encode_family(&labels)?)?;
        }
        self.encode_devices(&mut encoder, manager.as_deref(), &instances)
    }
}

/// The device counter families: `kiln_block_<counter>_total{instance,disk}` and
/// `kiln_net_<counter>_total{instance,nic}`, for running instances (from zero at each boot).
const DEVICE_FAMILIES: [(&str, &str, &str); 7] = [
    ("block", "requests", "virtio-blk requests completed"),
    ("block", "errors", "virtio-blk requests that failed"),
    ("block", "read_bytes", "bytes the guest read from the disk"),
    ("block", "write_bytes", "bytes the guest wrote to the disk"),
    ("net", "rx_frames", "frames delivered to the guest"),
    ("net", "tx_frames", "frames the guest sent"),
    (
        "net",
        "dropped",
        "frames dropped (malformed, too large, TAP errors)",
    ),
];

impl VmmCollector {
    fn encode_devices(
        &self,
        encoder: &mut DescriptorEncoder,
        manager: Option<&Manager>,
        instances: &[control::InstanceView],
    ) -> Result<(), std::fmt::Error> {
        let devices: Vec<(String, Vec<control::DeviceCounters>)> = instances
            .iter()
            .filter(|i| !i.status.state.is_stopped())
            .filter_map(|i| {
                let m = manager?;
                Some((i.def.name.clone(), m.device_counters(&i.def.id.to_string())))
            })
            .collect();
        for (kind, counter, help) in DEVICE_FAMILIES {
            let name = format!("{kind}_{counter}");
            let mut family = encoder.encode_descriptor(
                &name,
                &format!("{help}, by instance and device (from zero at each boot)."),
                None,
                MetricType::Counter,
            )?;
            let device_label = if kind == "block" { "disk" } else { "nic" };
            for (instance, devs) in &devices {
                for d in devs.iter().filter(|d| d.kind == kind) {
                    let Some((_, v)) = d.counters.iter().find(|(c, _)| *c == counter) else {
                        continue;
                    };
                    let labels = [
                        ("instance", instance.as_str()),
                        (device_label, d.device.as_str()),
                    ];
                    ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// Middleware: records every request's route, status and latency.
pub(crate) async fn record(State(metrics): State<Metrics>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| UNMATCHED_ROUTE.to_string());
    let started = Instant::now();
    let response = next.run(req).await;
    metrics.record_request(
        &method,
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Prometheus metrics of the process.
///
/// API requests and latencies, and whatever other parts of Kiln registered (instances by
/// state, vCPU exits, device counters), in the OpenMetrics text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "server",
    operation_id = "metrics",
    responses(
        (status = 200, description = "Prometheus metrics (OpenMetrics text format)",
         body = String, content_type = "application/openmetrics-text"),
    )
)]
pub(crate) async fn get_metrics(State(metrics): State<Metrics>) -> Result<Response, ApiError> {
    let text = metrics.encode().map_err(ApiError::internal)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(METRICS_CONTENT_TYPE),
        )],
        text,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::gauge::Gauge;

    #[test]
    fn records_and_encodes() {
        let metrics = Metrics::new();
        metrics.record_request("GET", "/v1", 200, 0.001);
        metrics.record_request("GET", "/v1", 200, 0.002);
        let gauge = Gauge::<i64>::default();
        metrics.register("instances_running", "Running instances", gauge.clone());
        gauge.set(3);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(r#"kiln_api_requests_total{method="GET",route="/v1",status="200"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("kiln_api_request_duration_seconds_bucket"),
            "{text}"
        );
        assert!(text.contains("kiln_instances_running 3"), "{text}");
    }

    #[test]
    fn vmm_families_list_every_state_and_reason() {
        let metrics = Metrics::new();
        // A manager that is gone: no instances, but every family and label is still there.
        metrics.register_collector(Box::new(VmmCollector {
            manager: Weak::new(),
        }));
        let text = metrics.encode().unwrap();
        for state in STATES {
            assert!(
                text.contains(&format!("kiln_instances{{state=\"{state}\"}} 0\n")),
                "{text}"
            );
        }
        for reason in vmm::ExitReason::ALL {
            let name = format!("kiln_vcpu_exits_total{{reason=\"{}\"}} ", reason.label());
            assert!(text.contains(&name), "{text}");
        }
        assert!(text.contains("# TYPE kiln_instances gauge"), "{text}");
        assert!(text.contains("# TYPE kiln_vcpu_exits counter"), "{text}");
        assert!(text.contains("# TYPE kiln_console_bytes counter"), "{text}");
        assert!(!text.contains("kiln_console_bytes_total{"), "{text}");
    }
}
