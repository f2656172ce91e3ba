//! The async shell the lease-based providers (the registry, etcd, Kubernetes) share: one start
//! at a time, the running session and its tasks, a shutdown that waits for a registration write
//! in flight and then releases the registration, and `update_member`, which hands the new
//! description to the session's renewal loop and waits until this node's view shows it.
//!
//! Each provider keeps what differs (how it registers, renews, watches and releases) in its
//! session; these steps were near-copies in each provider before.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::describe::Descriptions;
use super::{ClusterProviderContext, ProviderError};
use crate::cluster::{Description, Member, MemberId};
use crate::runtime::TaskSet;

/// What one start of a lease-based provider offers the shell.
#[async_trait]
pub(crate) trait LeaseSession: Send + Sync + 'static {
    /// Whether this node runs as a member (a client has no description to update).
    fn is_member(&self) -> bool;
    /// The node's context.
    fn ctx(&self) -> &ClusterProviderContext;
    /// This member as it registers itself.
    fn member(&self) -> &Mutex<Member>;
    /// The descriptions asked for, and which the backend accepted.
    fn descriptions(&self) -> &Descriptions;
    /// Held while a registration write is in flight: a shutdown waits for it, so that the
    /// release names the registration that exists.
    fn writing(&self) -> &tokio::sync::Mutex<()>;
    /// Checks a new description before it is handed over (the backend's own rules).
    fn check(&self, _described: &Member) -> Result<(), ProviderError> {
        Ok(())
    }
    /// Wakes the renewal loop: a new description is to be written now.
    fn write_soon(&self);
    /// A graceful shutdown, once the tasks stopped: removes this node's registration.
    async fn release(&self);
    /// The backend, as messages name it ("etcd").
    fn backend(&self) -> String;
    /// The provider, as the stop's log line names it ("etcd provider").
    fn provider(&self) -> &'static str;
}

/// One start: its session and its tasks.
pub(crate) struct Running<S> {
    /// What the tasks share.
    pub(crate) session: Arc<S>,
    /// The tasks (stopped by a shutdown, or when dropped).
    pub(crate) tasks: TaskSet,
}

/// The running start of a provider, if any.
pub(crate) struct Shell<S> {
    running: tokio::sync::Mutex<Option<Running<S>>>,
}

impl<S> std::fmt::Debug for Shell<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shell").finish_non_exhaustive()
    }
}

impl<S> Default for Shell<S> {
    fn default() -> Self {
        Self {
            running: tokio::sync::Mutex::new(None),
        }
    }
}

impl<S: LeaseSession> Shell<S> {
    /// The running session.
    pub(crate) async fn session(&self) -> Result<Arc<S>, ProviderError> {
        self.running
            .lock()
            .await
            .as_ref()
            .map(|r| r.session.clone())
            .ok_or(ProviderError::NotStarted)
    }

    /// A start may go ahead: the slot to put the running start in, held for the whole start
    /// (a concurrent start waits, then finds it taken).
    pub(crate) async fn starting(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Running<S>>>, ProviderError> {
        let running = self.running.lock().await;
        if running.is_some() {
            return Err(ProviderError::AlreadyStarted);
        }
        Ok(running)
    }

    /// Stops the tasks (after a registration write in flight) and, if `graceful`, releases
    /// the registration.
    pub(crate) async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError> {
        let Some(mut running) = self.running.lock().await.take() else {
            return Err(ProviderError::NotStarted);
        };
        let session = running.session.clone();
        let writing = session.writing().lock().await;
        running.tasks.stop().await;
        drop(writing);
        if graceful {
            session.release().await;
        }
        let member: MemberId = session
            .member()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .id
            .clone();
        tracing::info!(member = %member, graceful, "{} stopped", session.provider());
        Ok(())
    }

    /// Hands `description` to the renewal loop and waits (at most `within`) until this node's
    /// view shows it, or the backend refuses it.
    pub(crate) async fn update_member(
        &self,
        description: Description,
        within: Duration,
    ) -> Result<(), ProviderError> {
        let session = self.session().await?;
        if !session.is_member() {
            return Err(ProviderError::NotAMember);
        }
        let described = session
            .member()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .described(description.clone());
        session.check(&described)?;
        let generation = session
            .descriptions()
            .set(session.member(), description.clone())?;
        session.write_soon();
        session
            .descriptions()
            .wait_shown(
                session.ctx(),
                session.member(),
                generation,
                &description,
                within,
                &session.backend(),
            )
            .await
    }
}
