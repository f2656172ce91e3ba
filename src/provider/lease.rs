//! A member's own view of its registration: the contract every provider shares.
//!
//! A backend (registry, Kubernetes Lease, etcd lease) removes a member that stops renewing for a
//! TTL; peers then take over its identities. The member itself must find out *before* that
//! happens, from its own evidence, so the application stops serving what it owns: that is
//! [`crate::ClusterEvent::MembershipLost`]. [`LeaseTracker`] is that evidence, as a state
//! machine fed with renewals and time (no I/O), shared by every provider.
//!
//! The rule: a renewal *sent* at `t` and accepted by the backend keeps the registration alive
//! until at least `t + TTL` on the backend's clock (the backend renews when it receives it, which
//! is later). The member counts from the send time on its own monotonic clock, never from
//! anyone's wall clock, and gives up [`LeaseTiming::lost_after`] later: the TTL shortened by
//! the worst rate difference between its clock and the backend's, and by a safety margin.

use std::time::Duration;

use crate::runtime::Instant;

/// How long a renewal keeps a registration alive, as the member reckons it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// The backend's TTL.
    pub ttl: Duration,
    /// The largest rate difference assumed between any clock and true time, in parts per
    /// million (each of the member's and the backend's clocks may be off by this much).
    pub max_clock_drift_ppm: u32,
    /// Extra room: time for the application to stop serving before peers can take over.
    pub margin: Duration,
}

impl LeaseTiming {
    /// Default drift bound: 2% (NTP-disciplined clocks are within 0.05%; a VM whose clock is
    /// being slewed hard, or an undisciplined one, stays well within 2%).
    pub const DEFAULT_MAX_DRIFT_PPM: u32 = 20_000;

    /// The defaults for a backend TTL: drift 2%, margin a tenth of the TTL.
    pub fn for_ttl(ttl: Duration) -> Self {
        Self {
            ttl,
            max_clock_drift_ppm: Self::DEFAULT_MAX_DRIFT_PPM,
            margin: ttl / 10,
        }
    }

    /// How long after sending its last accepted renewal the member declares its registration
    /// lost: `ttl * (1 - 2 * drift) - margin` (zero if the settings leave no room).
    ///
    /// With both clocks within the drift bound, the backend cannot expire the registration
    /// before the member has said so: the member's deadline, in true time, is at most
    /// `lost_after / (1 - drift)` after the send, and the backend's expiry at least
    /// `ttl / (1 + drift)` after it.
    pub fn lost_after(&self) -> Duration {
        let drift = f64::from(self.max_clock_drift_ppm.min(400_000)) / 1e6;
        self.ttl
            .mul_f64(1.0 - 2.0 * drift)
            .saturating_sub(self.margin)
    }
}

/// Where the member stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    /// Not registered yet.
    Unregistered,
    /// Registered; the last accepted renewal was sent at this instant.
    Held(Instant),
    /// The registration is (or may be) gone.
    Lost,
}

/// A change of the member's standing, to publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeaseTransition {
    /// The registration is (or may be) gone: stop serving owned identities.
    Lost(LossReason),
    /// Registered again after a loss.
    Restored,
}

/// Why the member concluded its registration is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossReason {
    /// No renewal was accepted for [`LeaseTiming::lost_after`]: the backend may expire the
    /// registration any moment (or already has).
    NotRenewed,
    /// The backend said it no longer knows the registration (it expired, or the backend lost
    /// its state).
    Revoked,
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LossReason::NotRenewed => "no renewal accepted in time",
            LossReason::Revoked => "the backend no longer knows this member",
        })
    }
}

/// The member's own view of its registration (see the module docs).
#[derive(Clone, Debug)]
pub struct LeaseTracker {
    timing: LeaseTiming,
    standing: Standing,
}

impl LeaseTracker {
    /// A tracker for a member that has not registered yet.
    pub fn new(timing: LeaseTiming) -> Self {
        Self {
            timing,
            standing: Standing::Unregistered,
        }
    }

    /// The timing in force.
    pub fn timing(&self) -> LeaseTiming {
        self.timing
    }

    /// Replaces the timing (the backend announced its TTL).
    pub fn set_timing(&mut self, timing: LeaseTiming) {
        self.timing = timing;
    }

    /// A registration or renewal sent at `sent_at` was accepted. Returns
    /// [`LeaseTransition::Restored`] if the member had lost its registration.
    pub fn renewed(&mut self, sent_at: Instant) -> Option<LeaseTransition> {
        match self.standing {
            Standing::Held(prev) => {
                self.standing = Standing::Held(prev.max(sent_at));
                None
            }
            Standing::Unregistered => {
                self.standing = Standing::Held(sent_at);
                None
            }
            Standing::Lost => {
                self.standing = Standing::Held(sent_at);
                Some(LeaseTransition::Restored)
            }
        }
    }

    /// The backend said the registration is gone.
    pub fn revoked(&mut self) -> Option<LeaseTransition> {
        self.lose(LossReason::Revoked)
    }

    /// Whether the registration counts as lost at `now`; the transition if it just was.
    pub fn check(&mut self, now: Instant) -> Option<LeaseTransition> {
        match self.deadline() {
            Some(deadline) if now >= deadline => self.lose(LossReason::NotRenewed),
            _ => None,
        }
    }

    /// When the registration will count as lost unless renewed (`None` unless held).
    pub fn deadline(&self) -> Option<Instant> {
        match self.standing {
            Standing::Held(sent) => Some(sent + self.timing.lost_after()),
            _ => None,
        }
    }

    /// Whether the member holds its registration.
    pub fn is_held(&self) -> bool {
        matches!(self.standing, Standing::Held(_))
    }

    fn lose(&mut self, reason: LossReason) -> Option<LeaseTransition> {
        match self.standing {
            Standing::Held(_) => {
                self.standing = Standing::Lost;
                Some(LeaseTransition::Lost(reason))
            }
            Standing::Unregistered | Standing::Lost => None,
        }
    }
}

/// Until when this node may act as a member, as it reckons from its own accepted renewals: what
/// an activation host checks before it serves, so that a process waking from a pause never
/// serves on a registration it can no longer prove (its loss announcement may not have run
/// yet). Shared through [`crate::provider::ClusterProviderContext::standing`]; providers without
/// leases (in memory) leave it unbounded.
#[derive(Clone, Debug, Default)]
pub struct MembershipWindow(std::sync::Arc<std::sync::Mutex<WindowState>>);

#[derive(Debug, Default)]
struct WindowState {
    window: Window,
    member: Option<crate::cluster::MemberId>,
    ttl: Option<Duration>,
}

/// What a [`MembershipWindow`] holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Window {
    /// No lease bounds the membership (a provider without leases, or not started by one).
    #[default]
    Unbounded,
    /// Held until this instant on the node's own clock, unless renewed.
    Until(Instant),
    /// Not held: never registered yet, or lost.
    Closed,
}

impl MembershipWindow {
    fn lock(&self) -> std::sync::MutexGuard<'_, WindowState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The window now.
    pub fn get(&self) -> Window {
        self.lock().window
    }

    /// The backend's TTL as the provider last knew it (`None` for providers without leases).
    pub fn ttl(&self) -> Option<Duration> {
        self.lock().ttl
    }

    /// The incarnation whose registration the last accepted renewal held (`None` before the
    /// first, and for providers without leases). Unlike the membership events, it cannot be
    /// missed by a subscriber that lagged.
    pub fn member(&self) -> Option<crate::cluster::MemberId> {
        self.lock().member.clone()
    }

    /// Whether the node holds its membership at `now`.
    pub fn held_at(&self, now: Instant) -> bool {
        match self.get() {
            Window::Unbounded => true,
            Window::Until(until) => now < until,
            Window::Closed => false,
        }
    }

    pub(crate) fn set(&self, w: Window) {
        self.lock().window = w;
    }

    pub(crate) fn renewed(&self, until: Instant, member: &crate::cluster::MemberId, ttl: Duration) {
        *self.lock() = WindowState {
            window: Window::Until(until),
            member: Some(member.clone()),
            ttl: Some(ttl),
        };
    }
}

/// A member's standing as a provider keeps it: the [`LeaseTracker`], and the announcement of
/// each change as [`crate::ClusterEvent::MembershipLost`] or
/// [`crate::ClusterEvent::MembershipRestored`], the same for every provider.
#[derive(Debug)]
pub(crate) struct MemberStanding {
    tracker: std::sync::Mutex<LeaseTracker>,
    /// Woken whenever the deadline may have moved.
    changed: tokio::sync::Notify,
    /// The incarnation whose loss was announced, until its restore names it as `previous`.
    lost_as: std::sync::Mutex<Option<crate::cluster::MemberId>>,
    lost: prometheus_client::metrics::counter::Counter,
    restored: prometheus_client::metrics::counter::Counter,
}

impl MemberStanding {
    /// Not registered yet; `lost` and `restored` count the announcements.
    pub(crate) fn new(
        timing: LeaseTiming,
        lost: prometheus_client::metrics::counter::Counter,
        restored: prometheus_client::metrics::counter::Counter,
    ) -> Self {
        Self {
            tracker: std::sync::Mutex::new(LeaseTracker::new(timing)),
            changed: tokio::sync::Notify::new(),
            lost_as: std::sync::Mutex::new(None),
            lost,
            restored,
        }
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, LeaseTracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The timing in force.
    pub(crate) fn timing(&self) -> LeaseTiming {
        self.tracker().timing()
    }

    /// Replaces the timing (the backend announced its TTL).
    pub(crate) fn set_timing(&self, timing: LeaseTiming) {
        self.tracker().set_timing(timing);
        self.changed.notify_one();
    }

    /// A renewal sent at `sent_at` was accepted; `member` is this node as registered.
    pub(crate) fn renewed(
        &self,
        ctx: &crate::provider::ClusterProviderContext,
        member: &crate::cluster::Member,
        sent_at: Instant,
    ) {
        let (transition, deadline, ttl) = {
            let mut t = self.tracker();
            (t.renewed(sent_at), t.deadline(), t.timing().ttl)
        };
        match deadline {
            Some(until) => ctx.standing.renewed(until, &member.id, ttl),
            None => ctx.standing.set(Window::Closed),
        }
        self.changed.notify_one();
        if let Some(t) = transition {
            self.announce(ctx, t, member);
        }
    }

    /// The backend said the registration is gone; `member` is the incarnation that lost it.
    pub(crate) fn revoked(
        &self,
        ctx: &crate::provider::ClusterProviderContext,
        member: &crate::cluster::Member,
    ) {
        let transition = self.tracker().revoked();
        ctx.standing.set(Window::Closed);
        if let Some(t) = transition {
            self.announce(ctx, t, member);
        }
    }

    fn announce(
        &self,
        ctx: &crate::provider::ClusterProviderContext,
        transition: LeaseTransition,
        member: &crate::cluster::Member,
    ) {
        let version = ctx.partition_manager.version();
        let cluster = ctx.cluster_name.clone();
        let mut lost_as = self.lost_as.lock().unwrap_or_else(|e| e.into_inner());
        match transition {
            LeaseTransition::Lost(reason) => {
                self.lost.inc();
                *lost_as = Some(member.id.clone());
                tracing::warn!(cluster = %cluster, member = %member.id, %reason, version, "membership lost: stop serving owned identities");
                ctx.events.publish(crate::ClusterEvent::MembershipLost {
                    cluster,
                    member: member.id.clone(),
                    reason,
                    version,
                });
            }
            LeaseTransition::Restored => {
                self.restored.inc();
                let previous = lost_as.take().unwrap_or_else(|| member.id.clone());
                tracing::warn!(cluster = %cluster, member = %member.id, previous = %previous, version, "membership restored");
                ctx.events.publish(crate::ClusterEvent::MembershipRestored {
                    cluster,
                    member: member.clone(),
                    previous,
                    version,
                });
            }
        }
    }

    /// Runs forever: announces the loss when the deadline passes on the context's clock (no
    /// renewal accepted for [`LeaseTiming::lost_after`]). `member` gives this node as
    /// registered at that moment.
    pub(crate) async fn watchdog(
        &self,
        ctx: &crate::provider::ClusterProviderContext,
        member: impl Fn() -> crate::cluster::Member,
    ) {
        let clock = &ctx.clock;
        loop {
            let notified = self.changed.notified();
            let deadline = self.tracker().deadline();
            match deadline {
                None => notified.await,
                Some(deadline) => {
                    let wait = deadline.saturating_duration_since(clock.now());
                    tokio::select! {
                        biased;
                        _ = notified => {}
                        _ = clock.sleep(wait) => {
                            let transition = self.tracker().check(clock.now());
                            if let Some(t) = transition {
                                ctx.standing.set(Window::Closed);
                                self.announce(ctx, t, &member());
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        // Test-only: the tracker takes time as an argument; any starting point will do.
        Instant::now()
    }

    #[test]
    fn lost_after_leaves_room_for_drift_on_both_clocks_and_the_margin() {
        let t = LeaseTiming::for_ttl(Duration::from_secs(10));
        // 10 s * (1 - 0.04) - 1 s
        assert_eq!(t.lost_after(), Duration::from_millis(8_600));
        let none = LeaseTiming {
            ttl: Duration::from_secs(1),
            max_clock_drift_ppm: 0,
            margin: Duration::from_secs(2),
        };
        assert_eq!(none.lost_after(), Duration::ZERO);
    }

    #[test]
    fn the_deadline_counts_from_the_last_accepted_send_and_never_moves_back() {
        let start = t0();
        let mut l = LeaseTracker::new(LeaseTiming::for_ttl(Duration::from_secs(10)));
        assert_eq!(l.deadline(), None);
        assert_eq!(l.check(start + Duration::from_secs(60)), None, "never held");
        assert_eq!(l.renewed(start), None);
        let later = start + Duration::from_secs(3);
        l.renewed(later);
        l.renewed(start + Duration::from_secs(1)); // an older renewal answered late
        assert_eq!(l.deadline(), Some(later + Duration::from_millis(8_600)));
        assert_eq!(l.check(later + Duration::from_millis(8_599)), None);
        assert!(l.is_held());
        assert_eq!(
            l.check(later + Duration::from_millis(8_600)),
            Some(LeaseTransition::Lost(LossReason::NotRenewed))
        );
        assert!(!l.is_held());
        assert_eq!(l.check(later + Duration::from_secs(20)), None, "said once");
        assert_eq!(l.revoked(), None, "already lost");
        assert_eq!(
            l.renewed(later + Duration::from_secs(30)),
            Some(LeaseTransition::Restored)
        );
        assert_eq!(
            l.revoked(),
            Some(LeaseTransition::Lost(LossReason::Revoked))
        );
    }

    #[test]
    fn loss_reasons_say_what_happened() {
        assert!(LossReason::NotRenewed.to_string().contains("renewal"));
        assert!(LossReason::Revoked.to_string().contains("no longer knows"));
    }
}
