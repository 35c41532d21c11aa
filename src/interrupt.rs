//! Ctrl-C and SIGTERM: a run stops between batches, never inside one, and says what it wrote.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Signal numbers as the shell reports them (exit status 128 + number).
pub const SIGINT: i32 = 2;
pub const SIGTERM: i32 = 15;

/// How long after the first signal the process may still run, in milliseconds; 0 until a
/// connection sets it. Every wait of the tool is bounded on its own (see `db::Deadlines`); this
/// is the backstop that holds whatever a future change forgets.
static AFTER_SIGNAL_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the longest the run may take to end after the first signal: the batch in flight or the
/// cancel of the planning statement, then closing the connections, all within their deadlines.
pub(crate) fn bound_after_signal(limit: Duration) {
    let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX);
    AFTER_SIGNAL_MS.store(millis, Ordering::SeqCst);
}

/// Tells a run that it has been asked to stop, and by which signal.
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<Option<i32>>);

impl StopSignal {
    /// A signal that never fires: for library callers that handle signals themselves.
    pub fn never() -> StopSignal {
        StopSignal(watch::channel(None).1)
    }

    /// A signal the caller raises by sending `Some(signal number)`; for tests.
    pub fn manual() -> (StopSignal, watch::Sender<Option<i32>>) {
        let (sender, receiver) = watch::channel(None);
        (StopSignal(receiver), sender)
    }

    /// Listens for SIGINT and SIGTERM. The first asks the run to stop after the batch in flight;
    /// a second one exits at once (the server rolls back whatever transaction is open).
    pub(crate) fn from_os() -> Result<StopSignal> {
        let mut interrupt =
            signal(SignalKind::interrupt()).context("could not listen for SIGINT")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("could not listen for SIGTERM")?;
        let (sender, receiver) = watch::channel(None);
        tokio::spawn(async move {
            let mut first = None;
            loop {
                let number = tokio::select! {
                    _ = interrupt.recv() => SIGINT,
                    _ = terminate.recv() => SIGTERM,
                };
                match first {
                    None => {
                        first = Some(number);
                        tracing::warn!(
                            signal = number,
                            "stopping after the batch in flight; signal again to exit at once"
                        );
                        let _ = sender.send(Some(number));
                        let limit = AFTER_SIGNAL_MS.load(Ordering::SeqCst);
                        if limit > 0 {
                            tokio::spawn(async move {
                                tokio::time::sleep(Duration::from_millis(limit)).await;
                                tracing::error!(
                                    signal = number,
                                    "the run did not end within {:?} of the signal: exiting; \
                                     the server rolls back the transaction in flight",
                                    Duration::from_millis(limit)
                                );
                                std::process::exit(128 + number);
                            });
                        }
                    }
                    Some(_) => std::process::exit(128 + number),
                }
            }
        });
        Ok(StopSignal(receiver))
    }

    /// The signal received so far, if any.
    pub(crate) fn raised(&self) -> Option<i32> {
        *self.0.borrow()
    }

    /// Resolves when a signal arrives; never, for [`StopSignal::never`].
    pub async fn wait(&mut self) -> i32 {
        loop {
            if let Some(number) = *self.0.borrow_and_update() {
                return number;
            }
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
