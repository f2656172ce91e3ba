//! A member's own description as it changes: what the application asked for, what the backend
//! accepted, and the waiting in `update_member`, shared by the providers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::cluster::{Description, Member, MemberLimits};
use crate::provider::{ClusterProviderContext, ProviderError};

/// The description generations of one member: `update_member` bumps one, the backend accepts
/// or refuses it.
#[derive(Debug)]
pub(crate) struct Descriptions {
    /// Generation of the description in the member, bumped by every update (under the
    /// member's lock).
    described: AtomicU64,
    /// The generation the backend last accepted; behind `described` while an update is
    /// pending.
    published: AtomicU64,
    /// The description the backend last accepted (restored when it refuses a new one).
    accepted: Mutex<Description>,
    /// The newest generation the backend refused, and why.
    refused: Mutex<Option<(u64, String)>>,
}

impl Descriptions {
    /// Starts from the description the member starts with.
    pub(crate) fn new(initial: Description) -> Self {
        Self {
            described: AtomicU64::new(0),
            published: AtomicU64::new(0),
            accepted: Mutex::new(initial),
            refused: Mutex::new(None),
        }
    }

    /// The member as it should be published, with its generation.
    pub(crate) fn current(&self, member: &Mutex<Member>) -> (Member, u64) {
        let m = lock(member);
        (m.clone(), self.described.load(Ordering::SeqCst))
    }

    /// Replaces the member's description (validated); returns its generation.
    pub(crate) fn set(
        &self,
        member: &Mutex<Member>,
        description: Description,
    ) -> Result<u64, ProviderError> {
        let mut member = lock(member);
        let updated = member.clone().described(description);
        updated.validate(&MemberLimits::default())?;
        *member = updated;
        Ok(self.described.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// The backend accepted `member` as of `generation`; true if that published a new
    /// description.
    pub(crate) fn accepted(&self, member: &Member, generation: u64) -> bool {
        *lock(&self.accepted) = member.description();
        self.published.swap(generation, Ordering::SeqCst) != generation
    }

    /// The backend refused the pending description: go back to the one it holds (so later
    /// writes are not refused too) and tell the caller waiting in `update_member`.
    pub(crate) fn refuse(&self, member: &Mutex<Member>, why: String) {
        let mut member = lock(member);
        let generation = self.described.load(Ordering::SeqCst);
        *member = member.clone().described(lock(&self.accepted).clone());
        *lock(&self.refused) = Some((generation, why.clone()));
        self.published.store(generation, Ordering::SeqCst);
        tracing::warn!(member = %member.id, error = %why, "the membership backend refused this member's new description; keeping the old one");
    }

    /// Whether the description changed since the backend last accepted it.
    pub(crate) fn pending(&self) -> bool {
        self.published.load(Ordering::SeqCst) != self.described.load(Ordering::SeqCst)
    }

    fn refusal(&self, generation: u64) -> Option<String> {
        lock(&self.refused)
            .clone()
            .filter(|(g, _)| *g >= generation)
            .map(|(_, why)| why)
    }

    /// Waits (up to `within`) until this node's own topology shows `description` of
    /// generation `generation` for the member, or the backend refused it.
    pub(crate) async fn wait_shown(
        &self,
        ctx: &ClusterProviderContext,
        member: &Mutex<Member>,
        generation: u64,
        description: &Description,
        within: Duration,
        backend: &str,
    ) -> Result<(), ProviderError> {
        let pm = ctx.partition_manager.clone();
        let shown = ctx
            .wait_until(within, || {
                let id = lock(member).id.clone();
                self.refusal(generation).is_some()
                    || (!self.pending()
                        && pm
                            .topology()
                            .member(&id)
                            .is_some_and(|m| m.description() == *description))
            })
            .await;
        if let Some(why) = self.refusal(generation) {
            Err(ProviderError::Rejected(why))
        } else if shown {
            Ok(())
        } else {
            Err(ProviderError::Unavailable(format!(
                "{backend} did not show the new description within {within:?}; it stays pending"
            )))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
