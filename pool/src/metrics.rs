//! The controller's `/metrics` (Prometheus text, by the Prometheus project's Rust client):
//! servers by state, promote latency and create→standby latency as histograms, failures by
//! reason, API calls and retries.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub struct Metrics {
    registry: Registry,
    servers: Family<Labels, Gauge>,
    promote: Family<Labels, Histogram>,
    create_to_standby: Histogram,
    failures: Family<Labels, Counter>,
    api_calls: Family<Labels, Counter>,
    api_retries: Family<Labels, Counter>,
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
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("basalt_pool");
        let servers = Family::<Labels, Gauge>::default();
        // 50 ms … ~100 s: a warm promote is well under a second, a cold one minutes.
        let promote = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 12))
        });
        // 1 s … ~1 h.
        let create_to_standby = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        let failures = Family::<Labels, Counter>::default();
        let api_calls = Family::<Labels, Counter>::default();
        let api_retries = Family::<Labels, Counter>::default();
        registry.register("servers", "Servers of the pool by state", servers.clone());
        registry.register(
            "promote_seconds",
            "Demand to joined: warm (a standby) or cold (created for the demand)",
            promote.clone(),
        );
        registry.register(
            "create_to_standby_seconds",
            "Server created to its node reporting standby",
            create_to_standby.clone(),
        );
        registry.register("failures", "Failures by reason", failures.clone());
        registry.register(
            "api_calls",
            "Calls to the provider and node APIs",
            api_calls.clone(),
        );
        registry.register(
            "api_retries",
            "Calls that failed transiently and are retried (on the next pass)",
            api_retries.clone(),
        );
        Metrics {
            registry,
            servers,
            promote,
            create_to_standby,
            failures,
            api_calls,
            api_retries,
        }
    }

    pub fn set_servers(&self, state: &str, n: usize) {
        self.servers
            .get_or_create(&labels(&[("state", state)]))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// `path` is `warm` or `cold`.
    pub fn promoted(&self, path: &str, took: Duration) {
        self.promote
            .get_or_create(&labels(&[("path", path)]))
            .observe(took.as_secs_f64());
    }

    pub fn reached_standby(&self, took: Duration) {
        self.create_to_standby.observe(took.as_secs_f64());
    }

    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// One call to `api` (`provider` or `node`); `retried` when it failed transiently.
    pub fn call(&self, api: &str, op: &str, retried: bool) {
        let l = labels(&[("api", api), ("op", op)]);
        self.api_calls.get_or_create(&l).inc();
        if retried {
            self.api_retries.get_or_create(&l).inc();
        }
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_its_labels() {
        let m = Metrics::new();
        m.set_servers("standby", 2);
        m.promoted("warm", Duration::from_millis(300));
        m.reached_standby(Duration::from_secs(40));
        m.failure("promote");
        m.call("provider", "create", true);
        m.call("provider", "create", false);
        let text = m.render();
        for line in [
            "basalt_pool_servers{state=\"standby\"} 2",
            "basalt_pool_promote_seconds_count{path=\"warm\"} 1",
            "basalt_pool_create_to_standby_seconds_count 1",
            "basalt_pool_failures_total{reason=\"promote\"} 1",
            "basalt_pool_api_calls_total{api=\"provider\",op=\"create\"} 2",
            "basalt_pool_api_retries_total{api=\"provider\",op=\"create\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
        assert!(text.contains("le=\"0.4\""), "{text}");
    }
}
