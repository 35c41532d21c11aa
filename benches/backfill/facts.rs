//! What the report says about the data and the machine, and the arithmetic of its figures.

use super::*;

pub(crate) struct DataFacts {
    pub(crate) profiles: i64,
    pub(crate) agents: i64,
    pub(crate) snapshots: i64,
    pub(crate) unclassified: i64,
    pub(crate) database_bytes: i64,
    pub(crate) profiles_bytes: i64,
}

pub(crate) async fn data_facts(pool: &PgPool) -> Result<DataFacts> {
    let row = sqlx::query(
        "SELECT (SELECT count(*) FROM member_profiles), \
                (SELECT coalesce(sum(jsonb_array_length(agents)), 0)::int8 FROM member_profiles \
                  WHERE jsonb_typeof(agents) = 'array'), \
                (SELECT count(*) FROM agent_capabilities_snapshot), \
                (SELECT count(*) FROM agent_capabilities_snapshot WHERE inferred_type IS NULL), \
                pg_database_size(current_database()), \
                pg_total_relation_size('member_profiles')",
    )
    .fetch_one(pool)
    .await?;
    Ok(DataFacts {
        profiles: row.try_get(0)?,
        agents: row.try_get(1)?,
        snapshots: row.try_get(2)?,
        unclassified: row.try_get(3)?,
        database_bytes: row.try_get(4)?,
        profiles_bytes: row.try_get(5)?,
    })
}

/// Creates, migrates and seeds one database; returns how long seeding and VACUUM took.
pub(crate) async fn seeded_database(
    admin: &PgPool,
    server: &EphemeralPostgres,
    name: &str,
    spec: BulkSpec,
) -> Result<(Duration, Duration)> {
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(admin)
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&server.url(name))
        .await?;
    MIGRATOR
        .run(&pool)
        .await
        .context("could not apply migrations")?;
    let started = Instant::now();
    seed_bulk(&pool, spec).await.context("seed_bulk failed")?;
    let seeding = started.elapsed();
    let started = Instant::now();
    // VACUUM as well as ANALYZE: it sets hint bits and the visibility map once, so the first timed
    // round does not pay for them and the table looks like a settled production table.
    sqlx::raw_sql("VACUUM (ANALYZE) member_profiles, agent_capabilities_snapshot, organizations")
        .execute(&pool)
        .await?;
    let vacuum = started.elapsed();
    pool.close().await;
    Ok((seeding, vacuum))
}

pub(crate) fn compare(label: &str, expected: &FlipSet, found: &FlipSet) -> Result<()> {
    if expected == found {
        return Ok(());
    }
    let missing: Vec<_> = expected.difference(found).take(3).collect();
    let extra: Vec<_> = found.difference(expected).take(3).collect();
    bail!(
        "{label}: flip sets differ ({} expected, {} found); missing e.g. {missing:?}; extra e.g. {extra:?}",
        expected.len(),
        found.len()
    )
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

pub(crate) fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

pub(crate) fn mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

pub(crate) fn machine_facts() -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let memory = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with("MemTotal:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    vec![
        ("nproc".into(), nproc),
        ("cpu".into(), cpu),
        ("memory".into(), memory),
        ("kernel".into(), kernel.trim().to_owned()),
    ]
}

pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// Which source the timed binary was built from; others edit src/ while benches run.
pub(crate) fn source_state() -> String {
    let dir = env!("CARGO_MANIFEST_DIR");
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let changed = git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ]);
    let changed: Vec<&str> = changed.lines().collect();
    if changed.is_empty() {
        format!("{head} (src/ clean)")
    } else {
        format!("{head} + uncommitted: {}", changed.join(", "))
    }
}
