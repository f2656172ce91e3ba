//! Calls and streams over madsim's reliable connections: the transport of the simulated
//! control planes (the Kubernetes API server, etcd). Connections are kept open and reused for
//! the next call (HTTP/2 or HTTP keep-alive, as the real clients pool them); a call abandoned
//! midway (its deadline passed) drops its connection; a stream has a connection of its own,
//! and dropping it ends the server's side.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use madsim::net::Endpoint;

/// What travels on a connection.
pub type Payload = Box<dyn Any + Send + Sync>;

/// Idle connections kept per client.
const MAX_IDLE: usize = 4;

/// An open connection.
pub struct Connection {
    _ep: Endpoint,
    tx: madsim::net::Sender,
    rx: madsim::net::Receiver,
}

impl Connection {
    /// The next payload the server sends on this connection (`None`: it closed).
    pub async fn next(&mut self) -> Option<Payload> {
        self.rx.recv().await.ok()
    }

    async fn exchange(&mut self, request: Payload) -> Result<Payload, String> {
        self.tx.send(request).await.map_err(|e| e.to_string())?;
        self.rx.recv().await.map_err(|e| e.to_string())
    }
}

/// A client's connections to one server.
#[derive(Clone)]
pub struct Pool {
    server: SocketAddr,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// Connections to `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            server,
            idle: Arc::default(),
        }
    }

    async fn connect(&self) -> Result<Connection, String> {
        let ep = Endpoint::bind("0.0.0.0:0")
            .await
            .map_err(|e| e.to_string())?;
        let (tx, rx) = ep.connect1(self.server).await.map_err(|e| e.to_string())?;
        Ok(Connection { _ep: ep, tx, rx })
    }

    /// One call on an idle connection (or a new one): the server's answer; the connection is
    /// kept for the next call once answered. `Err` says why the transport failed.
    pub async fn call(&self, request: Payload) -> Result<Payload, String> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match idle {
            Some(c) if !c.tx.is_closed() => c,
            _ => self.connect().await?,
        };
        let reply = conn.exchange(request).await?;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
        Ok(reply)
    }

    /// Opens a stream on a connection of its own: the server's first answer, and the
    /// connection its further payloads arrive on.
    pub async fn open(&self, request: Payload) -> Result<(Payload, Connection), String> {
        let mut conn = self.connect().await?;
        let first = conn.exchange(request).await?;
        Ok((first, conn))
    }
}

/// A control plane's door: answers the calls of its clients.
#[async_trait::async_trait]
pub trait Server: Send + Sync + 'static {
    /// What its clients send.
    type Request: Send + Sync + 'static;
    /// Answers one call on `tx`; whether the connection may carry another.
    async fn answer(
        &self,
        tx: &madsim::net::Sender,
        request: Self::Request,
        from: SocketAddr,
    ) -> bool;
}

/// Tasks accepting connections side by side: madsim's `accept1` sleeps at least 1 ms of
/// simulated time per connection, which caps one accepting task at 1,000 connections a second
/// (a thousand members reconnecting at once would wait a second in line).
const ACCEPTORS: usize = 64;

/// Serves `server` on `port` of this node until the node dies: each connection's calls one
/// after the other, until it closes (or carries a stream, which runs until it ends).
pub async fn serve<S: Server>(server: Arc<S>, port: u16) -> std::io::Result<()> {
    let ep = Arc::new(Endpoint::bind(("0.0.0.0", port)).await?);
    let acceptors: Vec<_> = (0..ACCEPTORS)
        .map(|_| {
            let (ep, server) = (ep.clone(), server.clone());
            madsim::task::spawn(async move {
                while let Ok((tx, mut rx, from)) = ep.accept1().await {
                    let server = server.clone();
                    madsim::task::spawn(async move {
                        while let Ok(payload) = rx.recv().await {
                            let Ok(request) = payload.downcast::<S::Request>() else {
                                return;
                            };
                            if !server.answer(&tx, *request, from).await {
                                return;
                            }
                        }
                    });
                }
            })
        })
        .collect();
    for a in acceptors {
        let _ = a.await;
    }
    Ok(())
}

/// Forwards `items` on `tx` until one is an error (`failed`), `reset` fires, `limit` passes,
/// or the client goes away.
pub async fn forward<I: Send + Sync + 'static>(
    tx: &madsim::net::Sender,
    mut items: std::pin::Pin<Box<dyn futures::Stream<Item = I> + Send>>,
    failed: fn(&I) -> bool,
    reset: &tokio::sync::Notify,
    limit: std::time::Duration,
) {
    use futures::StreamExt;
    let reset = reset.notified();
    tokio::pin!(reset);
    let timeout = madsim::time::sleep(limit);
    tokio::pin!(timeout);
    loop {
        tokio::select! {
            biased;
            _ = &mut reset => return,
            _ = &mut timeout => return,
            _ = tx.closed() => return,
            item = items.next() => {
                let Some(item) = item else { return };
                let failed = failed(&item);
                if tx.send(Box::new(item) as Payload).await.is_err() || failed {
                    return;
                }
            }
        }
    }
}
