//! The client side's deadlines. A server that stops answering (a hung pooler, a dead NAT entry,
//! a stalled VPN: bytes stop, sockets stay open) is noticed by the tool itself, in a time the
//! settings bound, whatever the server or the kernel do.
//!
//! Every statement the tool sends goes through a [`Transaction`], and the only way to send one
//! there is its [`sqlx::Executor`] implementation, which holds each round trip to
//! [`Deadlines::reply`]. There is no way to reach the connection underneath, so a statement
//! added later cannot forget its deadline.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Result;
use futures_util::future::BoxFuture;
use futures_util::stream::{BoxStream, Stream};
use futures_util::FutureExt;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTransactionManager, PgTypeInfo};
use sqlx::{
    Connection, Describe, Either, Execute, Executor, PgConnection, PgPool, Postgres,
    TransactionManager,
};
use std::future::Future;

/// What the tool waits for at most, derived from its settings.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// Opening a connection (TCP, TLS, login): libpq's `connect_timeout`; `None` when the
    /// operator set it to 0, as libpq reads it.
    pub connect: Option<Duration>,
    /// One round trip: a statement's answer, COMMIT's, ROLLBACK's.
    pub reply: Duration,
}

/// Opening a connection with no `connect_timeout` in the URL or PGCONNECT_TIMEOUT: libpq would
/// wait for ever, and a tool run from a workstation over a VPN should not.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Deadlines {
    /// The server ends any statement at `statement_timeout` and says so: a reply later than
    /// that plus a margin for the network (the timeout itself, between 1 s and 10 s) is one that
    /// will not come.
    pub fn new(connect: Option<Duration>, statement_timeout: Duration) -> Deadlines {
        let margin = statement_timeout.clamp(Duration::from_secs(1), Duration::from_secs(10));
        Deadlines {
            connect,
            reply: statement_timeout + margin,
        }
    }

    /// The pool's wait for a connection: the liveness check of an idle one (a round trip that
    /// takes milliseconds on a live link) and, when that fails, a fresh connect.
    pub fn acquire(&self) -> Duration {
        // With connect_timeout=0 the operator asked libpq's "wait for ever"; a day stands in.
        self.connect
            .map_or(Duration::from_secs(86_400), |connect| connect * 2)
    }

    pub(crate) fn silent(&self, waiting_for: &str, written: &str) -> anyhow::Error {
        anyhow::Error::new(self.silent_sqlx(waiting_for, written))
    }

    fn silent_sqlx(&self, waiting_for: &str, written: &str) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            Silent {
                waiting_for: waiting_for.to_owned(),
                limit: self.reply,
                written: written.to_owned(),
            },
        ))
    }
}

/// A reply that did not come in time.
#[derive(Debug)]
pub(crate) struct Silent {
    waiting_for: String,
    limit: Duration,
    written: String,
}

impl std::fmt::Display for Silent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the server stopped answering: no reply to {} within {:?} (--statement-timeout plus \
             a margin); {}. Check the network, the VPN and the pooler, then run again",
            self.waiting_for, self.limit, self.written
        )
    }
}

impl std::error::Error for Silent {}

enum Link {
    Pooled(PoolConnection<Postgres>),
    /// The first connection, which `connect` opens outside the pool; it is closed when its
    /// transaction ends.
    Direct(PgConnection),
}

impl Link {
    fn connection(&mut self) -> &mut PgConnection {
        match self {
            Link::Pooled(connection) => connection,
            Link::Direct(connection) => connection,
        }
    }
}

/// A transaction whose every round trip has a deadline. Dropped without COMMIT or ROLLBACK
/// (an error, an interrupted plan), or after a reply that did not come, its pooled connection is
/// closed rather than handed back: its state is unknown, and a closed socket is what makes a
/// server that can still hear us roll back at once.
pub struct Transaction {
    link: Option<Link>,
    deadlines: Deadlines,
    /// What is at stake if the link goes silent now.
    read_only: bool,
    /// A statement started and not read to its end, or a reply that never came.
    unsettled: bool,
}

impl std::fmt::Debug for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transaction")
            .field("deadlines", &self.deadlines)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Transaction {
    /// Takes a connection from `pool` (bounded by the pool's acquire timeout) and sends
    /// `statement` (BEGIN by default) within the reply deadline.
    pub(crate) async fn begin(
        pool: &PgPool,
        deadlines: Deadlines,
        statement: Option<&'static str>,
    ) -> Result<Transaction> {
        let connection = pool.acquire().await.map_err(|error| {
            let timed_out = matches!(error, sqlx::Error::PoolTimedOut);
            let error = anyhow::Error::new(error);
            if timed_out {
                error.context(format!(
                    "the server stopped answering: no usable connection within {:?} \
                     (twice connect_timeout)",
                    deadlines.acquire()
                ))
            } else {
                error
            }
        })?;
        let read_only = statement.is_some_and(|begin| begin.contains("READ ONLY"));
        Transaction::start(Link::Pooled(connection), deadlines, statement, read_only).await
    }

    /// A transaction on a connection the caller took from a pool of its own: for tests and
    /// benchmarks that call the tool's statements with settings of their own. `statement` is
    /// the BEGIN to send (plain BEGIN by default).
    pub async fn begin_on(
        connection: PoolConnection<Postgres>,
        deadlines: Deadlines,
        statement: Option<&'static str>,
    ) -> Result<Transaction> {
        let read_only = statement.is_some_and(|begin| begin.contains("READ ONLY"));
        Transaction::start(Link::Pooled(connection), deadlines, statement, read_only).await
    }

    pub(crate) async fn begin_direct(
        connection: PgConnection,
        deadlines: Deadlines,
    ) -> Result<Transaction> {
        Transaction::start(
            Link::Direct(connection),
            deadlines,
            Some(super::BEGIN),
            false,
        )
        .await
    }

    async fn start(
        link: Link,
        deadlines: Deadlines,
        statement: Option<&'static str>,
        read_only: bool,
    ) -> Result<Transaction> {
        let mut transaction = Transaction {
            link: Some(link),
            deadlines,
            read_only,
            unsettled: true,
        };
        let begin =
            PgTransactionManager::begin(transaction.connection(), statement.map(Cow::Borrowed));
        let result = tokio::time::timeout(deadlines.reply, begin).await;
        match result {
            Ok(Ok(())) => {
                transaction.unsettled = false;
                Ok(transaction)
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(deadlines.silent("BEGIN", "nothing was written")),
        }
    }

    fn connection(&mut self) -> &mut PgConnection {
        self.link
            .as_mut()
            .expect("a transaction holds its connection until it ends")
            .connection()
    }

    fn at_stake(&self) -> &'static str {
        if self.read_only {
            "the transaction was read only: nothing was written"
        } else {
            "the transaction in flight was not committed; the server rolls it back when it \
             notices (idle_in_transaction_session_timeout at the latest)"
        }
    }

    /// COMMIT, within the reply deadline. A COMMIT whose answer never came may or may not have
    /// committed: the message says so.
    pub async fn commit(self) -> Result<()> {
        self.end(true).await
    }

    /// ROLLBACK, within the reply deadline.
    pub async fn rollback(self) -> Result<()> {
        self.end(false).await
    }

    async fn end(mut self, commit: bool) -> Result<()> {
        let (waiting_for, written) = if commit {
            (
                "COMMIT",
                "the batch may or may not have been committed: `history` shows what the audit \
                 log holds, and a rerun writes only what is missing",
            )
        } else {
            ("ROLLBACK", self.at_stake())
        };
        self.unsettled = true;
        let reply = self.deadlines.reply;
        let connection = self.connection();
        let ending = if commit {
            PgTransactionManager::commit(connection)
        } else {
            PgTransactionManager::rollback(connection)
        };
        let result = tokio::time::timeout(reply, ending).await;
        match result {
            Ok(Ok(())) => {
                self.unsettled = false;
                self.release(reply).await;
                Ok(())
            }
            Ok(Err(error)) => Err(error.into()),
            Err(_) => Err(self.deadlines.silent(waiting_for, written)),
        }
    }

    /// Hands a settled connection back to the pool, or closes the first one (its goodbye
    /// bounded too).
    async fn release(&mut self, reply: Duration) {
        match self.link.take() {
            Some(Link::Direct(connection)) => {
                if let Ok(Err(error)) = tokio::time::timeout(reply, connection.close()).await {
                    tracing::debug!("could not close the first connection cleanly: {error}");
                }
            }
            Some(Link::Pooled(connection)) => drop(connection),
            None => {}
        }
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        match self.link.take() {
            Some(Link::Pooled(mut connection)) => {
                if self.unsettled {
                    // Dropping the bare connection closes its socket without a goodbye that a
                    // silent server would never read; the pool opens another in its place.
                    drop(connection.detach());
                } else {
                    // As sqlx's own transactions do: ROLLBACK goes out with the connection's
                    // next use, which is itself bounded.
                    PgTransactionManager::start_rollback(&mut connection);
                }
            }
            // Closed with its socket; the server rolls back what it can still hear of.
            Some(Link::Direct(connection)) => drop(connection),
            None => {}
        }
    }
}

/// Ends with an error once the deadline passes, and marks the transaction unsettled until its
/// statement has been read to the end.
struct Deadlined<'e, T> {
    inner: BoxStream<'e, Result<T, sqlx::Error>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    deadlines: Deadlines,
    at_stake: &'static str,
    unsettled: &'e mut bool,
    done: bool,
}

impl<T> Stream for Deadlined<'_, T> {
    type Item = Result<T, sqlx::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(None) => {
                this.done = true;
                *this.unsettled = false;
                return Poll::Ready(None);
            }
            Poll::Ready(Some(item)) => return Poll::Ready(Some(item)),
            Poll::Pending => {}
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                this.done = true;
                let error = this.deadlines.silent_sqlx("a statement", this.at_stake);
                Poll::Ready(Some(Err(error)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// `work` within the reply deadline, as an sqlx error when the reply does not come.
fn within<'e, T: Send + 'e>(
    deadlines: Deadlines,
    at_stake: &'static str,
    work: BoxFuture<'e, Result<T, sqlx::Error>>,
) -> BoxFuture<'e, Result<T, sqlx::Error>> {
    async move {
        tokio::time::timeout(deadlines.reply, work)
            .await
            .unwrap_or_else(|_| Err(deadlines.silent_sqlx("a statement", at_stake)))
    }
    .boxed()
}

impl<'c> Executor<'c> for &'c mut Transaction {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<PgQueryResult, PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let deadlines = self.deadlines;
        let at_stake = self.at_stake();
        self.unsettled = true;
        let Transaction {
            link, unsettled, ..
        } = self;
        let connection = link
            .as_mut()
            .expect("a transaction holds its connection until it ends")
            .connection();
        Box::pin(Deadlined {
            inner: connection.fetch_many(query),
            deadline: Box::pin(tokio::time::sleep(deadlines.reply)),
            deadlines,
            at_stake,
            unsettled,
            done: false,
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<PgRow>, sqlx::Error>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        use futures_util::TryStreamExt;
        // Every row read to the end, as sqlx's own fetch_optional does (a deferred constraint
        // may fail after the first row).
        let rows = self.fetch_many(query);
        async move {
            let mut rows = rows;
            let mut first = None;
            while let Some(step) = rows.try_next().await? {
                if let Either::Right(row) = step {
                    first.get_or_insert(row);
                }
            }
            Ok(first)
        }
        .boxed()
    }

    fn prepare_with<'e, 'q: 'e>(
        self,
        sql: &'q str,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, Result<PgStatement<'q>, sqlx::Error>>
    where
        'c: 'e,
    {
        let (deadlines, at_stake) = (self.deadlines, self.at_stake());
        within(
            deadlines,
            at_stake,
            self.connection().prepare_with(sql, parameters),
        )
    }

    fn describe<'e, 'q: 'e>(
        self,
        sql: &'q str,
    ) -> BoxFuture<'e, Result<Describe<Postgres>, sqlx::Error>>
    where
        'c: 'e,
    {
        let (deadlines, at_stake) = (self.deadlines, self.at_stake());
        within(deadlines, at_stake, self.connection().describe(sql))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reply_limit_is_the_statement_timeout_plus_a_bounded_margin() {
        let ms = Duration::from_millis;
        assert_eq!(Deadlines::new(None, ms(300)).reply, ms(1_300));
        assert_eq!(Deadlines::new(None, ms(5_000)).reply, ms(10_000));
        assert_eq!(Deadlines::new(None, ms(60_000)).reply, ms(70_000));
    }
}
