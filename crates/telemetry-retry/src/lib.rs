//! Waiting out what waiting mends, in one place for every service and the store:
//!
//! - [`retry`]: an operation retried with capped exponential backoff ([`RETRY_BACKOFF`]) until it
//!   succeeds or shutdown;
//! - [`retry_halving`]: a batch written that way, and split in halves around the items the
//!   database refuses (their own fault, not the database's), so one bad record never holds back
//!   the others.
//!
//! A crate of its own so that the store (and anything else) can use it without the HTTP stack of
//! `telemetry-ops`.

use std::ops::Range;

use tokio_util::sync::CancellationToken;

/// Shortest and longest wait between retries of a failed database write or produce.
pub const RETRY_BACKOFF: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(200),
    std::time::Duration::from_secs(30),
);

/// Retries `attempt` with capped exponential backoff until it succeeds (`Some`) or `shutdown` is
/// cancelled (`None`, also mid-attempt). Every failure is logged with `what`.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<T>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let (mut backoff, max_backoff) = RETRY_BACKOFF;
    loop {
        // An attempt against a hung database may take long; shutdown does not wait for it (an
        // abandoned transaction is rolled back, and the batch is redelivered).
        let result = tokio::select! {
            () = shutdown.cancelled() => return None,
            result = attempt() => result,
        };
        match result {
            Ok(value) => return Some(value),
            Err(error) => {
                tracing::warn!(%error, retry_in = ?backoff, "{what} failed; retrying.");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

/// What [`retry_halving`] did with a batch.
#[derive(Debug)]
pub struct Halved<O, E> {
    /// Each part written: its range in the batch and what the write returned, in writing order.
    pub done: Vec<(Range<usize>, O)>,
    /// The items refused alone: their index in the batch and the error, in batch order.
    pub refused: Vec<(usize, E)>,
}

/// Writes `items` with `attempt`, retrying as [`retry`] while it fails with an error waiting may
/// mend. When it fails with an error `about_the_items` says is the items' own (the database
/// refused the data), the part is split in halves, and those in halves, until each refused item
/// is alone; the others are written. `None` when `shutdown` came first.
pub async fn retry_halving<'a, T, O, E, F, Fut>(
    what: &str,
    items: &'a [T],
    shutdown: &CancellationToken,
    about_the_items: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Option<Halved<O, E>>
where
    E: std::fmt::Display,
    F: FnMut(&'a [T]) -> Fut,
    Fut: std::future::Future<Output = std::result::Result<O, E>>,
{
    let mut halved = Halved {
        done: Vec::new(),
        refused: Vec::new(),
    };
    let about_the_items = &about_the_items;
    let mut parts = Vec::new();
    parts.push(0..items.len());
    while let Some(part) = parts.pop() {
        if part.is_empty() {
            continue;
        }
        let chunk = &items[part.clone()];
        // Ok(Err(..)): refused for its data, taken out of the retry loop.
        let outcome = retry(what, shutdown, || {
            let pending = attempt(chunk);
            async move {
                match pending.await {
                    Ok(value) => Ok(Ok(value)),
                    Err(error) if about_the_items(&error) => Ok(Err(error)),
                    Err(error) => Err(error),
                }
            }
        })
        .await?;
        match outcome {
            Ok(value) => halved.done.push((part, value)),
            Err(error) if part.len() == 1 => halved.refused.push((part.start, error)),
            Err(_) => {
                let middle = part.start + part.len() / 2;
                // The first half is written first.
                parts.push(middle..part.end);
                parts.push(part.start..middle);
            }
        }
    }
    halved.refused.sort_unstable_by_key(|(index, _)| *index);
    Some(halved)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::cell::Cell;

    /// The error of a part: refused (the items' own fault) or unavailable (waiting mends it).
    #[derive(Debug, PartialEq)]
    enum Failure {
        Refused,
        Unavailable,
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    #[tokio::test]
    async fn refused_items_are_isolated_and_the_rest_written_once() {
        let items: Vec<u32> = (0..10).collect();
        let unavailable_once = Cell::new(true);
        let written = std::cell::RefCell::new(Vec::new());
        let halved = retry_halving(
            "Writing",
            &items,
            &CancellationToken::new(),
            |failure: &Failure| *failure == Failure::Refused,
            |chunk: &[u32]| {
                let result = if unavailable_once.replace(false) {
                    Err(Failure::Unavailable)
                } else if chunk.contains(&3) || chunk.contains(&7) {
                    Err(Failure::Refused)
                } else {
                    written.borrow_mut().extend_from_slice(chunk);
                    Ok(chunk.len())
                };
                async move { result }
            },
        )
        .await
        .unwrap();
        let refused: Vec<usize> = halved.refused.iter().map(|(index, _)| *index).collect();
        assert_eq!(refused, [3, 7]);
        let mut written = written.into_inner();
        written.sort_unstable();
        assert_eq!(written, [0, 1, 2, 4, 5, 6, 8, 9], "each of the others once");
        assert_eq!(halved.done.iter().map(|(_, count)| count).sum::<usize>(), 8);
    }

    #[tokio::test]
    async fn shutdown_ends_the_wait() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let halved = retry_halving(
            "Writing",
            &[1, 2],
            &shutdown,
            |_: &Failure| false,
            |_: &[i32]| async { Err::<(), _>(Failure::Unavailable) },
        )
        .await;
        assert!(halved.is_none());
    }
}
