//! Which etcd member a client talks to, and what it does when a call fails: the policy shared
//! by the production client (`client`, over etcd-client) and the simulator's client, so the
//! same code decides in both worlds (docs/providers/etcd.md, "Endpoints and authentication").
//!
//! Like Go's clientv3:
//! * one endpoint at a time, connected when first used (and authenticated then, when a user
//!   is given);
//! * a call that fails for its endpoint (refused, unreachable, `no leader`, or left unanswered
//!   until its caller gave up: a frozen etcd member) moves the client to the next endpoint,
//!   and the call is tried there, once per endpoint at most;
//! * a call refused for its auth token (etcd restarted, the token's TTL passed, the auth store
//!   changed) authenticates again and is retried once; a failed authentication (the user was
//!   removed, the password changed) is the error returned, logged at warn.
//!
//! A [`Transport`] says how to connect to one endpoint, authenticate, and where an error puts
//! the fault; [`Endpoints`] holds the decisions.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::api::EtcdError;
use crate::runtime::{SharedClock, timeout};

/// Where a failed call puts the fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The endpoint: it cannot be reached, is not serving, or has no leader (an etcd member cut
    /// off from its quorum, or an election). The client moves to the next endpoint.
    Endpoint,
    /// The auth token: gone (etcd restarted, its TTL passed) or older than the auth store.
    /// Another authentication fixes it.
    StaleToken,
    /// The request itself (refused, a lost lease, a compacted revision): the caller's to handle.
    Request,
}

/// Whether etcd's `message` refuses a request for its auth token, not for who sent it.
pub fn stale_token_message(message: &str) -> bool {
    message.contains("invalid auth token") || message.contains("auth store is old")
}

/// How a client reaches one etcd endpoint.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A connection to one endpoint (cheap to clone; clones share its token).
    type Conn: Clone + Send + Sync + 'static;
    /// What its calls fail with.
    type Error: fmt::Display + Send + Sync + 'static;
    /// The endpoints, by name (URLs), in the order they are tried.
    fn endpoints(&self) -> &[String];
    /// Connects to endpoint `i` (and authenticates, if a user is given).
    async fn connect(&self, i: usize) -> Result<Self::Conn, Self::Error>;
    /// Whether calls carry an auth token (a user is given).
    fn authenticates(&self) -> bool;
    /// Gets `conn` a new auth token.
    async fn authenticate(&self, conn: &Self::Conn) -> Result<(), Self::Error>;
    /// Where `e` puts the fault.
    fn fault(&self, e: &Self::Error) -> Fault;
    /// The error of a connection to `endpoint` not made within `after`.
    fn timed_out(&self, endpoint: &str, after: Duration) -> Self::Error;
    /// Drops the streams opened on endpoint `i` (`None`: on every endpoint, as their token
    /// went stale): they are opened again on the next use.
    fn forget(&self, _i: Option<usize>) {}
}

/// Counters of one client's endpoint policy. Clone to share (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct EndpointMetrics {
    /// Moves from a failed endpoint to the next one.
    pub failovers: Counter,
    /// Calls refused for a stale auth token, after which the client authenticated again.
    pub reauthentications: Counter,
}

impl EndpointMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "etcd_endpoint_failovers",
            "Moves from a failed etcd endpoint to the next one",
            self.failovers.clone(),
        );
        registry.register(
            "etcd_reauthentications",
            "Calls refused for a stale auth token, after which the client authenticated again",
            self.reauthentications.clone(),
        );
    }
}

/// The endpoints of one client, a connection per endpoint (made when first used) and the one
/// in use. Shared with the client's watch streams, which move it on when theirs goes quiet.
pub struct Endpoints<T: Transport> {
    transport: T,
    clock: SharedClock,
    connect_timeout: Duration,
    conns: Mutex<Vec<Option<T::Conn>>>,
    current: AtomicUsize,
    metrics: EndpointMetrics,
}

impl<T: Transport> fmt::Debug for Endpoints<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoints")
            .field("endpoints", &self.transport.endpoints())
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Endpoints<T> {
    /// The endpoints `transport` reaches, the first in use; a connection not made within
    /// `connect_timeout` (on `clock`) fails its endpoint. Refused without any endpoint.
    pub fn new(
        transport: T,
        clock: SharedClock,
        connect_timeout: Duration,
        metrics: EndpointMetrics,
    ) -> Result<Self, EtcdError> {
        let n = transport.endpoints().len();
        if n == 0 {
            return Err(EtcdError::Rejected("no etcd endpoint given".into()));
        }
        Ok(Self {
            transport,
            clock,
            connect_timeout,
            conns: Mutex::new(vec![None; n]),
            current: AtomicUsize::new(0),
            metrics,
        })
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The counters.
    pub fn metrics(&self) -> &EndpointMetrics {
        &self.metrics
    }

    /// How many endpoints there are.
    pub fn len(&self) -> usize {
        self.transport.endpoints().len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Endpoint `i`'s name.
    pub fn name(&self, i: usize) -> &str {
        &self.transport.endpoints()[i]
    }

    /// The endpoint in use.
    pub fn current(&self) -> usize {
        self.current.load(Ordering::SeqCst)
    }

    /// Uses endpoint `i` (modulo how many there are) from now on (the first one that
    /// answered at start).
    pub fn set_current(&self, i: usize) {
        self.current.store(i % self.len(), Ordering::SeqCst);
    }

    fn conns(&self) -> MutexGuard<'_, Vec<Option<T::Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Endpoint `i`'s connection, made now if there is none.
    pub async fn conn(&self, i: usize) -> Result<T::Conn, T::Error> {
        if let Some(c) = self.conns()[i].clone() {
            return Ok(c);
        }
        let conn = match timeout(
            self.clock.as_ref(),
            self.connect_timeout,
            self.transport.connect(i),
        )
        .await
        {
            Ok(c) => c?,
            Err(_) => {
                return Err(self.transport.timed_out(self.name(i), self.connect_timeout));
            }
        };
        self.conns()[i] = Some(conn.clone());
        Ok(conn)
    }

    /// Drops endpoint `i`'s connection (it failed a probe at start).
    pub fn disconnect(&self, i: usize) {
        self.conns()[i] = None;
    }

    /// Endpoint `from` failed: the next one is used from now on (if `from` is still the one in
    /// use: concurrent calls that saw the same failure move the client once). Its connection
    /// is dropped (a frozen member's connection is not reused when it comes back into turn)
    /// and so are the streams opened on it. With a single endpoint nothing moves.
    pub fn fail_over(&self, from: usize, why: &dyn fmt::Display) {
        let n = self.len();
        if n < 2 {
            return;
        }
        let to = (from + 1) % n;
        if self
            .current
            .compare_exchange(from, to, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        self.metrics.failovers.inc();
        self.conns()[from] = None;
        self.transport.forget(Some(from));
        tracing::warn!(
            from = %self.name(from),
            to = %self.name(to),
            error = %why,
            "etcd endpoint failed; using the next one"
        );
    }

    /// A guard that moves the client off endpoint `i` if dropped before
    /// [`Abandoned::disarm`]: a call its caller gave up on (its deadline passed) is taken as a
    /// sign that the endpoint is frozen or cut off.
    pub fn abandoned(&self, i: usize) -> Abandoned<'_, T> {
        Abandoned {
            endpoints: self,
            endpoint: i,
            armed: true,
        }
    }

    /// Whether `e` refuses a call for its token (and the client can authenticate again).
    fn stale(&self, e: &T::Error) -> bool {
        self.transport.authenticates()
            && self.transport.fault(e) == Fault::StaleToken
            && !crate::runtime::sim::flaw("etcd-token-not-renewed")
    }

    /// Runs `op` on the endpoint in use; if etcd refused it for a stale auth token,
    /// authenticates again and runs it once more. If the endpoint failed, the client moves to
    /// the next one and `op` is tried there, once per endpoint at most. Says which endpoint
    /// answered.
    pub async fn call_on<R, F, Fut>(&self, op: F) -> Result<(usize, R), T::Error>
    where
        F: Fn(usize, T::Conn) -> Fut,
        Fut: Future<Output = Result<R, T::Error>>,
    {
        let mut tries = 0;
        loop {
            let i = self.current();
            let guard = self.abandoned(i);
            let result = match self.conn(i).await {
                Ok(conn) => match op(i, conn.clone()).await {
                    Err(e) if self.stale(&e) => match self.reauthenticate(&conn, &e).await {
                        Ok(()) => op(i, conn).await,
                        Err(e) => Err(e),
                    },
                    result => result,
                },
                Err(e) => Err(e),
            };
            guard.disarm();
            match result {
                Err(e) if self.transport.fault(&e) == Fault::Endpoint => {
                    self.fail_over(i, &e);
                    tries += 1;
                    if tries >= self.len() {
                        return Err(e);
                    }
                }
                result => return result.map(|r| (i, r)),
            }
        }
    }

    /// [`Self::call_on`] for an `op` that does not care which endpoint it runs on.
    pub async fn call<R, F, Fut>(&self, op: F) -> Result<R, T::Error>
    where
        F: Fn(T::Conn) -> Fut,
        Fut: Future<Output = Result<R, T::Error>>,
    {
        self.call_on(|_, c| op(c)).await.map(|(_, r)| r)
    }

    /// Gets `conn` a new token after etcd refused one (`why`); the streams opened under the
    /// old one are dropped, to be opened again with the new one.
    pub async fn reauthenticate(
        &self,
        conn: &T::Conn,
        why: &(dyn fmt::Display + Sync),
    ) -> Result<(), T::Error> {
        self.metrics.reauthentications.inc();
        tracing::warn!(error = %why, "etcd refused this client's auth token (etcd restarted, the token expired, or the auth store changed); authenticating again");
        self.transport.forget(None);
        self.transport
            .authenticate(conn)
            .await
            .inspect_err(|e| tracing::warn!(error = %e, "authenticating to etcd again failed"))
    }
}

/// Moves the client off an endpoint if dropped while armed (see [`Endpoints::abandoned`]).
pub struct Abandoned<'a, T: Transport> {
    endpoints: &'a Endpoints<T>,
    endpoint: usize,
    armed: bool,
}

impl<T: Transport> Abandoned<'_, T> {
    /// The call was answered (whatever the answer): the endpoint is alive.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl<T: Transport> Drop for Abandoned<'_, T> {
    fn drop(&mut self) {
        if self.armed && !crate::runtime::sim::flaw("etcd-abandoned-call-stays") {
            self.endpoints.fail_over(
                self.endpoint,
                &"a call got no answer before its caller gave up",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    use super::*;
    use crate::runtime::TokioClock;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum FakeError {
        Down(usize),
        Stale,
        Refused,
    }

    impl fmt::Display for FakeError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "{self:?}")
        }
    }

    /// Endpoints that are down or up; a token that is stale until the client authenticates.
    #[derive(Default)]
    struct Fake {
        names: Vec<String>,
        down: Mutex<BTreeSet<usize>>,
        stale: Mutex<bool>,
        authentications: AtomicU32,
        forgotten: Mutex<Vec<Option<usize>>>,
        user: bool,
    }

    #[async_trait]
    impl Transport for Arc<Fake> {
        type Conn = usize;
        type Error = FakeError;

        fn endpoints(&self) -> &[String] {
            &self.names
        }

        async fn connect(&self, i: usize) -> Result<usize, FakeError> {
            Ok(i)
        }

        fn authenticates(&self) -> bool {
            self.user
        }

        async fn authenticate(&self, _conn: &usize) -> Result<(), FakeError> {
            self.authentications.fetch_add(1, Ordering::SeqCst);
            *self.stale.lock().unwrap() = false;
            Ok(())
        }

        fn fault(&self, e: &FakeError) -> Fault {
            match e {
                FakeError::Down(_) => Fault::Endpoint,
                FakeError::Stale => Fault::StaleToken,
                FakeError::Refused => Fault::Request,
            }
        }

        fn timed_out(&self, endpoint: &str, _after: Duration) -> FakeError {
            FakeError::Down(self.names.iter().position(|n| n == endpoint).unwrap_or(0))
        }

        fn forget(&self, i: Option<usize>) {
            self.forgotten.lock().unwrap().push(i);
        }
    }

    fn endpoints(n: usize, user: bool) -> (Arc<Fake>, Endpoints<Arc<Fake>>) {
        let fake = Arc::new(Fake {
            names: (0..n).map(|i| format!("etcd{i}")).collect(),
            user,
            ..Fake::default()
        });
        let e = Endpoints::new(
            fake.clone(),
            TokioClock::shared(),
            Duration::from_secs(1),
            EndpointMetrics::default(),
        )
        .unwrap();
        (fake, e)
    }

    /// The call: fails as the fake says for the endpoint it runs on, else answers with it.
    async fn op(fake: &Fake, i: usize) -> Result<usize, FakeError> {
        if fake.down.lock().unwrap().contains(&i) {
            return Err(FakeError::Down(i));
        }
        if *fake.stale.lock().unwrap() {
            return Err(FakeError::Stale);
        }
        Ok(i)
    }

    #[tokio::test]
    async fn a_call_moves_past_dead_endpoints_once_each_and_stays_where_it_worked() {
        let (fake, e) = endpoints(3, false);
        fake.down.lock().unwrap().extend([0, 1]);
        assert_eq!(e.call_on(|i, _| op(&fake, i)).await, Ok((2, 2)));
        assert_eq!(e.current(), 2);
        assert_eq!(e.metrics().failovers.get(), 2);
        assert_eq!(*fake.forgotten.lock().unwrap(), vec![Some(0), Some(1)]);
        // All down: each endpoint tried once, the last error returned, no endless loop.
        fake.down.lock().unwrap().insert(2);
        assert_eq!(
            e.call_on(|i, _| op(&fake, i)).await,
            Err(FakeError::Down(1))
        );
        assert_eq!(e.metrics().failovers.get(), 5);
    }

    #[tokio::test]
    async fn a_refused_request_does_not_move_the_client() {
        let (_, e) = endpoints(3, false);
        let r: Result<(usize, ()), _> = e.call_on(|_, _| async { Err(FakeError::Refused) }).await;
        assert_eq!(r, Err(FakeError::Refused));
        assert_eq!(e.current(), 0);
        assert_eq!(e.metrics().failovers.get(), 0);
    }

    #[tokio::test]
    async fn a_stale_token_authenticates_again_and_retries_once() {
        let (fake, e) = endpoints(2, true);
        *fake.stale.lock().unwrap() = true;
        assert_eq!(e.call_on(|i, _| op(&fake, i)).await, Ok((0, 0)));
        assert_eq!(fake.authentications.load(Ordering::SeqCst), 1);
        assert_eq!(e.metrics().reauthentications.get(), 1);
        // Streams under the old token are dropped everywhere.
        assert_eq!(*fake.forgotten.lock().unwrap(), vec![None]);
        // A token refused again right after a new one is the caller's error (one retry only).
        let r: Result<(usize, ()), _> = e.call_on(|_, _| async { Err(FakeError::Stale) }).await;
        assert_eq!(r, Err(FakeError::Stale));
        assert_eq!(fake.authentications.load(Ordering::SeqCst), 2);
        // Without a user there is nothing to renew: the refusal is returned as it is.
        let (fake, e) = endpoints(2, false);
        *fake.stale.lock().unwrap() = true;
        assert_eq!(e.call_on(|i, _| op(&fake, i)).await, Err(FakeError::Stale));
        assert_eq!(fake.authentications.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn an_abandoned_call_moves_the_client_an_answered_one_does_not() {
        let (_, e) = endpoints(3, false);
        let pending = e.call_on(|_, _| std::future::pending::<Result<(), FakeError>>());
        let deadline = tokio::time::sleep(Duration::from_millis(10));
        tokio::select! {
            biased;
            _ = pending => unreachable!(),
            _ = deadline => {}
        }
        assert_eq!(e.current(), 1, "the frozen endpoint was left");
        e.abandoned(1).disarm();
        assert_eq!(e.current(), 1);
        // Two calls abandoned on the same endpoint move the client once.
        drop(e.abandoned(1));
        drop(e.abandoned(1));
        assert_eq!(e.current(), 2);
        assert_eq!(e.metrics().failovers.get(), 2);
    }

    #[tokio::test]
    async fn a_single_endpoint_never_moves() {
        let (fake, e) = endpoints(1, false);
        fake.down.lock().unwrap().insert(0);
        assert_eq!(
            e.call_on(|i, _| op(&fake, i)).await,
            Err(FakeError::Down(0))
        );
        drop(e.abandoned(0));
        assert_eq!(e.current(), 0);
        assert_eq!(e.metrics().failovers.get(), 0);
    }
}
