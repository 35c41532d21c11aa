//! One timed run each: the tool, the one-statement floor, the original script's pattern, and
//! the anatomy of a dry-run.

use super::*;

pub(crate) struct Log(pub(crate) Instant);

impl Log {
    pub(crate) fn note(&self, message: impl AsRef<str>) {
        eprintln!(
            "[{:>8.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }
}

/// CPU spent by server processes that exited: the postmaster accounts its reaped children (the
/// backends a run opened and closed, parallel workers included) in its own cutime/cstime.
pub(crate) struct ServerCpu {
    pub(crate) postmaster: i32,
    pub(crate) ticks_per_second: f64,
}

impl ServerCpu {
    pub(crate) fn reaped(&self) -> Result<Duration> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.postmaster))
            .context("could not read the postmaster's /proc stat")?;
        let after_name = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        // Field 3 (state) is the first after the name, so cutime (16) and cstime (17) sit at 13, 14.
        let ticks: u64 = fields[13].parse::<u64>()? + fields[14].parse::<u64>()?;
        Ok(Duration::from_secs_f64(
            ticks as f64 / self.ticks_per_second,
        ))
    }

    /// Backends exit a moment after their client disconnects; waiting keeps their CPU in this run.
    pub(crate) async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

pub(crate) struct ToolRun {
    pub(crate) wall: Duration,
    pub(crate) max_rss_kib: i64,
    pub(crate) user: Duration,
    pub(crate) system: Duration,
    pub(crate) server: Duration,
    pub(crate) internal_ms: Option<u64>,
    /// The slowest planning chunk statement, as the tool itself reports it on stderr.
    pub(crate) slowest_statement: Option<Duration>,
    pub(crate) summary: Value,
    pub(crate) flips: FlipSet,
}

pub(crate) fn timeval(tv: libc::timeval) -> Duration {
    // The kernel never reports negative CPU time.
    Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0))
}

pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs the binary once through the launcher.
pub(crate) async fn run_tool(
    tool: &Tool<'_>,
    url: &str,
    args: &[String],
    wrapper: Option<&[String]>,
) -> Result<ToolRun> {
    let bin = tool.bin;
    let server = tool.cpu;
    let stdout_path = tool.scratch.join("tool.stdout");
    let stderr_path = tool.scratch.join("tool.stderr");
    let mut argv: Vec<String> = wrapper.unwrap_or_default().to_vec();
    argv.push(bin.to_string_lossy().into_owned());
    argv.extend(args.iter().cloned());
    let request = serde_json::json!({
        "argv": argv,
        "env": ["DATABASE_URL", url],
        "stdout": stdout_path,
        "stderr": stderr_path,
    });
    let before = server.reaped()?;
    let reply = tokio::task::block_in_place(|| {
        tool.launcher
            .lock()
            .map_err(|_| anyhow::anyhow!("launcher lock poisoned"))?
            .run(&request)
    })?;
    server.settle().await;
    let server_cpu = server.reaped()?.saturating_sub(before);
    let nanos = |key: &str| Duration::from_nanos(reply[key].as_u64().unwrap_or_default());
    let wall = nanos("wall_ns");
    let code = reply["code"].as_i64().unwrap_or(-1);
    let status = &reply["status"];

    let stdout = fs::read_to_string(&stdout_path)?;
    let stderr = fs::read_to_string(&stderr_path)?;
    if code != 0 {
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        bail!(
            "{bin:?} {args:?} exited with {code} (status {status}): {:?}",
            tail
        );
    }
    let mut flips = FlipSet::new();
    let mut summary = Value::Null;
    for line in stdout.lines() {
        let event: Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        match event["event"].as_str() {
            Some("flip") => {
                flips.insert((
                    event["profile_id"]
                        .as_str()
                        .context("flip without profile_id")?
                        .parse()?,
                    event["index"].as_u64().context("flip without index")?,
                    event["url"]
                        .as_str()
                        .context("flip without url")?
                        .to_owned(),
                    event["from"].to_string(),
                    event["to"].as_str().context("flip without to")?.to_owned(),
                ));
            }
            Some("summary") => summary = event,
            _ => {}
        }
    }
    ensure!(summary.is_object(), "{bin:?} printed no summary event");
    Ok(ToolRun {
        wall,
        max_rss_kib: reply["max_rss_kib"].as_i64().unwrap_or_default(),
        user: nanos("user_ns"),
        system: nanos("system_ns"),
        server: server_cpu,
        internal_ms: summary["duration_ms"].as_u64(),
        slowest_statement: slowest_statement(&stderr),
        summary,
        flips,
    })
}

/// `slowest_statement_ms=N` from the tool's "server pass complete" line on stderr.
fn slowest_statement(stderr: &str) -> Option<Duration> {
    let line = stderr
        .lines()
        .find(|line| line.contains("server pass complete"))?;
    let (_, after) = line.split_once("slowest_statement_ms=")?;
    let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().map(Duration::from_millis)
}

pub(crate) fn dry_run_args(config: &Config, batch: Option<u32>) -> Vec<String> {
    let mut args: Vec<String> = [
        "--dry-run",
        "--format",
        "json",
        "--max-flips",
        BIG_MAX_FLIPS,
    ]
    .map(str::to_owned)
    .to_vec();
    match batch {
        Some(size) => args.extend(["--batch-size".to_owned(), size.to_string()]),
        None => args.extend(config.batch_args()),
    }
    args
}

pub(crate) struct FloorRun {
    pub(crate) wall: Duration,
    pub(crate) server: Duration,
    pub(crate) flips: FlipSet,
}

pub(crate) fn canonical_json(text: &str) -> Result<String> {
    Ok(serde_json::from_str::<Value>(text)
        .with_context(|| format!("the server returned non-JSON {text:?}"))?
        .to_string())
}

/// (b): the same flips from one statement, on a fresh connection so its backend's CPU is counted.
/// Which server settings the floor runs under.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum FloorSession {
    /// The server's defaults: what a DBA typing the query would get.
    Defaults,
    /// `jit = off`, as the tool's own sessions run.
    JitOff,
}

pub(crate) async fn run_floor(url: &str, server: &ServerCpu) -> Result<FloorRun> {
    run_floor_with(url, server, FloorSession::Defaults).await
}

pub(crate) async fn run_floor_with(
    url: &str,
    server: &ServerCpu,
    session: FloorSession,
) -> Result<FloorRun> {
    let mut options = sqlx::postgres::PgConnectOptions::from_str(url)?;
    if session == FloorSession::JitOff {
        options = options.options([("jit", "off")]);
    }
    let mut connection = PgConnection::connect_with(&options).await?;
    let before = server.reaped()?;
    let started = Instant::now();
    let rows = sqlx::query(&FLOOR_SQL)
        .fetch_all(&mut connection)
        .await
        .context("the floor query failed")?;
    let wall = started.elapsed();
    connection.close().await?;
    server.settle().await;
    let server_cpu = server.reaped()?.saturating_sub(before);
    let mut flips = FlipSet::new();
    for row in &rows {
        flips.insert((
            row.try_get(0)?,
            u64::try_from(row.try_get::<i64, _>(1)?)?,
            row.try_get(2)?,
            canonical_json(&row.try_get::<String, _>(3)?)?,
            row.try_get(4)?,
        ));
    }
    Ok(FloorRun {
        wall,
        server: server_cpu,
        flips,
    })
}

pub(crate) struct ScriptRun {
    pub(crate) load: Duration,
    pub(crate) resolve_loop: Duration,
    /// `load` plus `resolve_loop` scaled from the sample to every profile.
    pub(crate) estimate: Duration,
    pub(crate) sampled: usize,
    pub(crate) total: usize,
    pub(crate) sampled_ids: BTreeSet<Uuid>,
    pub(crate) load_rss_growth_kib: i64,
    pub(crate) server: Duration,
    pub(crate) flips: FlipSet,
}

pub(crate) fn vm_rss_kib() -> i64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// (c): the original script's access pattern, resolved with the crate's whole-value port of
/// `resolveAgentTypes` (the path the conformance vectors pin).
/// How (c) sends its per-profile snapshot query.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum ScriptStatements {
    /// An unnamed statement parsed and planned on every call: what node-postgres sends for
    /// `pool.query(text, values)`, the original script's client.
    Unnamed,
    /// One prepared statement reused for every call (sqlx's default): cheaper than the script.
    Prepared,
}

pub(crate) async fn run_script(
    url: &str,
    every: usize,
    server: &ServerCpu,
    statements: ScriptStatements,
) -> Result<ScriptRun> {
    let mut connection = PgConnection::connect(url).await?;
    let before = server.reaped()?;
    let rss_before = vm_rss_kib();
    let started = Instant::now();
    let rows = sqlx::query("SELECT * FROM member_profiles")
        .fetch_all(&mut connection)
        .await
        .context("SELECT * FROM member_profiles failed")?;
    let load = started.elapsed();
    let load_rss_growth_kib = vm_rss_kib() - rss_before;

    let looped = Instant::now();
    let mut flips = FlipSet::new();
    let mut sampled_ids = BTreeSet::new();
    for row in rows.iter().step_by(every) {
        let id: Uuid = row.try_get("id")?;
        let agents: Value = row
            .try_get::<Option<Value>, _>("agents")?
            .unwrap_or(Value::Null);
        let urls: Vec<&str> = match &agents {
            Value::Array(elements) => elements
                .iter()
                .filter_map(|element| element.get("url")?.as_str())
                .collect(),
            _ => Vec::new(),
        };
        let snapshots: HashMap<String, Option<String>> =
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT agent_url, inferred_type FROM agent_capabilities_snapshot \
                 WHERE agent_url = ANY($1)",
            )
            .persistent(statements == ScriptStatements::Prepared)
            .bind(&urls)
            .fetch_all(&mut connection)
            .await
            .context("the per-profile snapshot query failed")?
            .into_iter()
            .collect();
        let resolved = resolve_agents(&agents, &snapshots);
        for flip in diff_flips(&agents, &resolved) {
            flips.insert((
                id,
                flip.index as u64,
                flip.url,
                flip.from.to_string(),
                flip.to,
            ));
        }
        sampled_ids.insert(id);
    }
    let resolve_loop = looped.elapsed();
    let total = rows.len();
    drop(rows);
    connection.close().await?;
    server.settle().await;
    let server_cpu = server.reaped()?.saturating_sub(before);
    let sampled = sampled_ids.len();
    let scale = total as f64 / sampled.max(1) as f64;
    Ok(ScriptRun {
        load,
        resolve_loop,
        estimate: load + resolve_loop.mul_f64(scale),
        sampled,
        total,
        sampled_ids,
        load_rss_growth_kib,
        server: server_cpu,
        flips,
    })
}

/// The tool's default `--chunk-size`; BENCH_CHUNK_SIZE overrides it for the lower bounds too.
pub(crate) const TOOL_DEFAULT_CHUNK: usize = 20_000;

/// The tool's default `--plan-jobs`: the lower bounds walk the key space with as many.
pub(crate) const TOOL_DEFAULT_JOBS: usize = 2;

/// The chunk's rows (`p`) and the urls of their agents (`u`), for bounds (2) and (3).
macro_rules! chunk_urls {
    () => {
        "WITH p AS MATERIALIZED ( \
             SELECT id, agents FROM member_profiles WHERE id BETWEEN $1 AND $3 ORDER BY id LIMIT $2 \
         ), u AS MATERIALIZED ( \
             SELECT e ->> 'url' AS url FROM p CROSS JOIN LATERAL jsonb_array_elements( \
                 CASE WHEN jsonb_typeof(p.agents) = 'array' THEN p.agents ELSE '[]' END) e \
             WHERE jsonb_typeof(e -> 'url') = 'string' \
         ) "
    };
}

/// The least any plan in chunks of profiles by key must do, measured the way the tool plans
/// (`jobs` connections, each walking its share of the key space in chunks of `chunk_size`, each
/// chunk in its own READ ONLY REPEATABLE READ transaction, `jit = off`), in three steps that each
/// add one piece of the tool's chunk statement: (1) read the chunk's rows by key, (2) also take
/// their `agents` apart into urls, (3) also look those urls up in the snapshot table's key. The
/// tool's statement adds the rule, the counts and the candidates on top of (3), so (3) against
/// the floor says how close any keyset plan can come to one hash join over the whole registry.
pub(crate) const BOUNDS: [(&str, &str); 3] = [
    (
        "(1) read each chunk's rows by key",
        "SELECT count(*), max(id::text)::uuid, count(agents) FROM ( \
             SELECT id, agents FROM member_profiles WHERE id BETWEEN $1 AND $3 ORDER BY id LIMIT $2 \
         ) p",
    ),
    (
        "(2) + take their agents apart into urls",
        concat!(
            chunk_urls!(),
            "SELECT (SELECT count(*) FROM p), (SELECT max(id::text)::uuid FROM p), \
                    (SELECT count(url) FROM u)"
        ),
    ),
    (
        "(3) + look the urls up in agent_capabilities_snapshot",
        concat!(
            chunk_urls!(),
            "SELECT (SELECT count(*) FROM p), (SELECT max(id::text)::uuid FROM p), \
                    (SELECT count(inferred_type) FROM agent_capabilities_snapshot \
                     WHERE agent_url = ANY (ARRAY(SELECT url FROM u)))"
        ),
    ),
];

/// One lower bound of [`BOUNDS`] over the whole registry: wall time, server CPU, the slowest
/// single statement, and the profiles read (which must be all of them).
pub(crate) struct BoundRun {
    pub(crate) wall: Duration,
    pub(crate) server: Duration,
    pub(crate) slowest: Duration,
    pub(crate) profiles: u64,
}

pub(crate) async fn run_bound(
    url: &str,
    sql: &'static str,
    chunk_size: usize,
    jobs: usize,
    cpu: &ServerCpu,
) -> Result<BoundRun> {
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?.options([("jit", "off")]);
    let mut connections = Vec::new();
    for _ in 0..jobs {
        connections.push(PgConnection::connect_with(&options).await?);
    }
    let before = cpu.reaped()?;
    let started = Instant::now();
    // The tool's split of the key space (src/plan.rs): job k walks the k-th of `jobs` equal
    // ranges of uuids.
    let step = u128::MAX / jobs as u128;
    let walks = connections
        .into_iter()
        .enumerate()
        .map(|(job, connection)| {
            let first = step * job as u128;
            let last = if job + 1 == jobs {
                u128::MAX
            } else {
                first + step - 1
            };
            walk_bound(connection, sql, chunk_size, first, last)
        });
    let walked = futures_util::future::try_join_all(walks).await?;
    let wall = started.elapsed();
    cpu.settle().await;
    Ok(BoundRun {
        wall,
        server: cpu.reaped()?.saturating_sub(before),
        slowest: walked
            .iter()
            .map(|(_, slowest)| *slowest)
            .max()
            .unwrap_or_default(),
        profiles: walked.iter().map(|(profiles, _)| profiles).sum(),
    })
}

/// One job of [`run_bound`]; closes its connection so its backend's CPU is counted.
async fn walk_bound(
    mut connection: PgConnection,
    sql: &'static str,
    chunk_size: usize,
    first: u128,
    last: u128,
) -> Result<(u64, Duration)> {
    let (mut profiles, mut slowest) = (0u64, Duration::ZERO);
    let mut from = Some(first);
    while let Some(start) = from {
        sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut connection)
            .await?;
        let step = Instant::now();
        let row = sqlx::query(sql)
            .bind(Uuid::from_u128(start))
            .bind(i64::try_from(chunk_size)?)
            .bind(Uuid::from_u128(last))
            .persistent(false)
            .fetch_one(&mut connection)
            .await
            .with_context(|| format!("lower bound {sql:?}"))?;
        slowest = slowest.max(step.elapsed());
        sqlx::query("ROLLBACK").execute(&mut connection).await?;
        let read: i64 = row.get(0);
        let last_id: Option<Uuid> = row.get(1);
        profiles += u64::try_from(read)?;
        from = match last_id {
            Some(id) if read >= i64::try_from(chunk_size)? => {
                id.as_u128().checked_add(1).filter(|next| *next <= last)
            }
            _ => None,
        };
    }
    connection.close().await?;
    Ok((profiles, slowest))
}

/// The plans behind the figures: `EXPLAIN (ANALYZE, BUFFERS)` of the tool's first chunk (its own
/// statement, `db::PLAN_CHUNK`, as the tool runs it) and `EXPLAIN` of the floor.
pub(crate) async fn plans(url: &str, chunk_size: usize) -> Result<Vec<String>> {
    use agent_type_backfill::db;
    use agent_type_backfill::resolver::{SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES};
    let mut lines = Vec::new();
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?.options([("jit", "off")]);
    let mut connection = PgConnection::connect_with(&options).await?;
    sqlx::query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut connection)
        .await?;
    let explain: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN (ANALYZE, BUFFERS) {}", db::PLAN_CHUNK))
            .bind(&VALID_AGENT_TYPES[..])
            .bind(SELF_DECLARED_TYPE)
            .bind(UNKNOWN_TYPE)
            .bind(Uuid::nil())
            .bind(i64::try_from(chunk_size)?)
            .bind(Uuid::max())
            .persistent(false)
            .fetch_all(&mut connection)
            .await?;
    sqlx::query("ROLLBACK").execute(&mut connection).await?;
    connection.close().await?;
    lines.push(
        "EXPLAIN (ANALYZE, BUFFERS) of the first chunk (jit off, as the tool runs it):".into(),
    );
    lines.extend(
        explain
            .into_iter()
            .map(|line| format!("    {}", clip(&line))),
    );

    let mut connection = PgConnection::connect(url).await?;
    let explain: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", *FLOOR_SQL))
        .fetch_all(&mut connection)
        .await?;
    lines.push("EXPLAIN of the floor query (b), server defaults:".into());
    lines.extend(
        explain
            .into_iter()
            .map(|line| format!("    {}", clip(&line))),
    );
    connection.close().await?;
    Ok(lines)
}

/// EXPLAIN inlines the 3,000-URL array and the whole CASE; the shape is what matters here.
pub(crate) fn clip(line: &str) -> String {
    const WIDTH: usize = 160;
    match line.char_indices().nth(WIDTH) {
        Some((cut, _)) => format!("{} ...", &line[..cut]),
        None => line.to_owned(),
    }
}
