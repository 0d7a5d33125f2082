//! The desired-row change feed: which users' rows changed, as soon as the
//! database can tell.
//!
//! SQLite: poll for revisions above the last seen (cheap: an index range
//! scan that returns nothing when nothing changed). PostgreSQL: LISTEN on the
//! triggers' channel for the user id itself, plus the same poll as a safety
//! net (a notification is lost when the listening connection drops).
//!
//! Each user is handed on at most once per poll interval (the [`Spacer`]):
//! a change to a user handed on less than an interval ago is handed on with
//! a delay that ends the interval. A storm of activity updates (a thousand
//! touches a second) then costs each touched user at most one reconcile per
//! interval whether it comes through NOTIFY or the poll, while a change to a
//! quiet user is handed on at once.
//!
//! PostgreSQL assigns a revision when a row is written but transactions
//! commit in any order, so a poll that saw revision N+1 may later find N
//! committed. The [`Cursor`] remembers such gaps and asks for them again
//! until they fill or age out (a rolled-back transaction leaves a gap that
//! never fills); the periodic full resync covers anything older. Only the
//! 1024 revisions just below the newest are remembered, so a counter moved
//! far ahead costs the feed no more than an ordinary step.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::store::{DesiredChange, Pool, Store};

/// Rows read per poll; a full page is followed by another poll at once.
const PAGE: u64 = 1000;
/// Gaps remembered at most; beyond this the oldest are dropped (the resync covers them).
const MAX_GAPS: usize = 1024;

/// Where the feed is: the highest revision seen and the revisions below it
/// not yet seen (maybe still uncommitted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    last: i64,
    gaps: BTreeMap<i64, Instant>,
    gap_ttl: Duration,
}

impl Cursor {
    /// A cursor after revision `last`; gaps are asked for during `gap_ttl`.
    pub fn new(last: i64, gap_ttl: Duration) -> Self {
        Self {
            last,
            gaps: BTreeMap::new(),
            gap_ttl,
        }
    }

    /// The highest revision seen.
    pub fn last(&self) -> i64 {
        self.last
    }

    /// Revisions below `last` still worth asking for.
    pub fn gaps(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }

    /// Takes in a poll's result (ordered by revision) at `now`. A jump of
    /// any size costs at most [`MAX_GAPS`] insertions: only the revisions
    /// just below the new one are remembered (a writer may move the counter
    /// far ahead; README, "Revisions").
    pub fn advance(&mut self, changes: &[DesiredChange], now: Instant) {
        for change in changes {
            if change.revision > self.last {
                if !self.gap_ttl.is_zero() {
                    let nearest = change.revision.saturating_sub(MAX_GAPS as i64);
                    for missing in self.last.saturating_add(1).max(nearest)..change.revision {
                        self.gaps.insert(missing, now);
                    }
                }
                self.last = change.revision;
            } else {
                self.gaps.remove(&change.revision);
            }
        }
        let ttl = self.gap_ttl;
        self.gaps.retain(|_, seen| now.duration_since(*seen) < ttl);
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
    }
}

/// Spaces the hand-ons of each user at least `window` apart.
///
/// A delayed hand-on is never dropped: every change gets one, at the end of
/// the user's current window (the queue keeps one entry per key, so asking
/// again for a key that is still waiting costs nothing, and asks again if
/// some other trigger took the key early).
#[derive(Debug)]
pub struct Spacer {
    window: Duration,
    /// Per user: when it was last handed on (or will be, if in the future).
    last: HashMap<String, Instant>,
    pruned_at: Option<Instant>,
}

impl Spacer {
    /// Hand-ons of one user at least `window` apart (zero: no spacing).
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            last: HashMap::new(),
            pruned_at: None,
        }
    }

    /// How long to wait before handing on a change of `user` seen at `now`.
    pub fn delay(&mut self, user: &str, now: Instant) -> Duration {
        if self.window.is_zero() {
            return Duration::ZERO;
        }
        self.prune(now);
        let at = match self.last.get(user) {
            // Not handed on within the window: at once.
            None => now,
            Some(&last) if last + self.window <= now => now,
            // A hand-on is still to come: with that one.
            Some(&last) if last > now => last,
            Some(&last) => last + self.window,
        };
        match self.last.get_mut(user) {
            Some(last) => *last = at,
            None => {
                self.last.insert(user.to_owned(), at);
            }
        }
        at - now
    }

    /// Users remembered (those handed on within the last window).
    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// True when no user is remembered.
    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    /// Forgets users whose window is over, at most once per window.
    fn prune(&mut self, now: Instant) {
        if self
            .pruned_at
            .is_some_and(|at| now.duration_since(at) < self.window)
        {
            return;
        }
        self.pruned_at = Some(now);
        let window = self.window;
        self.last.retain(|_, last| *last + window > now);
    }
}

/// Settings of the feed.
#[derive(Clone, Copy, Debug)]
pub struct FeedOptions {
    /// Poll period.
    pub poll_interval: Duration,
    /// How long a missing revision is asked for.
    pub gap_ttl: Duration,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(250),
            gap_ttl: Duration::from_secs(10),
        }
    }
}

/// Runs the feed from revision `start` until the task is dropped, handing
/// every changed user id to `sink` with how long to wait before acting on it
/// (zero, or the rest of the user's spacing window; `sink` must not block).
/// Spacing windows and gap ages are read from `clock`.
pub async fn run<F>(store: Store, start: i64, options: FeedOptions, clock: Clock, sink: F)
where
    F: Fn(String, Duration) + Send + Sync + 'static,
{
    let spacer = Mutex::new(Spacer::new(options.poll_interval));
    let sink = Arc::new(move |user: String| {
        let delay = spacer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .delay(&user, clock.now());
        sink(user, delay);
    });
    let wake = Arc::new(Notify::new());
    let listener = store.listen_pool().map(|pool| {
        tokio::spawn(listen(
            pool.clone(),
            clawfleet_migration::NOTIFY_CHANNEL,
            sink.clone(),
            wake.clone(),
        ))
    });
    let _abort_listener = AbortOnDrop(listener);
    // SQLite commits one writer at a time, in revision order: a revision it
    // skipped belongs to a row updated again since, never to a transaction
    // still open. Only PostgreSQL needs gaps asked for again.
    let gap_ttl = match store.pool() {
        Pool::Postgres(_) => options.gap_ttl,
        Pool::Sqlite(_) => Duration::ZERO,
    };
    let mut cursor = Cursor::new(start, gap_ttl);
    let mut failing = false;
    loop {
        match store
            .desired_changes(cursor.last(), &cursor.gaps(), PAGE)
            .await
        {
            Ok(changes) => {
                if failing {
                    debug!("desired change feed recovered");
                    failing = false;
                }
                cursor.advance(&changes, clock.now());
                let full = changes.len() as u64 >= PAGE;
                for change in changes {
                    sink(change.user_id);
                }
                if full {
                    continue;
                }
            }
            Err(e) => {
                if !failing {
                    warn!(error = %e, "desired change feed cannot read the database; retrying");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(options.poll_interval) => {}
            _ = wake.notified() => {}
        }
    }
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = &self.0 {
            handle.abort();
        }
    }
}

/// On PostgreSQL, hands every user id whose `container_status` row changes
/// (in any process) to the store's status-change channel, so API waiters on a
/// process that does not reconcile learn of it at once. Runs until dropped;
/// returns at once on SQLite (one process writes and waits).
pub async fn status_notifications(store: Store) {
    let Some(pool) = store.listen_pool().cloned() else {
        return;
    };
    let announcer = store.clone();
    listen(
        pool,
        clawfleet_migration::STATUS_NOTIFY_CHANNEL,
        Arc::new(move |user: String| announcer.announce_status(&user)),
        Arc::new(Notify::new()),
    )
    .await
}

/// Forwards NOTIFY payloads (user ids) of `channel`; wakes the poller when
/// notifications may have been lost (reconnect) or a payload was too long to
/// carry the id.
async fn listen<F>(pool: sqlx::PgPool, channel: &'static str, sink: Arc<F>, wake: Arc<Notify>)
where
    F: Fn(String) + Send + Sync + 'static,
{
    let mut delay = Duration::from_millis(200);
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                debug!(error = %e, "LISTEN connection failed; polling covers the gap");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = listener.listen(channel).await {
            debug!(error = %e, "LISTEN failed; polling covers the gap");
            tokio::time::sleep(delay).await;
            continue;
        }
        delay = Duration::from_millis(200);
        // Anything committed while we were not listening is found by a poll.
        wake.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if !n.payload().is_empty() => sink(n.payload().to_owned()),
                Ok(Some(_)) => wake.notify_one(),
                Ok(None) => {
                    // The connection dropped and will be re-established: poll.
                    wake.notify_one();
                }
                Err(e) => {
                    debug!(error = %e, "LISTEN connection lost");
                    wake.notify_one();
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(user: &str, revision: i64) -> DesiredChange {
        DesiredChange {
            user_id: user.into(),
            revision,
            deleted: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_skipped_revision_is_asked_for_until_it_is_seen() {
        let mut c = Cursor::new(10, Duration::from_secs(60));
        c.advance(&[change("a", 11), change("b", 14)], Instant::now());
        assert_eq!(c.last(), 14);
        assert_eq!(c.gaps(), [12, 13]);
        c.advance(&[change("late", 12)], Instant::now());
        assert_eq!(c.gaps(), [13]);
        assert_eq!(c.last(), 14);
    }

    #[tokio::test(start_paused = true)]
    async fn a_gap_that_never_fills_ages_out() {
        let mut c = Cursor::new(0, Duration::from_secs(60));
        c.advance(&[change("a", 3)], Instant::now());
        assert_eq!(c.gaps(), [1, 2]);
        tokio::time::advance(Duration::from_secs(61)).await;
        c.advance(&[], Instant::now());
        assert!(c.gaps().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_user_is_handed_on_at_once() {
        let mut s = Spacer::new(Duration::from_millis(250));
        let t0 = Instant::now();
        assert_eq!(s.delay("a", t0), Duration::ZERO);
        assert_eq!(
            s.delay("b", t0),
            Duration::ZERO,
            "users are spaced apart on their own"
        );
        assert_eq!(
            s.delay("a", t0 + Duration::from_millis(250)),
            Duration::ZERO,
            "a window that is over holds nothing back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_a_window_are_handed_on_at_its_end_once_per_window() {
        let ms = Duration::from_millis;
        let mut s = Spacer::new(ms(250));
        let t0 = Instant::now();
        assert_eq!(s.delay("a", t0), Duration::ZERO);
        // Within the first window: all at its end.
        assert_eq!(s.delay("a", t0 + ms(10)), ms(240));
        assert_eq!(s.delay("a", t0 + ms(100)), ms(150));
        assert_eq!(s.delay("a", t0 + ms(249)), ms(1));
        // After that hand-on (at 250), the next window ends at 500.
        assert_eq!(s.delay("a", t0 + ms(260)), ms(240));
        // A thousand changes over a second: one hand-on per window.
        let mut at: Vec<Duration> = (0..1000)
            .map(|i| {
                let now = t0 + ms(1000) + ms(i);
                (now + s.delay("a", now)) - t0
            })
            .collect();
        at.dedup();
        assert_eq!(at, [ms(1000), ms(1250), ms(1500), ms(1750), ms(2000)]);
    }

    #[tokio::test(start_paused = true)]
    async fn users_whose_window_is_over_are_forgotten() {
        let ms = Duration::from_millis;
        let mut s = Spacer::new(ms(250));
        let t0 = Instant::now();
        for i in 0..100 {
            s.delay(&format!("u{i}"), t0);
        }
        assert_eq!(s.len(), 100);
        s.delay("late", t0 + ms(300));
        assert_eq!(s.len(), 1, "only the user of the current window is kept");
        assert!(Spacer::new(Duration::ZERO).is_empty());
        assert_eq!(
            Spacer::new(Duration::ZERO).delay("a", t0),
            Duration::ZERO,
            "no window, no spacing"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_revision_counter_moved_far_ahead_keeps_only_the_newest_gaps() {
        // Regression: advance inserted every missing revision before trimming,
        // so a writer moving the counter ahead by 10^12 stalled the feed (and
        // ran it out of memory).
        let mut c = Cursor::new(7, Duration::from_secs(60));
        let far = 7 + 1_000_000_000_000;
        c.advance(&[change("a", far)], Instant::now());
        assert_eq!(c.last(), far);
        let gaps = c.gaps();
        assert_eq!(gaps.len(), MAX_GAPS);
        assert_eq!(gaps.first(), Some(&(far - MAX_GAPS as i64)));
        assert_eq!(gaps.last(), Some(&(far - 1)));
        c.advance(&[change("b", i64::MAX)], Instant::now());
        assert_eq!(c.last(), i64::MAX);
        assert_eq!(c.gaps().len(), MAX_GAPS, "the oldest gaps made way");
        assert_eq!(c.gaps().last(), Some(&(i64::MAX - 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cursor_without_gap_tracking_remembers_no_gaps() {
        // SQLite: no revision is ever committed late.
        let mut c = Cursor::new(0, Duration::ZERO);
        c.advance(&[change("a", 1_000_000_000_000)], Instant::now());
        assert_eq!(c.last(), 1_000_000_000_000);
        assert!(c.gaps().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn gaps_are_bounded() {
        let mut c = Cursor::new(0, Duration::from_secs(60));
        c.advance(&[change("a", 10_000)], Instant::now());
        assert_eq!(c.gaps().len(), MAX_GAPS);
        assert_eq!(c.gaps().last(), Some(&9_999), "the newest gaps are kept");
    }
}
