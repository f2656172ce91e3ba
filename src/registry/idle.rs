//! Closing idle connections: a connection that carries no call for the idle timeout is closed,
//! so a client cannot hold sockets (and their buffers) open for nothing.
//!
//! HTTP/2 keepalive pings keep a dead peer from holding a connection, but a live one that
//! answers pings and never calls would stay forever. "Idle" counts calls, not bytes (pings
//! are bytes): a watch stream or a unary call in flight keeps its connection open, and so does
//! any call started within the timeout. [`IdleLayer`] counts the calls of each connection (by
//! its peer address) and [`IdleIo`], wrapped around every accepted socket, fails its next read
//! once the connection has been idle for the timeout, which makes the server close it. Members
//! heartbeat every few seconds and watchers hold a stream, so only connections with nothing in
//! flight for the whole timeout are closed. Production transport only (real tonic).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
// Real time on purpose: this module serves real sockets over real tonic and is compiled out of
// the simulated build (`#[cfg(not(madsim))]` in `registry/mod.rs`); no simulated code reaches it.
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// Calls in flight per connection, shared by the layer and the sockets.
#[derive(Debug)]
pub struct IdleTracker {
    idle: Duration,
    conns: Mutex<BTreeMap<SocketAddr, Conn>>,
    closed: Counter,
}

#[derive(Debug)]
struct Conn {
    calls: usize,
    /// When the last call ended (or the connection opened).
    quiet_since: Instant,
}

impl IdleTracker {
    /// Connections idle for `idle` are closed; each closure counts in `closed`.
    pub fn new(idle: Duration, closed: Counter) -> Arc<Self> {
        Arc::new(Self {
            idle,
            conns: Mutex::new(BTreeMap::new()),
            closed,
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<SocketAddr, Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn opened(&self, addr: SocketAddr) {
        self.lock().insert(
            addr,
            Conn {
                calls: 0,
                quiet_since: Instant::now(),
            },
        );
    }

    fn closed(&self, addr: SocketAddr) {
        self.lock().remove(&addr);
    }

    fn call_started(&self, addr: SocketAddr) {
        if let Some(c) = self.lock().get_mut(&addr) {
            c.calls += 1;
        }
    }

    fn call_ended(&self, addr: SocketAddr) {
        if let Some(c) = self.lock().get_mut(&addr) {
            c.calls = c.calls.saturating_sub(1);
            c.quiet_since = Instant::now();
        }
    }

    /// When `addr` becomes idle if nothing starts meanwhile (`None`: a call is in flight).
    fn idle_at(&self, addr: SocketAddr) -> Option<Instant> {
        match self.lock().get(&addr) {
            Some(c) if c.calls == 0 => Some(c.quiet_since + self.idle),
            Some(_) => None,
            None => Some(Instant::now()),
        }
    }

    /// Connections open now (for tests and metrics).
    pub fn open_connections(&self) -> usize {
        self.lock().len()
    }
}

/// A server socket that fails its next read once its connection has been idle for the
/// tracker's timeout.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    addr: Option<SocketAddr>,
    tracker: Arc<IdleTracker>,
    check: Pin<Box<Sleep>>,
}

impl<T: Connected<ConnectInfo = TcpConnectInfo>> IdleIo<T> {
    /// Wraps an accepted socket.
    pub fn new(inner: T, tracker: Arc<IdleTracker>) -> Self {
        let addr = inner.connect_info().remote_addr();
        if let Some(addr) = addr {
            tracker.opened(addr);
        }
        let check = Box::pin(tokio::time::sleep(tracker.idle));
        Self {
            inner,
            addr,
            tracker,
            check,
        }
    }
}

impl<T> Drop for IdleIo<T> {
    fn drop(&mut self) {
        if let Some(addr) = self.addr {
            self.tracker.closed(addr);
        }
    }
}

impl<T: Connected<ConnectInfo = TcpConnectInfo>> Connected for IdleIo<T> {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(addr) = this.addr {
            while this.check.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                match this.tracker.idle_at(addr) {
                    Some(at) if at <= now => {
                        this.tracker.closed.inc();
                        tracing::info!(peer = %addr, idle = ?this.tracker.idle, "closing an idle connection");
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle: no call for the idle timeout",
                        )));
                    }
                    Some(at) => this.check.as_mut().reset(at),
                    None => this.check.as_mut().reset(now + this.tracker.idle),
                }
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Counts each connection's calls for the [`IdleTracker`] (a call lasts until its response
/// body, a watch stream included, is finished or dropped).
#[derive(Clone, Debug)]
pub struct IdleLayer {
    tracker: Arc<IdleTracker>,
}

impl IdleLayer {
    /// A layer feeding `tracker`.
    pub fn new(tracker: Arc<IdleTracker>) -> Self {
        Self { tracker }
    }
}

impl<S> tower::Layer<S> for IdleLayer {
    type Service = IdleService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        IdleService {
            inner,
            tracker: self.tracker.clone(),
        }
    }
}

/// See [`IdleLayer`].
#[derive(Clone, Debug)]
pub struct IdleService<S> {
    inner: S,
    tracker: Arc<IdleTracker>,
}

/// A call in flight on a connection; ends when dropped.
#[derive(Debug)]
struct CallGuard {
    tracker: Arc<IdleTracker>,
    addr: SocketAddr,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.tracker.call_ended(self.addr);
    }
}

fn peer<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S, B, ResBody> tower::Service<http::Request<B>> for IdleService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let guard = peer(&req).map(|addr| {
            self.tracker.call_started(addr);
            CallGuard {
                tracker: self.tracker.clone(),
                addr,
            }
        });
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|inner| TrackedBody {
                inner,
                _call: guard,
            }))
        })
    }
}

/// A response body that keeps its call counted until it is finished or dropped.
#[derive(Debug)]
pub struct TrackedBody<B> {
    inner: B,
    _call: Option<CallGuard>,
}

impl<B: http_body::Body + Unpin> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
