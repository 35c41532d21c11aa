//! The standbys streaming from the target, as the primary sees them: what `--max-replica-lag`
//! waits on between write batches.

use std::time::Duration;

use anyhow::{Context, Result};

use super::{Pool, Transaction};
use crate::error::{Failure, Preflight};

/// One physical standby streaming from this server and how far its replay is behind.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StandbyLag {
    /// `application_name` of its WAL receiver, else its address.
    pub name: String,
    pub lag: Duration,
}

/// Preflight for `--max-replica-lag`: `pg_stat_replication` shows a standby's lag only to
/// superusers and members of `pg_read_all_stats`; to anyone else every lag reads as empty, which
/// would look like standbys that are never behind. Returns the standbys streaming now.
pub(crate) async fn preflight_replica_lag(pool: &Pool) -> Result<Vec<StandbyLag>> {
    let mut transaction = pool.begin().await?;
    let (role, may_read): (String, bool) = super::unnamed_as(
        "SELECT quote_ident(current_user), pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')",
    )
    .fetch_one(&mut transaction)
    .await
    .context("could not check whether this user may read pg_stat_replication")?;
    if !may_read {
        return Err(Failure::Preflight(Preflight::ReplicaLagUnreadable { role }).into());
    }
    let standbys = lags_in(&mut transaction).await?;
    transaction
        .rollback()
        .await
        .context("could not close the preflight of --max-replica-lag")?;
    Ok(standbys)
}

/// The physical standbys streaming from this server now, each with its replay lag. A standby
/// that has replayed everything sent to it is not behind, whatever `replay_lag` still shows: the
/// server keeps the last measured lag for up to two of the standby's status intervals after it
/// caught up. Logical replication (a database-bound walsender) is not a standby and is left out.
pub(crate) async fn standby_lags(pool: &Pool) -> Result<Vec<StandbyLag>> {
    let mut transaction = pool.begin().await?;
    let standbys = lags_in(&mut transaction).await?;
    transaction
        .rollback()
        .await
        .context("could not close the read of pg_stat_replication")?;
    Ok(standbys)
}

async fn lags_in(transaction: &mut Transaction) -> Result<Vec<StandbyLag>> {
    let rows: Vec<(String, f64)> = super::unnamed_as(
        "SELECT coalesce(nullif(r.application_name, ''), host(r.client_addr), 'pid ' || r.pid), \
                CASE WHEN r.replay_lsn >= r.sent_lsn THEN 0 \
                     ELSE coalesce(EXTRACT(epoch FROM r.replay_lag)::float8, 0) END \
         FROM pg_stat_replication r \
         JOIN pg_stat_activity a ON a.pid = r.pid \
         WHERE a.datid IS NULL AND r.state IN ('streaming', 'catchup') \
         ORDER BY 2 DESC, 1",
    )
    .fetch_all(&mut *transaction)
    .await
    .context("could not read the standbys' replay lag from pg_stat_replication")?;
    Ok(rows
        .into_iter()
        .map(|(name, seconds)| StandbyLag {
            name,
            lag: Duration::try_from_secs_f64(seconds).unwrap_or_default(),
        })
        .collect())
}
