//! Listing and watching one kind of object forever, feeding the view (client-go's reflector:
//! list, watch from the list's version, relist after 410 Gone, with backoff and jitter).

use super::*;

/// A watch that ends cleanly sooner than this after it opened, with no event, is retried with
/// backoff rather than reopened at once (client-go's "very short watch").
const SHORT_WATCH: Duration = Duration::from_secs(1);

/// The most pages one list may take (a server that never stops answering with a continue
/// token fails the list instead of growing it forever).
const MAX_LIST_PAGES: u32 = 10_000;

impl Session {
    /// Lists and watches one kind of object forever, feeding the view.
    /// Ends when `w` is no longer watched (a shard this member stopped monitoring).
    pub(super) async fn reflect<W: Watched>(self: Arc<Self>, w: W) {
        let mut attempt = 0u32;
        loop {
            // Another list or watch of the resource was told to come back later (a 429):
            // so is this one (looked at again after the wait: another 429 may have come
            // meanwhile).
            while !sim::flaw("k8s-retry-after-per-watch") {
                let held_until = lock(&self.read_gates).get(w.resource()).copied();
                let wait = held_until
                    .map(|until| until.saturating_duration_since(self.clock().now()))
                    .unwrap_or_default();
                if wait.is_zero() {
                    break;
                }
                self.clock().sleep(wait).await;
            }
            let Some(next) = w.reflector(&mut lock(&self.view)).map(|r| r.next()) else {
                return;
            };
            let result = match next {
                Next::List { resource_version } => self.list(&w, &resource_version).await,
                Next::Watch { resource_version } => {
                    self.watch(&w, &resource_version, &mut attempt).await
                }
            };
            let Err(e) = result else {
                attempt = 0;
                continue;
            };
            {
                let mut view = lock(&self.view);
                if let Some(r) = w.reflector(&mut view) {
                    r.failed(&e.error);
                }
            }
            if matches!(e.error, ApiError::Rejected(_)) {
                tracing::error!(kind = %w.kind(), error = %e, "the API server refuses this watch (check the Role and the namespace)");
                *lock(&self.refused) = Some(e.to_string());
            }
            if matches!(e.error, ApiError::Gone(_)) {
                self.metrics.relists.inc();
                // Spread out: an API-server restart or a compaction sends every member here at
                // the same moment, and their lists would land together.
                let spread = jitter(self.clock().as_ref(), self.config.relist_jitter);
                tracing::info!(kind = %w.kind(), error = %e, ?spread, "watch version gone; relisting");
                self.clock().sleep(spread).await;
                continue;
            }
            self.metrics.watch_reopens.inc();
            let backoff = self
                .config
                .backoff
                .delay(attempt, self.clock().as_ref())
                .min(self.config.renew_interval());
            // A 429 says when to come back: not sooner (the list or watch would only be shed
            // again, and add to the queue that shed it).
            let delay = e.error.retry_delay(backoff);
            if e.error.retry_after().is_some() {
                let until = self.clock().now() + delay;
                let mut gates = lock(&self.read_gates);
                let gate = gates.entry(w.resource()).or_insert(until);
                *gate = (*gate).max(until);
            }
            if e.error.retry_after().is_some() {
                tracing::warn!(kind = %w.kind(), error = %e, ?delay, "list or watch shed by the API server (429); retrying after Retry-After");
            } else {
                tracing::debug!(kind = %w.kind(), error = %e, ?delay, "watch ended; reopening");
            }
            attempt = attempt.saturating_add(1);
            self.clock().sleep(delay).await;
        }
    }

    /// Lists in pages of `list_page_size`, then hands the whole list over at once. A page
    /// whose continuation is gone (`410`) fails the list: the reflector lists again from the
    /// start with a quorum read.
    pub(super) async fn list<W: Watched>(
        &self,
        w: &W,
        not_older_than: &str,
    ) -> Result<(), CallError> {
        let mut options = ListOptions {
            resource_version: not_older_than.to_string(),
            limit: self.config.list_page_size,
            continue_token: None,
        };
        let mut list = w.list(self, &options).await?;
        let mut pages = 1u32;
        while let Some(token) = list.continue_token.take() {
            pages += 1;
            if pages > MAX_LIST_PAGES {
                return Err(CallError {
                    what: format!("list {}", w.kind()),
                    error: ApiError::Unavailable(format!(
                        "more than {MAX_LIST_PAGES} pages: the server keeps answering with a continue token"
                    )),
                });
            }
            options.resource_version.clear();
            options.continue_token = Some(token);
            let page = w.list(self, &options).await?;
            list.items.extend(page.items);
            list.continue_token = page.continue_token;
        }
        if pages > 1 {
            tracing::debug!(
                kind = %w.kind(),
                pages,
                objects = list.items.len(),
                "listed in pages"
            );
        }
        let now = self.clock().now();
        {
            let mut view = lock(&self.view);
            if w.reflector(&mut view).is_none() {
                return Ok(()); // No longer watched.
            }
            w.listed(&mut view, &list, now);
            if let Some(r) = w.reflector(&mut view) {
                let outcome = r.listed(list);
                w.taken(&mut view, &outcome);
            }
        }
        self.view_changed.notify_one();
        Ok(())
    }

    pub(super) async fn watch<W: Watched>(
        &self,
        w: &W,
        from: &str,
        attempt: &mut u32,
    ) -> Result<(), CallError> {
        let mut stream = w.watch(self, from).await?;
        let opened = self.clock().now();
        let mut events = 0u64;
        // One timer per idle period, not one per event (see `IdleTimeout`).
        let mut idle = IdleTimeout::new(self.clock().clone(), self.config.watch_idle_timeout);
        loop {
            let event = match idle.run(stream.next()).await {
                Err(_) => {
                    return Err(CallError {
                        what: format!("watch {}", w.kind()),
                        error: ApiError::Unavailable(format!(
                            "quiet for {:?}",
                            self.config.watch_idle_timeout
                        )),
                    });
                }
                Ok(None) => {
                    // A watch the server ends at once without a single event (not even a
                    // bookmark) is a server in trouble, not a watch timeout: reopening it at
                    // once would loop. It is retried with backoff, as client-go does.
                    let lasted = self.clock().now().saturating_duration_since(opened);
                    if events == 0 && lasted < SHORT_WATCH {
                        return Err(CallError {
                            what: format!("watch {}", w.kind()),
                            error: ApiError::Unavailable(format!(
                                "very short watch: ended after {lasted:?} with no event"
                            )),
                        });
                    }
                    return Ok(());
                }
                Ok(Some(Err(error))) => {
                    return Err(CallError {
                        what: format!("watch {}", w.kind()),
                        error,
                    });
                }
                Ok(Some(Ok(event))) => event,
            };
            events += 1;
            *attempt = 0;
            let now = self.clock().now();
            // Only a change of what the members are wakes the reconciler: a renewal of another
            // member's Lease changes nothing to publish (expiry is judged at this member's own
            // renewals, which wake it themselves), so a large cluster's stream of renewals
            // costs one index probe each.
            let changed = {
                let mut view = lock(&self.view);
                if w.reflector(&mut view).is_none() {
                    return Ok(()); // No longer watched.
                }
                w.observed(&mut view, &event, now);
                if let Some(r) = w.reflector(&mut view) {
                    let outcome = r.event(event);
                    w.taken(&mut view, &outcome);
                }
                view.dirty || view.unbeaten.pending()
            };
            if changed {
                self.view_changed.notify_one();
            }
        }
    }
}
