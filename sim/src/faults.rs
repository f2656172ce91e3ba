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
    /// The registry process restarts (state lost).
    RegistryRestart {
        /// Downtime.
        #[serde(with = "ms")]
        down_for: Duration,
    },
    /// Every member restarts, one after another.
    RollingRestart {
        /// Gap between two restarts.
        #[serde(with = "ms")]
        gap: Duration,
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
            Fault::HeartbeatLoss { .. } => "heartbeat-loss",
            Fault::Crash { .. } => "crash",
            Fault::Pause { .. } => "pause",
            Fault::ClockSkew { .. } => "clock-skew",
            Fault::RegistryRestart { .. } => "registry-restart",
            Fault::RollingRestart { .. } => "rolling-restart",
            Fault::Flap { .. } => "flap",
        }
    }

    /// Whether the fault needs the registry (in-memory clusters have none).
    pub fn needs_registry(&self) -> bool {
        matches!(
            self,
            Fault::Partition { .. }
                | Fault::Split { .. }
                | Fault::OneWay { .. }
                | Fault::HeartbeatLoss { .. }
                | Fault::RegistryRestart { .. }
                | Fault::Flap { .. }
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
            Fault::RegistryRestart { down_for } => {
                write!(f, "registry restart, down {}", s(down_for))
            }
            Fault::RollingRestart { gap } => write!(f, "rolling restart, gap {}", s(gap)),
            Fault::Flap {
                member,
                times,
                period,
            } => write!(f, "flap m{member} {times}x every {}", s(period)),
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
