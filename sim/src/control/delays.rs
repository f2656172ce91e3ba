//! Late answers and lagging watches, per member, for the doors that model them (faults
//! `slow-answers` and `lagging-watch`): a request is applied when it arrives and only its
//! answer leaves late; a watch response leaves a delay after it was made, in order.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use madsim::time::Instant;

use crate::record::Recorder;

/// A boxed stream of watch items, as the doors forward them.
pub type Items<T> = Pin<Box<dyn Stream<Item = T> + Send>>;

type PerMember = Arc<Mutex<BTreeMap<IpAddr, Duration>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How late a door answers and streams to each member.
#[derive(Debug, Default)]
pub struct Delays {
    answers: PerMember,
    watches: PerMember,
}

fn set(map: &PerMember, ip: IpAddr, delay: Option<Duration>) {
    let mut m = lock(map);
    match delay {
        Some(d) => m.insert(ip, d),
        None => m.remove(&ip),
    };
}

impl Delays {
    /// Answers to `ip` leave `delay` late (`None`: on time again).
    pub fn set_answers(&self, ip: IpAddr, delay: Option<Duration>) {
        set(&self.answers, ip, delay);
    }

    /// Watch responses to `ip` leave `delay` after they were made (`None`: at once again).
    pub fn set_watches(&self, ip: IpAddr, delay: Option<Duration>) {
        set(&self.watches, ip, delay);
    }

    /// Everything on time again.
    pub fn clear(&self) {
        lock(&self.answers).clear();
        lock(&self.watches).clear();
    }

    /// Waits before an answer to `to` leaves, if its answers are late (the request was applied
    /// already).
    pub async fn hold_answer(&self, to: IpAddr, rec: &Recorder) {
        let late = lock(&self.answers).get(&to).copied();
        if let Some(delay) = late {
            rec.count("door: answers sent late");
            madsim::time::sleep(delay).await;
        }
    }

    /// `stream` as `to` receives it: while `to` lags, each item leaves the delay after it was
    /// made, in order (an item made on time follows the late ones before it). Without a lag it
    /// is passed through as it comes, with no timer or task of its own.
    pub fn lag<T: Send + 'static>(&self, stream: Items<T>, to: IpAddr, rec: &Recorder) -> Items<T> {
        struct State<T> {
            inner: Option<Items<T>>,
            due: VecDeque<(Instant, T)>,
        }
        let (lags, rec) = (self.watches.clone(), rec.clone());
        let state = State {
            inner: Some(stream),
            due: VecDeque::new(),
        };
        Box::pin(futures::stream::unfold(state, move |mut st| {
            let (lags, rec) = (lags.clone(), rec.clone());
            async move {
                loop {
                    if st.due.front().is_some_and(|(at, _)| *at <= Instant::now()) {
                        let (_, item) = st.due.pop_front()?;
                        return Some((item, st));
                    }
                    let Some(inner) = st.inner.as_mut() else {
                        // The stream ended: what is queued still leaves, at its time.
                        let (at, item) = st.due.pop_front()?;
                        madsim::time::sleep_until(at).await;
                        return Some((item, st));
                    };
                    let next = match st.due.front().map(|(at, _)| *at) {
                        None => inner.next().await,
                        Some(at) => {
                            tokio::select! {
                                biased;
                                () = madsim::time::sleep_until(at) => continue,
                                next = inner.next() => next,
                            }
                        }
                    };
                    let Some(item) = next else {
                        st.inner = None;
                        continue;
                    };
                    let lag = lock(&lags).get(&to).copied();
                    match lag {
                        None if st.due.is_empty() => return Some((item, st)),
                        lag => {
                            if lag.is_some() {
                                rec.count("door: watch responses sent late");
                            }
                            st.due
                                .push_back((Instant::now() + lag.unwrap_or_default(), item));
                        }
                    }
                }
            }
        }))
    }
}
