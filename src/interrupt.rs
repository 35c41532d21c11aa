//! Ctrl-C, SIGTERM and a closed stdout: a run stops between batches, never inside one, and says
//! what it wrote. A second signal abandons the batch in flight (the server rolls it back) and the
//! run still reports how it ended.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

pub(crate) use crate::outcome::SIGPIPE;
use crate::outcome::{Phase, Stop};
pub use crate::outcome::{SIGINT, SIGTERM};

/// How long the run may take to report after a second signal before the process exits anyway:
/// the operator asked to leave at once, and a dead link must not keep them.
pub(crate) const SECOND_SIGNAL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Raised {
    first: Option<i32>,
    again: bool,
}

/// After the first signal: the process exits with 128 + `number` once the bound set by
/// [`bound_after_signal`] has passed, whatever the run still waits on.
fn backstop(number: i32) {
    let limit = AFTER_SIGNAL_MS.load(Ordering::SeqCst);
    if limit == 0 {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(limit)).await;
        tracing::error!(
            signal = number,
            "the run did not end within {:?} of the signal: exiting; the server rolls back the \
             transaction in flight",
            Duration::from_millis(limit)
        );
        std::process::exit(128 + number);
    });
}

/// How long after the first signal the process may still run, in milliseconds; 0 until a
/// connection sets it. Every wait of the tool is bounded on its own (see `db::Deadlines`); this
/// is the backstop that holds whatever a future change forgets.
static AFTER_SIGNAL_MS: AtomicU64 = AtomicU64::new(0);

/// Sets the longest the run may take to end after the first signal: the batch in flight or the
/// cancel of the planning statement, then closing the connections, all within their deadlines.
pub(crate) fn bound_after_signal(limit: Duration) {
    AFTER_SIGNAL_MS.store(crate::domain::millis(limit), Ordering::SeqCst);
}

/// Tells a run that it has been asked to stop, by what, and whether twice.
#[derive(Clone)]
pub struct StopSignal {
    receiver: watch::Receiver<Raised>,
    sender: Arc<watch::Sender<Raised>>,
    /// What the run is doing, so the first signal's message says what stopping means now.
    phase: Arc<AtomicU8>,
}

impl StopSignal {
    fn new() -> StopSignal {
        let (sender, receiver) = watch::channel(Raised::default());
        StopSignal {
            receiver,
            sender: Arc::new(sender),
            phase: Arc::new(AtomicU8::new(0)),
        }
    }

    /// A signal nothing raises but the run itself: for library callers and tests.
    pub fn never() -> StopSignal {
        StopSignal::new()
    }

    /// A signal the caller raises with [`StopSignal::raise`]; for tests.
    pub fn manual() -> StopSignal {
        StopSignal::new()
    }

    /// Listens for SIGINT and SIGTERM. The first asks the run to stop at the next safe point; a
    /// second abandons the batch in flight, and the process exits within
    /// [`SECOND_SIGNAL_GRACE`] whatever the run is waiting on.
    pub(crate) fn from_os() -> Result<StopSignal> {
        let mut interrupt =
            signal(SignalKind::interrupt()).context("could not listen for SIGINT")?;
        let mut terminate =
            signal(SignalKind::terminate()).context("could not listen for SIGTERM")?;
        let stop = StopSignal::new();
        let raiser = stop.clone();
        tokio::spawn(async move {
            loop {
                let number = tokio::select! {
                    _ = interrupt.recv() => SIGINT,
                    _ = terminate.recv() => SIGTERM,
                };
                let twice = raiser.raised().is_some();
                raiser.raise(number);
                if !twice {
                    backstop(number);
                } else {
                    tracing::warn!(
                        signal = number,
                        "second signal: abandoning the batch in flight (the server rolls it back)"
                    );
                    tokio::time::sleep(SECOND_SIGNAL_GRACE).await;
                    eprintln!(
                        "error: the run did not end within {}s of the second signal: exiting \
                         now; the server rolls back any open transaction; 'agent-type-backfill \
                         history' shows what was written",
                        SECOND_SIGNAL_GRACE.as_secs()
                    );
                    std::process::exit(128 + number);
                }
            }
        });
        Ok(stop)
    }

    /// Asks the run to stop: the first time by `number` (a signal, or [`SIGPIPE`] for a closed
    /// stdout), then again.
    pub fn raise(&self, number: i32) {
        let first = self.raised().is_none();
        self.sender.send_modify(|raised| match raised.first {
            None => raised.first = Some(number),
            Some(_) => raised.again = true,
        });
        if first && number != SIGPIPE {
            let doing = match self.phase() {
                Phase::Plan => "cancelling the plan, nothing will be written",
                Phase::Write => "stopping after the batch in flight",
            };
            tracing::warn!(signal = number, "{doing}; signal again to exit at once");
        }
    }

    /// Records what the run is doing now.
    pub(crate) fn enter(&self, phase: Phase) {
        self.phase.store(
            match phase {
                Phase::Plan => 0,
                Phase::Write => 1,
            },
            Ordering::SeqCst,
        );
    }

    pub(crate) fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Plan,
            _ => Phase::Write,
        }
    }

    /// The first signal received so far, if any.
    pub(crate) fn raised(&self) -> Option<i32> {
        self.receiver.borrow().first
    }

    /// What stopped the run, if anything did.
    pub fn stop(&self) -> Option<Stop> {
        self.raised().map(Stop::from_number)
    }

    /// Resolves when the first signal arrives.
    pub async fn wait(&mut self) -> i32 {
        let first = self
            .receiver
            .wait_for(|raised| raised.first.is_some())
            .await
            .map(|raised| raised.first);
        match first {
            Ok(first) => first.unwrap_or(SIGINT),
            // The sender lives as long as any clone of this signal: unreachable in practice.
            Err(_) => std::future::pending().await,
        }
    }

    /// Resolves when a second signal arrives.
    pub(crate) async fn wait_twice(&mut self) {
        let closed = self.receiver.wait_for(|raised| raised.again).await.is_err();
        if closed {
            std::future::pending::<()>().await;
        }
    }
}
