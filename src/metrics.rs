//! Prometheus metrics for what an operator watches: placement churn and event delivery.
//!
//! Handles are cheap clones of shared atomics; a component owns its set and the application
//! registers it with its own [`Registry`] under a prefix of its choosing.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Metrics of one [`crate::placement::PartitionManager`].
#[derive(Clone, Debug, Default)]
pub struct PlacementMetrics {
    /// Owner lookups.
    pub lookups: Counter,
    /// Lookups answered from the owner cache.
    pub cache_hits: Counter,
    /// Cache entries forgotten because the cache was full.
    pub evictions: Counter,
    /// Identities whose owner changed on topology updates.
    pub moved: Counter,
    /// Topologies ignored because they were not newer.
    pub stale_updates: Counter,
    /// Version of the applied topology.
    pub topology_version: Gauge,
    /// Members in the applied topology.
    pub members: Gauge,
    /// Identities whose owner is remembered.
    pub tracked: Gauge,
}

impl PlacementMetrics {
    /// Registers every metric under `registry` (names are prefixed by the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register("placement_lookups", "Owner lookups", self.lookups.clone());
        registry.register(
            "placement_cache_hits",
            "Owner lookups answered from the cache",
            self.cache_hits.clone(),
        );
        registry.register(
            "placement_cache_evictions",
            "Owner cache entries evicted at capacity",
            self.evictions.clone(),
        );
        registry.register(
            "placement_moved_identities",
            "Identities whose owner changed on topology updates",
            self.moved.clone(),
        );
        registry.register(
            "placement_stale_topologies",
            "Topologies ignored because their version was not newer",
            self.stale_updates.clone(),
        );
        registry.register(
            "topology_version",
            "Version of the applied topology",
            self.topology_version.clone(),
        );
        registry.register(
            "topology_members",
            "Members in the applied topology",
            self.members.clone(),
        );
        registry.register(
            "placement_tracked_identities",
            "Identities whose owner is remembered",
            self.tracked.clone(),
        );
    }
}

/// Metrics of one [`crate::events::EventStream`].
#[derive(Clone, Debug, Default)]
pub struct EventMetrics {
    /// Events published.
    pub published: Counter,
    /// Events a subscriber missed because it fell behind.
    pub lagged: Counter,
}

impl EventMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "events_published",
            "Cluster events published",
            self.published.clone(),
        );
        registry.register(
            "events_lagged",
            "Cluster events missed by subscribers that fell behind",
            self.lagged.clone(),
        );
    }
}

/// Serves `registry` in the Prometheus text format at `GET /metrics` on `listener`, forever.
///
/// A deliberately small HTTP/1.1 responder (one request per connection, 8 KiB request limit,
/// 5 s read deadline) so a scrape endpoint needs no web framework.
#[cfg(not(madsim))]
pub async fn serve_http(listener: tokio::net::TcpListener, registry: std::sync::Arc<Registry>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while len < buf.len() {
                    let n = conn.read(&mut buf[len..]).await?;
                    if n == 0 {
                        break;
                    }
                    len += n;
                    if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let response = if head.starts_with("GET /metrics ") {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    Err(_) => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                }
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = conn.write_all(response.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_in_text_format() {
        let mut registry = Registry::with_prefix("shoal");
        let m = PlacementMetrics::default();
        m.register(&mut registry);
        m.lookups.inc_by(3);
        m.topology_version.set(7);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(out.contains("shoal_placement_lookups_total 3"), "{out}");
        assert!(out.contains("shoal_topology_version 7"), "{out}");
    }
}
