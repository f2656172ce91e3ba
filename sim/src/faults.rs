//! Faults and fault schedules: what the simulator does to a cluster, and when.
//!
//! A [`FaultSchedule`] is plain data (serializable, printable, shrinkable by proptest); the
//! cluster applies it. Nodes are named by index: member `i` is `m{i}`.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One fault. Faults with a duration heal by themselves when it ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Split the nodes into groups; traffic between groups is dropped both ways. Group 0 is
    /// listed; everything not listed (including the registry unless named) is in group 1.
    Partition {
        /// Members cut off together.
        members: Vec<usize>,
        /// Whether the registry is in the listed group.
        with_registry: bool,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Split the cluster into several groups: each listed group is cut off from every other
    /// group and from the rest (the registry, clients and unlisted members form one more).
    Split {
        /// Disjoint groups of members.
        groups: Vec<Vec<usize>>,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Traffic from `from` to the registry is dropped (replies still flow the other way).
    OneWay {
        /// The member whose outgoing traffic to the registry is dropped.
        from: usize,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Replies from the registry to the member are dropped while its requests still arrive: a
    /// heartbeat is accepted but the member never hears so (the in-doubt RPC).
    ReplyLost {
        /// The member.
        member: usize,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// The links between the listed members and the registry are clogged one by one, `step`
    /// apart, held, then unclogged one by one in another order (swizzle-clogging).
    Swizzle {
        /// The members, in clogging order.
        members: Vec<usize>,
        /// Gap between two clogs (and two unclogs).
        #[serde(with = "ms")]
        step: Duration,
        /// How long every link stays clogged once all are.
        #[serde(with = "ms")]
        hold: Duration,
    },
    /// The registry ignores the member's heartbeats while its other traffic flows.
    HeartbeatLoss {
        /// The member.
        member: usize,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// The member's process dies; restarted (as a new incarnation) after `restart_after`.
    Crash {
        /// The member.
        member: usize,
        /// When to restart it; `None`: stays down until the final heal.
        #[serde(with = "opt_ms")]
        restart_after: Option<Duration>,
    },
    /// The member shuts down gracefully (it leaves the registry) and, after `rejoin_after`,
    /// starts again as a new incarnation.
    Leave {
        /// The member.
        member: usize,
        /// When to start it again; `None`: stays down until the final heal.
        #[serde(with = "opt_ms")]
        rejoin_after: Option<Duration>,
    },
    /// The member's process is stopped (a GC or debugger pause) while time runs on.
    Pause {
        /// The member.
        member: usize,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// The member's clock: wall offset and rate drift, until the final heal.
    ClockSkew {
        /// The member.
        member: usize,
        /// Wall-clock offset in ms.
        offset_ms: i64,
        /// Rate drift in ppm.
        drift_ppm: i64,
    },
    /// The registry's clock: wall offset (a step either way while it runs) and rate drift,
    /// until the end of the run; the drift is kept within [`REGISTRY_MAX_DRIFT_PPM`], the bound
    /// the TTL oracle allows for.
    RegistryClock {
        /// Wall-clock offset in ms.
        offset_ms: i64,
        /// Rate drift in ppm.
        drift_ppm: i64,
    },
    /// The registry restarts with its wall clock stepped back (an NTP step, a host with no
    /// RTC): the versions it issues fall below the ones clients hold, in a new epoch.
    RegistryClockStep {
        /// How far back, in ms.
        back_ms: u64,
        /// Downtime.
        #[serde(with = "ms")]
        down_for: Duration,
    },
    /// The registry process restarts (state lost).
    RegistryRestart {
        /// Downtime.
        #[serde(with = "ms")]
        down_for: Duration,
    },
    /// The backend restarts having lost its data: for etcd a new cluster (another cluster id,
    /// revisions from 1, no keys, no leases); for the registry this is a restart.
    BackendDataLoss {
        /// Downtime.
        #[serde(with = "ms")]
        down_for: Duration,
    },
    /// The backend saves a copy of its store (`etcdctl snapshot save`), for a later
    /// [`Fault::BackendRestore`]. Only etcd keeps one; elsewhere it does nothing.
    BackendSnapshot,
    /// The backend crashes and comes back restored from the last [`Fault::BackendSnapshot`]
    /// with the same identity: for etcd `etcdctl snapshot restore` with the same cluster token
    /// (the same cluster id, the revision back at the snapshot's, so later writes reuse
    /// revisions members saw; the snapshot's leases start their TTL over, members that joined
    /// since are gone and members that left since are back). For the registry a restart (its
    /// state is lost); the API server does not model it.
    BackendRestore {
        /// Downtime.
        #[serde(with = "ms")]
        down_for: Duration,
    },
    /// One member of a multi-member backend (a three-member etcd) freezes (SIGSTOP, a VM
    /// pause) while the others keep a quorum; the leader's freeze costs an election. Calls
    /// to it go unanswered and its watches go silent. Nothing where the backend has one member.
    BackendMemberFreeze {
        /// Which backend member (taken modulo how many there are).
        member: usize,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// One member of a multi-member backend crashes (connections refused) and restarts with
    /// its data; the leader's crash costs an election. Nothing where the backend has one member.
    BackendMemberCrash {
        /// Which backend member (taken modulo how many there are).
        member: usize,
        /// Downtime.
        #[serde(with = "ms")]
        down_for: Duration,
    },
    /// The backend's auth store changes (a role or user edited): every auth token issued
    /// before is refused as old. Nothing where the backend does not authenticate.
    BackendAuthChange,
    /// The registry process freezes (a VM pause, a long GC) and resumes with its state.
    RegistryPause {
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Every member restarts, one after another.
    RollingRestart {
        /// Gap between two restarts.
        #[serde(with = "ms")]
        gap: Duration,
    },
    /// Every watch stream open at the registry is reset (ends with `Unavailable`), `times`
    /// times, `period` apart: a proxy or NIC in front of the registry restarting.
    StreamReset {
        /// How many resets.
        times: u32,
        /// Gap between two resets.
        #[serde(with = "ms")]
        period: Duration,
    },
    /// The control plane sheds every list and watch with `429 Too Many Requests` and
    /// `Retry-After` for `duration` (API Priority and Fairness with full queues: a relist
    /// storm after an API-server restart); the door flags a client that comes back sooner.
    /// Only the Kubernetes API server models it; elsewhere it does nothing.
    Throttle {
        /// How long reads are shed.
        #[serde(with = "ms")]
        duration: Duration,
        /// The `Retry-After` every shed read carries, in seconds.
        retry_after_s: u64,
    },
    /// The member changes its description (kinds, zone, metadata) in place, through
    /// `ClusterProvider::update_member`: the description of `generation` (see
    /// [`crate::cluster::description_of`]).
    Describe {
        /// The member.
        member: usize,
        /// Which description.
        generation: u32,
    },
    /// The member is cut off from the control plane both ways while it still reaches its peers
    /// and they it: it loses its registration, peers remove it, and calls still reach it.
    BackendCut {
        /// The member.
        member: usize,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// The control plane applies the member's requests as they arrive (an etcd keep-alive
    /// renews the lease then) but each answer leaves `delay` late: a slow or congested path
    /// back. etcd and the Kubernetes API server model it; the registry does nothing.
    SlowAnswers {
        /// The member.
        member: usize,
        /// How late every answer is.
        #[serde(with = "ms")]
        delay: Duration,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// Watch responses to the member leave the control plane `delay` after they were made, in
    /// order: its view lags the store, its own writes included. etcd and the Kubernetes API
    /// server model it; the registry does nothing.
    LaggingWatch {
        /// The member.
        member: usize,
        /// How far behind.
        #[serde(with = "ms")]
        delay: Duration,
        /// How long.
        #[serde(with = "ms")]
        duration: Duration,
    },
    /// The member is partitioned from everyone and healed `times` times in a row.
    Flap {
        /// The member.
        member: usize,
        /// How many cut/heal cycles.
        times: u32,
        /// Length of each cut and of each healed spell.
        #[serde(with = "ms")]
        period: Duration,
    },
}

impl Fault {
    /// Short kind name, as used in swarm fault mixes.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Partition { .. } => "partition",
            Fault::Split { .. } => "split",
            Fault::OneWay { .. } => "one-way",
            Fault::ReplyLost { .. } => "reply-lost",
            Fault::Swizzle { .. } => "swizzle",
            Fault::HeartbeatLoss { .. } => "heartbeat-loss",
            Fault::Crash { .. } => "crash",
            Fault::Leave { .. } => "leave",
            Fault::Pause { .. } => "pause",
            Fault::ClockSkew { .. } => "clock-skew",
            Fault::RegistryClock { .. } => "registry-clock",
            Fault::RegistryClockStep { .. } => "registry-clock-step",
            Fault::RegistryRestart { .. } => "registry-restart",
            Fault::BackendDataLoss { .. } => "backend-data-loss",
            Fault::BackendSnapshot => "backend-snapshot",
            Fault::BackendRestore { .. } => "backend-restore",
            Fault::BackendMemberFreeze { .. } => "backend-member-freeze",
            Fault::BackendMemberCrash { .. } => "backend-member-crash",
            Fault::BackendAuthChange => "backend-auth-change",
            Fault::RegistryPause { .. } => "registry-pause",
            Fault::RollingRestart { .. } => "rolling-restart",
            Fault::Flap { .. } => "flap",
            Fault::BackendCut { .. } => "backend-cut",
            Fault::SlowAnswers { .. } => "slow-answers",
            Fault::LaggingWatch { .. } => "lagging-watch",
            Fault::Describe { .. } => "describe",
            Fault::StreamReset { .. } => "stream-reset",
            Fault::Throttle { .. } => "throttle",
        }
    }

    /// Whether the fault needs the registry (in-memory clusters have none).
    pub fn needs_registry(&self) -> bool {
        matches!(
            self,
            Fault::Partition { .. }
                | Fault::Split { .. }
                | Fault::OneWay { .. }
                | Fault::ReplyLost { .. }
                | Fault::Swizzle { .. }
                | Fault::HeartbeatLoss { .. }
                | Fault::RegistryClock { .. }
                | Fault::RegistryClockStep { .. }
                | Fault::RegistryRestart { .. }
                | Fault::BackendDataLoss { .. }
                | Fault::BackendSnapshot
                | Fault::BackendRestore { .. }
                | Fault::BackendMemberFreeze { .. }
                | Fault::BackendMemberCrash { .. }
                | Fault::BackendAuthChange
                | Fault::RegistryPause { .. }
                | Fault::Flap { .. }
                | Fault::BackendCut { .. }
                | Fault::SlowAnswers { .. }
                | Fault::LaggingWatch { .. }
                | Fault::StreamReset { .. }
                | Fault::Throttle { .. }
        )
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |d: &Duration| format!("{:.1}s", d.as_secs_f64());
        match self {
            Fault::Partition {
                members,
                with_registry,
                duration,
            } => {
                let m: Vec<String> = members.iter().map(|i| format!("m{i}")).collect();
                let reg = if *with_registry { "+registry" } else { "" };
                write!(f, "partition [{}{reg}] for {}", m.join(","), s(duration))
            }
            Fault::Split { groups, duration } => {
                let g: Vec<String> = groups
                    .iter()
                    .map(|g| {
                        g.iter()
                            .map(|i| format!("m{i}"))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .collect();
                write!(f, "split [{}] for {}", g.join("] ["), s(duration))
            }
            Fault::OneWay { from, duration } => {
                write!(f, "one-way m{from}->registry cut for {}", s(duration))
            }
            Fault::ReplyLost { member, duration } => {
                write!(f, "replies registry->m{member} lost for {}", s(duration))
            }
            Fault::Swizzle {
                members,
                step,
                hold,
            } => {
                let m: Vec<String> = members.iter().map(|i| format!("m{i}")).collect();
                write!(
                    f,
                    "swizzle [{}] step {} hold {}",
                    m.join(","),
                    s(step),
                    s(hold)
                )
            }
            Fault::HeartbeatLoss { member, duration } => {
                write!(f, "heartbeat loss m{member} for {}", s(duration))
            }
            Fault::Crash {
                member,
                restart_after: Some(d),
            } => write!(f, "crash m{member}, restart after {}", s(d)),
            Fault::Crash {
                member,
                restart_after: None,
            } => write!(f, "crash m{member}"),
            Fault::Leave {
                member,
                rejoin_after: Some(d),
            } => write!(f, "leave m{member}, rejoin after {}", s(d)),
            Fault::Leave {
                member,
                rejoin_after: None,
            } => write!(f, "leave m{member}"),
            Fault::Pause { member, duration } => write!(f, "pause m{member} for {}", s(duration)),
            Fault::ClockSkew {
                member,
                offset_ms,
                drift_ppm,
            } => {
                write!(
                    f,
                    "clock skew m{member} offset {offset_ms}ms drift {drift_ppm}ppm"
                )
            }
            Fault::RegistryClock {
                offset_ms,
                drift_ppm,
            } => write!(
                f,
                "registry clock offset {offset_ms}ms drift {drift_ppm}ppm"
            ),
            Fault::RegistryClockStep { back_ms, down_for } => write!(
                f,
                "registry restart with its clock {back_ms}ms back, down {}",
                s(down_for)
            ),
            Fault::RegistryRestart { down_for } => {
                write!(f, "registry restart, down {}", s(down_for))
            }
            Fault::BackendDataLoss { down_for } => {
                write!(
                    f,
                    "backend restart with its data lost, down {}",
                    s(down_for)
                )
            }
            Fault::BackendSnapshot => write!(f, "backend snapshot saved"),
            Fault::BackendRestore { down_for } => write!(
                f,
                "backend restored from its snapshot (same cluster id), down {}",
                s(down_for)
            ),
            Fault::BackendMemberFreeze { member, duration } => {
                write!(f, "backend member {member} frozen for {}", s(duration))
            }
            Fault::BackendMemberCrash { member, down_for } => {
                write!(f, "backend member {member} crashed, down {}", s(down_for))
            }
            Fault::BackendAuthChange => write!(f, "backend auth store changed"),
            Fault::RegistryPause { duration } => {
                write!(f, "registry frozen for {}", s(duration))
            }
            Fault::RollingRestart { gap } => write!(f, "rolling restart, gap {}", s(gap)),
            Fault::Flap {
                member,
                times,
                period,
            } => write!(f, "flap m{member} {times}x every {}", s(period)),
            Fault::BackendCut { member, duration } => {
                write!(
                    f,
                    "m{member} cut off from the registry (not from peers) for {}",
                    s(duration)
                )
            }
            Fault::SlowAnswers {
                member,
                delay,
                duration,
            } => write!(
                f,
                "answers to m{member} {} late for {}",
                s(delay),
                s(duration)
            ),
            Fault::LaggingWatch {
                member,
                delay,
                duration,
            } => write!(
                f,
                "watch of m{member} {} behind for {}",
                s(delay),
                s(duration)
            ),
            Fault::Describe { member, generation } => {
                write!(f, "m{member} describes itself as generation {generation}")
            }
            Fault::StreamReset { times, period } => {
                write!(f, "watch streams reset {times}x every {}", s(period))
            }
            Fault::Throttle {
                duration,
                retry_after_s,
            } => write!(
                f,
                "reads shed with 429 (Retry-After {retry_after_s} s) for {}",
                s(duration)
            ),
        }
    }
}

/// Largest registry clock drift the harness injects (2%, far beyond real quartz clocks): the
/// TTL oracle allows for it.
pub const REGISTRY_MAX_DRIFT_PPM: i64 = 20_000;

/// Every kind of fault, drawn in one place ([`FaultKind::draw`]) for swarm schedules and
/// proptest alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// [`Fault::Partition`].
    Partition,
    /// [`Fault::Split`].
    Split,
    /// [`Fault::OneWay`].
    OneWay,
    /// [`Fault::ReplyLost`].
    ReplyLost,
    /// [`Fault::Swizzle`].
    Swizzle,
    /// [`Fault::HeartbeatLoss`].
    HeartbeatLoss,
    /// [`Fault::Crash`].
    Crash,
    /// [`Fault::Leave`].
    Leave,
    /// [`Fault::Pause`].
    Pause,
    /// [`Fault::ClockSkew`].
    ClockSkew,
    /// [`Fault::RegistryClock`] (offsets either way, bounded drift).
    RegistryClock,
    /// [`Fault::RegistryClockStep`].
    RegistryClockStep,
    /// [`Fault::RegistryRestart`].
    RegistryRestart,
    /// [`Fault::RegistryPause`].
    RegistryPause,
    /// [`Fault::RollingRestart`].
    RollingRestart,
    /// [`Fault::Flap`].
    Flap,
    /// [`Fault::Describe`].
    Describe,
    /// [`Fault::StreamReset`].
    StreamReset,
}

impl FaultKind {
    /// The kinds random schedules draw from.
    pub const ALL: [FaultKind; 18] = [
        FaultKind::Partition,
        FaultKind::Split,
        FaultKind::OneWay,
        FaultKind::ReplyLost,
        FaultKind::Swizzle,
        FaultKind::HeartbeatLoss,
        FaultKind::Crash,
        FaultKind::Leave,
        FaultKind::Pause,
        FaultKind::ClockSkew,
        FaultKind::RegistryClock,
        FaultKind::RegistryClockStep,
        FaultKind::RegistryRestart,
        FaultKind::RegistryPause,
        FaultKind::RollingRestart,
        FaultKind::Flap,
        FaultKind::Describe,
        FaultKind::StreamReset,
    ];

    /// A fault of this kind against a cluster of `n` (at least 2) members, with its parameters
    /// drawn from `r`.
    pub fn draw(self, r: &mut SimRng, n: usize) -> Fault {
        let m = r.pick(n);
        let d = r.ms(1_000, 20_000);
        match self {
            FaultKind::Partition => {
                let mut members = vec![m];
                if r.chance(0.4) {
                    members.push((m + 1) % n);
                    members.sort();
                }
                Fault::Partition {
                    members,
                    with_registry: r.chance(0.3),
                    duration: d,
                }
            }
            FaultKind::Split => {
                let other = (m + 1 + r.pick(n - 1)) % n;
                Fault::Split {
                    groups: vec![vec![m], vec![other]],
                    duration: d,
                }
            }
            FaultKind::OneWay => Fault::OneWay {
                from: m,
                duration: d,
            },
            FaultKind::ReplyLost => Fault::ReplyLost {
                member: m,
                duration: d,
            },
            FaultKind::Swizzle => {
                let k = r.range(2, n as u64 + 1) as usize;
                let members = (0..k).map(|i| (m + i) % n).collect();
                Fault::Swizzle {
                    members,
                    step: r.ms(200, 2_000),
                    hold: r.ms(1_000, 10_000),
                }
            }
            FaultKind::HeartbeatLoss => Fault::HeartbeatLoss {
                member: m,
                duration: d,
            },
            FaultKind::Crash => Fault::Crash {
                member: m,
                restart_after: r.chance(0.7).then(|| r.ms(1_000, 15_000)),
            },
            FaultKind::Leave => Fault::Leave {
                member: m,
                rejoin_after: r.chance(0.7).then(|| r.ms(1_000, 15_000)),
            },
            FaultKind::Pause => Fault::Pause {
                member: m,
                duration: r.ms(500, 10_000),
            },
            FaultKind::ClockSkew => Fault::ClockSkew {
                member: m,
                offset_ms: r.range(0, 240_000) as i64 - 120_000,
                drift_ppm: r.range(0, 500_000) as i64 - 250_000,
            },
            FaultKind::RegistryClock => Fault::RegistryClock {
                offset_ms: r.range(0, 1_200_000) as i64 - 600_000,
                drift_ppm: r.range(0, 2 * REGISTRY_MAX_DRIFT_PPM as u64) as i64
                    - REGISTRY_MAX_DRIFT_PPM,
            },
            FaultKind::RegistryClockStep => Fault::RegistryClockStep {
                back_ms: r.range(1_000, 900_000),
                down_for: r.ms(200, 5_000),
            },
            FaultKind::RegistryRestart => Fault::RegistryRestart {
                down_for: r.ms(200, 8_000),
            },
            FaultKind::RegistryPause => Fault::RegistryPause {
                duration: r.ms(500, 20_000),
            },
            FaultKind::RollingRestart => Fault::RollingRestart {
                gap: r.ms(1_000, 5_000),
            },
            FaultKind::Flap => Fault::Flap {
                member: m,
                times: r.range(2, 6) as u32,
                period: r.ms(500, 4_000),
            },
            FaultKind::Describe => Fault::Describe {
                member: m,
                generation: r.range(1, 1_000) as u32,
            },
            FaultKind::StreamReset => Fault::StreamReset {
                times: r.range(1, 4) as u32,
                period: r.ms(100, 5_000),
            },
        }
    }
}

/// A fault at an offset from the start of the fault phase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduled {
    /// Offset from the start of the fault phase.
    #[serde(with = "ms")]
    pub at: Duration,
    /// The fault.
    pub fault: Fault,
}

/// Faults in time order. Everything heals at the end of the fault phase at the latest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSchedule {
    /// The faults, sorted by `at`.
    pub faults: Vec<Scheduled>,
}

impl FaultSchedule {
    /// A schedule from faults in any order.
    pub fn new(mut faults: Vec<Scheduled>) -> Self {
        faults.sort_by_key(|s| s.at);
        Self { faults }
    }

    /// One line per fault.
    pub fn describe(&self) -> String {
        if self.faults.is_empty() {
            return "no faults".into();
        }
        self.faults
            .iter()
            .map(|s| format!("+{:.1}s {}", s.at.as_secs_f64(), s.fault))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The deterministic generator schedules are drawn from (SplitMix64), seeded by the seed so a
/// seed names one schedule and the schedule can be printed before the run.
#[derive(Clone, Debug)]
pub struct SimRng(u64);

impl SimRng {
    /// A generator for `seed` (and a stream id, so schedule and swarm mix draw independently).
    pub fn new(seed: u64, stream: u64) -> Self {
        SimRng(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        shoal::placement::hash::fmix64(self.0)
    }

    /// Uniform in `[lo, hi)` (`lo` when empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next_u64() % (hi - lo)
        }
    }

    /// A duration uniform in `[lo_ms, hi_ms)`.
    pub fn ms(&mut self, lo_ms: u64, hi_ms: u64) -> Duration {
        Duration::from_millis(self.range(lo_ms, hi_ms))
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    /// A random element index.
    pub fn pick(&mut self, n: usize) -> usize {
        self.range(0, n as u64) as usize
    }
}

mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

mod opt_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_round_trip_through_json_and_sort() {
        let s = FaultSchedule::new(vec![
            Scheduled {
                at: Duration::from_secs(5),
                fault: Fault::Crash {
                    member: 1,
                    restart_after: None,
                },
            },
            Scheduled {
                at: Duration::from_secs(1),
                fault: Fault::Partition {
                    members: vec![0],
                    with_registry: false,
                    duration: Duration::from_secs(3),
                },
            },
        ]);
        assert_eq!(s.faults[0].at, Duration::from_secs(1));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<FaultSchedule>(&json).unwrap(), s);
        assert!(s.describe().contains("crash m1"));
    }

    #[test]
    fn rng_is_deterministic() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = SimRng::new(7, 1);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..5)
            .map({
                let mut r = SimRng::new(7, 1);
                move |_| r.next_u64()
            })
            .collect();
        let c: Vec<u64> = (0..5)
            .map({
                let mut r = SimRng::new(7, 2);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
