//! The provider's settings: defaults, the Downward API and `SHOAL_*` variables, validation.

use super::*;

/// Settings of a [`KubernetesProvider`].
#[derive(Clone, Debug)]
pub struct KubernetesProviderConfig {
    /// The namespace of the Leases (and of the Service).
    pub namespace: String,
    /// A headless Service whose EndpointSlices gate membership: a member is listed only while
    /// its Pod's endpoint is serving and not terminating. `None`: Leases alone.
    pub service: Option<String>,
    /// How long a member may go without renewing its Lease (whole seconds: the API's unit).
    pub lease_duration: Duration,
    /// How often the Lease is renewed (default: a third of the duration).
    pub renew_interval: Option<Duration>,
    /// Deadline of every API call (a watch: of opening it) but lists.
    pub request_timeout: Duration,
    /// Deadline of a list (default: six request deadlines, at least 30 s): a list of
    /// thousands of Leases is megabytes, and a slow one must not fail for good.
    pub list_timeout: Option<Duration>,
    /// A relist after `410 Gone` waits a random time up to this long (default 1 s), so that
    /// members sent to relist at the same moment (an API-server restart) do not list together.
    pub relist_jitter: Duration,
    /// Objects per list page (`limit`; default 500, client-go's): a list of thousands of
    /// Leases comes in pages under the API server's response limits. `None`: one page.
    pub list_page_size: Option<u32>,
    /// Retry pacing of failed renewals and watches (capped at the renew interval).
    pub backoff: Backoff,
    /// A watch stream that carries nothing (not even a bookmark) for this long is reopened.
    pub watch_idle_timeout: Duration,
    /// How long `start_member`/`start_client` wait for the first topology.
    pub startup_timeout: Duration,
    /// This member's Pod: the Lease's owner (Kubernetes deletes the Lease with the Pod) and the
    /// endpoint that must be serving when a Service is configured.
    pub pod: Option<ObjectReference>,
    /// Extra room before this member declares its own Lease lost (default: a tenth of the
    /// duration). See [`LeaseTiming`].
    pub lease_margin: Option<Duration>,
    /// The largest clock rate error assumed for any node, in parts per million (default 2%).
    pub max_clock_drift_ppm: u32,
    /// Deadline of calls to other members' partition managers.
    pub partition_rpc_timeout: Duration,
    /// How members learn that a member is alive (default: [`Heartbeats::SHARDED`], whose
    /// watch events grow with N, not N² as with [`Heartbeats::Everyone`]). Members of both
    /// settings can share a cluster while it migrates (docs/providers/kubernetes.md,
    /// "Migrating"); members with sharded heartbeats must all use the same one.
    pub heartbeats: Heartbeats,
    /// Topologies are issued at most this often (default 50 ms): a change after a quiet while
    /// goes out at once, a burst of them (a cluster of thousands starting, a Service's
    /// endpoints changing Pod by Pod) together, so each node applies one topology per burst,
    /// not one per member (each costs every node O(members)). Zero issues every change at
    /// once. (Off by default until 2026-12-07: with it the simulator found an actor's state
    /// rolled back by the activation layer's hand-off, fixed since: docs/activation.md.)
    pub min_publish_interval: Duration,
}

impl KubernetesProviderConfig {
    /// Defaults for Leases in `namespace`: a 15 s duration renewed every 5 s (client-go's
    /// leader-election defaults), no Service.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            service: None,
            lease_duration: Duration::from_secs(15),
            renew_interval: None,
            request_timeout: Duration::from_secs(5),
            list_timeout: None,
            relist_jitter: Duration::from_secs(1),
            list_page_size: Some(500),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            watch_idle_timeout: Duration::from_secs(90),
            startup_timeout: Duration::from_secs(30),
            pod: None,
            lease_margin: None,
            max_clock_drift_ppm: LeaseTiming::DEFAULT_MAX_DRIFT_PPM,
            partition_rpc_timeout: Duration::from_secs(2),
            heartbeats: Heartbeats::SHARDED,
            min_publish_interval: Duration::from_millis(50),
        }
    }

    /// Settings for a member running in a Pod, from the environment the example Deployment
    /// (`deploy/kubernetes/member-deployment.yaml`) sets through the downward API:
    /// `POD_NAMESPACE` (required), `POD_NAME` and `POD_UID` (the Lease's owner, so Kubernetes
    /// deletes it with the Pod), `SHOAL_SERVICE` (the headless Service gating membership) and
    /// `SHOAL_LEASE_DURATION` (like `15s`), `SHOAL_RENEW_INTERVAL`, `SHOAL_HEARTBEAT_SHARDS`
    /// (a number of shards, default 32: [`Heartbeats::Sharded`]; 0: [`Heartbeats::Everyone`])
    /// and `SHOAL_HEARTBEAT_MONITORS` (monitors per shard, default 3). The error names the
    /// variable.
    pub fn from_env() -> Result<Self, ProviderError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ProviderError> {
        let bad = |what: String| ProviderError::Rejected(what);
        let namespace = var("POD_NAMESPACE")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                bad("POD_NAMESPACE is not set (the downward API's metadata.namespace)".into())
            })?;
        let mut config = Self::new(namespace.clone());
        config.service = var("SHOAL_SERVICE").filter(|v| !v.is_empty());
        if let Some(d) = var("SHOAL_LEASE_DURATION") {
            config.lease_duration = humantime::parse_duration(&d)
                .map_err(|e| bad(format!("SHOAL_LEASE_DURATION={d:?}: {e}")))?;
        }
        if let Some(d) = var("SHOAL_RENEW_INTERVAL").filter(|v| !v.is_empty()) {
            config.renew_interval = Some(
                humantime::parse_duration(&d)
                    .map_err(|e| bad(format!("SHOAL_RENEW_INTERVAL={d:?}: {e}")))?,
            );
        }
        let number = |name: &str| -> Result<Option<u32>, ProviderError> {
            var(name)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse::<u32>()
                        .map_err(|e| bad(format!("{name}={v:?}: {e}")))
                })
                .transpose()
        };
        let monitors = number("SHOAL_HEARTBEAT_MONITORS")?;
        let Heartbeats::Sharded {
            shards: default_shards,
            monitors: default_monitors,
        } = Heartbeats::SHARDED
        else {
            unreachable!("the default sharding is sharded")
        };
        match number("SHOAL_HEARTBEAT_SHARDS")? {
            Some(0) if monitors.is_some() => {
                return Err(bad(
                    "SHOAL_HEARTBEAT_MONITORS is set with SHOAL_HEARTBEAT_SHARDS=0 (every member watches every Lease: there are no monitors)".into(),
                ));
            }
            Some(0) => config.heartbeats = Heartbeats::Everyone,
            shards => {
                config.heartbeats = Heartbeats::Sharded {
                    shards: shards.unwrap_or(default_shards),
                    monitors: monitors.unwrap_or(default_monitors),
                };
                config.heartbeats.validate().map_err(|e| {
                    bad(format!(
                        "SHOAL_HEARTBEAT_SHARDS / SHOAL_HEARTBEAT_MONITORS: {e}"
                    ))
                })?;
            }
        }
        config.pod = match (var("POD_NAME"), var("POD_UID")) {
            (Some(name), Some(uid)) if !name.is_empty() && !uid.is_empty() => {
                Some(ObjectReference {
                    kind: "Pod".into(),
                    namespace,
                    name,
                    uid,
                })
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "POD_NAME and POD_UID go together (the downward API's metadata.name and metadata.uid)"
                        .into(),
                ));
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// This Pod's member address: `POD_IP` (the downward API's `status.podIP`) and `port`.
    pub fn pod_address(port: u16) -> Result<String, ProviderError> {
        let ip: std::net::IpAddr = std::env::var("POD_IP")
            .map_err(|_| {
                ProviderError::Rejected(
                    "POD_IP is not set (the downward API's status.podIP)".into(),
                )
            })?
            .parse()
            .map_err(|e| ProviderError::Rejected(format!("POD_IP is not an IP address: {e}")))?;
        Ok(std::net::SocketAddr::new(ip, port).to_string())
    }

    /// The list deadline in force.
    pub fn list_timeout(&self) -> Duration {
        self.list_timeout
            .unwrap_or((self.request_timeout * 6).max(Duration::from_secs(30)))
    }

    /// The renew interval in force.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval.unwrap_or(self.lease_duration / 3)
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), ProviderError> {
        let bad = |what: String| Err(ProviderError::Rejected(what));
        if self.namespace.is_empty() {
            return bad("namespace must not be empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) || self.lease_duration.subsec_nanos() != 0 {
            return bad(format!(
                "lease_duration must be a whole number of seconds, at least 1 s (got {:?})",
                self.lease_duration
            ));
        }
        let renew = self.renew_interval();
        if renew.is_zero() || renew >= self.lease_duration {
            return bad(format!(
                "renew_interval must be above zero and below lease_duration (got {renew:?} for {:?})",
                self.lease_duration
            ));
        }
        if let Err(e) = self.heartbeats.validate() {
            return bad(e);
        }
        Ok(())
    }

    pub(super) fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            ttl: self.lease_duration,
            max_clock_drift_ppm: self.max_clock_drift_ppm,
            margin: self.lease_margin.unwrap_or(self.lease_duration / 10),
        }
    }

    /// Own renewals further apart than this prove no time in between (see [`Liveness`]): two
    /// renew intervals, so one failed attempt and its retry still count.
    pub(super) fn continuity(&self) -> Duration {
        self.renew_interval() * 2
    }

    /// How long after the first cleaner the others step in.
    pub(super) fn cleaner_delay(&self) -> Duration {
        self.lease_duration / 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn settings_come_from_the_downward_api_and_errors_name_the_variable() {
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "shop"),
            ("POD_NAME", "shop-7d9f-abcde"),
            ("POD_UID", "1234"),
            ("SHOAL_SERVICE", "shop-members"),
            ("SHOAL_LEASE_DURATION", "9s"),
        ]))
        .unwrap();
        assert_eq!(c.namespace, "shop");
        assert_eq!(c.service.as_deref(), Some("shop-members"));
        assert_eq!(c.lease_duration, Duration::from_secs(9));
        assert_eq!(c.renew_interval(), Duration::from_secs(3));
        let pod = c.pod.unwrap();
        assert_eq!(
            (pod.kind.as_str(), pod.name.as_str()),
            ("Pod", "shop-7d9f-abcde")
        );
        let err = |pairs: &[(&str, &str)]| {
            KubernetesProviderConfig::from_vars(vars(pairs))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("POD_NAMESPACE"));
        assert!(err(&[("POD_NAMESPACE", "s"), ("POD_NAME", "p")]).contains("POD_UID"));
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_LEASE_DURATION", "soon")])
                .contains("SHOAL_LEASE_DURATION")
        );
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_LEASE_DURATION", "1500ms")])
                .contains("lease_duration")
        );
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "s"),
            ("SHOAL_RENEW_INTERVAL", "2s"),
        ]))
        .unwrap();
        assert_eq!(c.renew_interval(), Duration::from_secs(2));
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_RENEW_INTERVAL", "often")])
                .contains("SHOAL_RENEW_INTERVAL")
        );
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_RENEW_INTERVAL", "20s")])
                .contains("renew_interval")
        );
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "s"),
            ("SHOAL_HEARTBEAT_SHARDS", "64"),
        ]))
        .unwrap();
        assert_eq!(
            c.heartbeats,
            Heartbeats::Sharded {
                shards: 64,
                monitors: 3
            }
        );
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_HEARTBEAT_SHARDS", "many")])
                .contains("SHOAL_HEARTBEAT_SHARDS")
        );
        assert!(
            err(&[
                ("POD_NAMESPACE", "s"),
                ("SHOAL_HEARTBEAT_SHARDS", "8"),
                ("SHOAL_HEARTBEAT_MONITORS", "40")
            ])
            .contains("monitors must be 1 to 16")
        );
        assert!(
            err(&[
                ("POD_NAMESPACE", "s"),
                ("SHOAL_HEARTBEAT_SHARDS", "0"),
                ("SHOAL_HEARTBEAT_MONITORS", "2")
            ])
            .contains("SHOAL_HEARTBEAT_SHARDS=0")
        );
        let c = KubernetesProviderConfig::from_vars(vars(&[("POD_NAMESPACE", "s")])).unwrap();
        assert_eq!(c.heartbeats, Heartbeats::SHARDED, "the default");
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "s"),
            ("SHOAL_HEARTBEAT_SHARDS", "0"),
        ]))
        .unwrap();
        assert_eq!(c.heartbeats, Heartbeats::Everyone);
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "s"),
            ("SHOAL_HEARTBEAT_MONITORS", "5"),
        ]))
        .unwrap();
        assert_eq!(
            c.heartbeats,
            Heartbeats::Sharded {
                shards: 32,
                monitors: 5
            }
        );
    }
}
