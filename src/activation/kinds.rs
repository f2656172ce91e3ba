//! Actor kinds registered one by one, each with its own factory: the [`Actors`] a host drives,
//! built from per-kind [`ActorKind`]s whose activations are plain values ([`Actor`]).
//!
//! [`Actors`] is one object for every kind, keyed by `(kind, identity)` strings: right for an
//! actor framework that already has its own dispatch. An application that just has a few kinds
//! registers a factory per kind instead ([`super::ActivationBuilder::kind`]); each activation is
//! a value holding its own state, called with `&mut self` one call at a time, and consumed by
//! its `deactivate`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::host::{ActorError, Actors, Deactivation};

/// One activation of a registered kind: the value its factory made, holding the identity's
/// state. Calls come one at a time (the host's turns), so `call` takes `&mut self`.
#[async_trait]
pub trait Actor: Send + 'static {
    /// Handles one call. Dropped unfinished (cancelled) if the identity must go before it ends
    /// (see [`Actors`]), or if its caller goes away (a deadline): the actor keeps whatever it
    /// changed before the drop, and a caller that retries may send the call again, so a call
    /// that must not apply twice or in part should be idempotent or keep its changes until it
    /// returns.
    async fn call(&mut self, payload: Vec<u8>) -> Vec<u8>;
    /// The identity is no longer active here: persist what must survive, and return the state
    /// to hand to the next owner (`None`: nothing to hand over).
    async fn deactivate(self: Box<Self>, reason: Deactivation) -> Option<Vec<u8>>;
}

/// Makes the activations of one kind: loads (or receives) an identity's state and returns the
/// actor holding it, or refuses. Any `Fn(String, Option<Vec<u8>>) -> Future` of the right
/// output is one.
#[async_trait]
pub trait ActorKind: Send + Sync + 'static {
    /// Activates `identity`; `handed` is the state its previous owner handed over, if any.
    async fn activate(
        &self,
        identity: &str,
        handed: Option<Vec<u8>>,
    ) -> Result<Box<dyn Actor>, ActorError>;
}

#[async_trait]
impl<F, Fut> ActorKind for F
where
    F: Fn(String, Option<Vec<u8>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Box<dyn Actor>, ActorError>> + Send + 'static,
{
    async fn activate(
        &self,
        identity: &str,
        handed: Option<Vec<u8>>,
    ) -> Result<Box<dyn Actor>, ActorError> {
        self(identity.to_string(), handed).await
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Box<dyn Actor>>>>;

/// The [`Actors`] of a set of registered kinds: dispatches each activation to its kind's
/// factory and keeps the activations it made, at most one per identity (the host activates an
/// identity again only after its `deactivate` returned).
pub struct Kinds {
    kinds: BTreeMap<String, Arc<dyn ActorKind>>,
    /// The activations held, by kind, then identity (looked up by `&str`: a call allocates
    /// no key).
    live: Mutex<BTreeMap<String, BTreeMap<String, Slot>>>,
}

impl Kinds {
    /// The actors of `kinds` (kind name to factory).
    pub fn new(kinds: BTreeMap<String, Arc<dyn ActorKind>>) -> Self {
        Self {
            kinds,
            live: Mutex::default(),
        }
    }

    /// The registered kinds, in name order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// How many activations are held.
    pub fn live(&self) -> usize {
        self.lock().values().map(BTreeMap::len).sum()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, BTreeMap<String, Slot>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, kind: &str, identity: &str) -> Option<Slot> {
        self.lock().get(kind)?.get(identity).cloned()
    }
}

impl std::fmt::Debug for Kinds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kinds")
            .field("kinds", &self.kinds.keys().collect::<Vec<_>>())
            .field("live", &self.live())
            .finish()
    }
}

#[async_trait]
impl Actors for Kinds {
    async fn activate(
        &self,
        kind: &str,
        identity: &str,
        handed: Option<Vec<u8>>,
    ) -> Result<(), ActorError> {
        let Some(factory) = self.kinds.get(kind) else {
            return Err(ActorError::new(format!(
                "no actor kind {kind:?} is registered on this member"
            )));
        };
        let actor = factory.activate(identity, handed).await?;
        let slot = Arc::new(tokio::sync::Mutex::new(Some(actor)));
        let replaced = self
            .lock()
            .entry(kind.to_string())
            .or_default()
            .insert(identity.to_string(), slot);
        if replaced.is_some() {
            // The host activates an identity only after its deactivate returned: an
            // activation still held here means that order was broken.
            tracing::error!(
                kind,
                identity,
                "activated while an earlier activation was still held; the earlier one is dropped"
            );
        }
        Ok(())
    }

    async fn call(&self, kind: &str, identity: &str, payload: Vec<u8>) -> Vec<u8> {
        let Some(slot) = self.slot(kind, identity) else {
            tracing::error!(kind, identity, "call to an identity not activated here");
            return Vec::new();
        };
        let mut held = slot.lock().await;
        match held.as_mut() {
            Some(actor) => actor.call(payload).await,
            None => {
                tracing::error!(kind, identity, "call to an identity already deactivated");
                Vec::new()
            }
        }
    }

    async fn deactivate(
        &self,
        kind: &str,
        identity: &str,
        reason: Deactivation,
    ) -> Option<Vec<u8>> {
        let slot = {
            let mut live = self.lock();
            let of_kind = live.get_mut(kind)?;
            let slot = of_kind.remove(identity);
            if of_kind.is_empty() {
                live.remove(kind);
            }
            slot?
        };
        let actor = slot.lock().await.take()?;
        actor.deactivate(reason).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its calls; hands the count over.
    struct Counter(u64);

    #[async_trait]
    impl Actor for Counter {
        async fn call(&mut self, _payload: Vec<u8>) -> Vec<u8> {
            self.0 += 1;
            self.0.to_string().into_bytes()
        }
        async fn deactivate(self: Box<Self>, _reason: Deactivation) -> Option<Vec<u8>> {
            Some(self.0.to_string().into_bytes())
        }
    }

    fn counters() -> Kinds {
        let counter = |_id: String, handed: Option<Vec<u8>>| async move {
            let n = match handed {
                None => 0,
                Some(b) => String::from_utf8(b)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| ActorError::new("unreadable state"))?,
            };
            Ok(Box::new(Counter(n)) as Box<dyn Actor>)
        };
        let refuses = |id: String, _handed: Option<Vec<u8>>| async move {
            Err::<Box<dyn Actor>, _>(ActorError::new(format!("{id}: store down")))
        };
        Kinds::new(BTreeMap::from([
            (
                "counter".to_string(),
                Arc::new(counter) as Arc<dyn ActorKind>,
            ),
            (
                "broken".to_string(),
                Arc::new(refuses) as Arc<dyn ActorKind>,
            ),
        ]))
    }

    #[tokio::test]
    async fn each_identity_holds_its_own_state_and_hands_it_over() {
        let k = counters();
        k.activate("counter", "a", None).await.unwrap();
        k.activate("counter", "b", Some(b"41".to_vec()))
            .await
            .unwrap();
        assert_eq!(k.call("counter", "a", vec![]).await, b"1");
        assert_eq!(k.call("counter", "a", vec![]).await, b"2");
        assert_eq!(k.call("counter", "b", vec![]).await, b"42");
        assert_eq!(k.live(), 2);
        let handed = k
            .deactivate("counter", "a", Deactivation::Moved)
            .await
            .unwrap();
        assert_eq!(handed, b"2");
        assert_eq!(k.live(), 1);
        // Gone: a second deactivate hands nothing, a call finds nothing.
        assert_eq!(
            k.deactivate("counter", "a", Deactivation::Moved).await,
            None
        );
        assert_eq!(k.call("counter", "a", vec![]).await, b"");
        // Activated again from what it handed over.
        k.activate("counter", "a", Some(handed)).await.unwrap();
        assert_eq!(k.call("counter", "a", vec![]).await, b"3");
    }

    #[tokio::test]
    async fn unknown_kinds_and_refusing_factories_refuse_the_activation() {
        let k = counters();
        let e = k.activate("nope", "a", None).await.unwrap_err();
        assert!(e.message.contains("\"nope\""), "{e}");
        let e = k.activate("broken", "x", None).await.unwrap_err();
        assert_eq!(e.message, "x: store down");
        let e = k
            .activate("counter", "c", Some(b"not a number".to_vec()))
            .await
            .unwrap_err();
        assert_eq!(e.message, "unreadable state");
        assert_eq!(k.live(), 0, "nothing is held after a refused activation");
        assert_eq!(k.names().collect::<Vec<_>>(), ["broken", "counter"]);
    }
}
