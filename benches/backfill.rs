//! `cargo bench --bench backfill`: the tool's dry-run against a one-query floor and against the
//! access pattern of the original TypeScript script, on a throwaway PostgreSQL, plus the cost of an
//! apply. Figures and how to read them: bench/README-figures.md.
//!
//! Knobs (environment): BENCH_PROFILES (1000000), BENCH_ROUNDS (3), BENCH_STALE_PER_MILLE (2),
//! BENCH_SEED, BENCH_BATCH_SIZE (tool default), BENCH_BATCH_SWEEP ("1000,5000,10000", "" skips),
//! BENCH_SWEEP_ROUNDS (2), BENCH_C_EVERY (1 = every profile), BENCH_C_ROUNDS, BENCH_APPLY_FLIPS
//! (1000), BENCH_APPLY_ROUNDS (3), BENCH_BIN (binary to time), BENCH_DIAGNOSE (command prefixes
//! separated by ';', e.g. "perf record -e cpu-clock -a -g -o /tmp/a.data --": one extra dry-run at
//! N under each, reported apart from the figures).

// Ratios, rates and MiB of counts far below 2^52, for a printed report: the rounding is the point.
#![allow(clippy::cast_precision_loss)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use agent_type_backfill::resolver::{diff_flips, resolve_agents};
use agent_type_backfill::support::ephemeral::EphemeralPostgres;
use agent_type_backfill::support::seed::{seed_bulk, BulkSpec};
use agent_type_backfill::support::MIGRATOR;
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Row};
use uuid::Uuid;

/// (profile id, index, url, stored type as canonical JSON, new type): what all three agree on.
type FlipKey = (Uuid, u64, String, String, String);
type FlipSet = BTreeSet<FlipKey>;

const BIG_MAX_FLIPS: &str = "100000000";
const APPLY_MAX_FLIPS: &str = "100000";

/// The resolve rule and the flip rule of src/resolver.rs, evaluated inside the server.
const FLOOR_SQL: &str = r#"
WITH elements AS (
    SELECT p.id, e.ord - 1 AS idx, e.elem
    FROM member_profiles p
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(p.agents) = 'array' THEN p.agents ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS e(elem, ord)
    WHERE jsonb_typeof(e.elem) = 'object' AND jsonb_typeof(e.elem -> 'url') = 'string'
), resolved AS (
    SELECT x.id, x.idx, x.elem ->> 'url' AS url,
           coalesce(nullif(x.elem -> 'type', 'null'::jsonb), '"unknown"'::jsonb) AS from_type,
           CASE
               WHEN s.agent_url IS NOT NULL THEN
                   CASE
                       WHEN s.inferred_type = ANY (
                           '{brand,rights,measurement,governance,creative,sales,buying,signals,unknown}'::text[]
                       ) THEN s.inferred_type
                       WHEN x.elem -> 'type' = '"buying"'::jsonb THEN 'buying'
                       ELSE 'unknown'
                   END
               WHEN jsonb_typeof(x.elem -> 'type') = 'string'
                    AND NOT (x.elem ->> 'type') = ANY (
                        '{brand,rights,measurement,governance,creative,sales,buying,signals,unknown}'::text[]
                    ) THEN 'unknown'
           END AS to_type
    FROM elements x
    LEFT JOIN agent_capabilities_snapshot s ON s.agent_url = x.elem ->> 'url'
)
SELECT id, idx, url, from_type::text, to_type
FROM resolved
WHERE to_type IS NOT NULL AND from_type <> to_jsonb(to_type)
"#;

fn main() -> Result<()> {
    if std::env::args().any(|arg| arg == LAUNCHER_FLAG) {
        return launcher_main();
    }
    // `cargo test --all-targets` also runs harness-less benches; a full benchmark there would
    // stall everyone's test run for many minutes.
    if !std::env::args().any(|arg| arg == "--bench") {
        println!("backfill benchmark: skipped outside `cargo bench --bench backfill`");
        return Ok(());
    }
    // Started before anything big is allocated here: see `Launcher`.
    let launcher = Launcher::start()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    runtime.block_on(run(launcher))
}

const LAUNCHER_FLAG: &str = "--spawn-and-measure";

/// A small re-exec of this bench that starts the timed binary and reports its `wait4` rusage.
///
/// Linux folds the high-water RSS of the address space a process had before `exec` into its
/// `ru_maxrss`, and a `fork`/`vfork` child starts from its parent's. Spawned straight from this
/// process, the tool would report the bench's own peak (seeding, the script's `SELECT *`) as its
/// peak RSS. The launcher stays a few MiB, so what it reports is the tool's own peak.
struct Launcher {
    child: std::process::Child,
    requests: std::process::ChildStdin,
    replies: std::io::BufReader<std::process::ChildStdout>,
}

impl Launcher {
    fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("could not find the bench executable")?;
        let mut child = Command::new(exe)
            .arg(LAUNCHER_FLAG)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("could not start the launcher")?;
        let requests = child.stdin.take().context("launcher stdin")?;
        let replies = std::io::BufReader::new(child.stdout.take().context("launcher stdout")?);
        Ok(Launcher {
            child,
            requests,
            replies,
        })
    }

    fn run(&mut self, request: &Value) -> Result<Value> {
        use std::io::{BufRead, Write};
        writeln!(self.requests, "{request}").context("the launcher is gone")?;
        self.requests.flush()?;
        let mut reply = String::new();
        self.replies.read_line(&mut reply)?;
        let reply: Value = serde_json::from_str(&reply).context("the launcher is gone")?;
        if let Some(error) = reply["error"].as_str() {
            bail!("launcher: {error}");
        }
        Ok(reply)
    }

    fn finish(mut self) -> Result<()> {
        drop(self.requests);
        self.child.wait()?;
        Ok(())
    }
}

fn launcher_main() -> Result<()> {
    use std::io::{BufRead, Write};
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        let request: Value = serde_json::from_str(&line?)?;
        let reply = launch(&request)
            .unwrap_or_else(|error| serde_json::json!({"error": format!("{error:#}")}));
        writeln!(out, "{reply}")?;
        out.flush()?;
    }
    Ok(())
}

fn launch(request: &Value) -> Result<Value> {
    let strings = |key: &str| -> Vec<String> {
        request[key]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|item| item.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let argv = strings("argv");
    let env = strings("env");
    let (program, args) = argv.split_first().context("empty argv")?;
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(
            request["stdout"].as_str().context("stdout")?,
        )?)
        .stderr(fs::File::create(
            request["stderr"].as_str().context("stderr")?,
        )?);
    for pair in env.chunks(2) {
        command.env(&pair[0], &pair[1]);
    }
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("could not start {program:?}"))?;
    let pid = libc::pid_t::try_from(child.id()).context("child pid does not fit pid_t")?;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error.into());
        }
    }
    let wall = started.elapsed();
    drop(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok(serde_json::json!({
        "code": code,
        "status": status,
        "wall_ns": nanos(wall),
        "max_rss_kib": usage.ru_maxrss,
        "user_ns": nanos(timeval(usage.ru_utime)),
        "system_ns": nanos(timeval(usage.ru_stime)),
    }))
}

/// The binary under test and how it is started.
struct Tool<'a> {
    bin: &'a Path,
    scratch: &'a Path,
    cpu: &'a ServerCpu,
    launcher: std::sync::Mutex<Launcher>,
}

struct Config {
    profiles: usize,
    seed: u64,
    stale_per_mille: u64,
    rounds: usize,
    batch_size: Option<u32>,
    sweep: Vec<u32>,
    sweep_rounds: usize,
    c_every: usize,
    c_rounds: usize,
    apply_flips: usize,
    apply_rounds: usize,
    bin: PathBuf,
    diagnose: Vec<Vec<String>>,
}

fn env_or<T: FromStr>(name: &str, default: T) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(text) if !text.trim().is_empty() => text
            .trim()
            .replace('_', "")
            .parse()
            .map_err(|error| anyhow::anyhow!("{name}={text:?} is not valid: {error}")),
        _ => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Self> {
        let profiles: usize = env_or("BENCH_PROFILES", 1_000_000)?;
        ensure!(profiles >= 10, "BENCH_PROFILES must be at least 10");
        let rounds = env_or("BENCH_ROUNDS", 3)?;
        let sweep = std::env::var("BENCH_BATCH_SWEEP").unwrap_or_else(|_| "1000,5000,10000".into());
        let sweep = sweep
            .split(',')
            .filter(|part| !part.trim().is_empty())
            .map(|part| part.trim().parse::<u32>().context("BENCH_BATCH_SWEEP"))
            .collect::<Result<Vec<_>>>()?;
        let batch_size = match std::env::var("BENCH_BATCH_SIZE") {
            Ok(text) if !text.trim().is_empty() => {
                Some(text.trim().parse().context("BENCH_BATCH_SIZE")?)
            }
            _ => None,
        };
        // One pass of the per-profile script costs minutes at a million profiles; alternate it
        // every round only while it stays cheap.
        let c_rounds_default = if profiles <= 200_000 { rounds } else { 1 };
        Ok(Config {
            profiles,
            seed: env_or("BENCH_SEED", 20_261_126)?,
            stale_per_mille: env_or("BENCH_STALE_PER_MILLE", 2)?,
            rounds,
            batch_size,
            sweep,
            sweep_rounds: env_or("BENCH_SWEEP_ROUNDS", 2)?,
            c_every: env_or("BENCH_C_EVERY", 1usize)?.max(1),
            c_rounds: env_or("BENCH_C_ROUNDS", c_rounds_default)?.min(rounds),
            apply_flips: env_or("BENCH_APPLY_FLIPS", 1000)?,
            apply_rounds: env_or("BENCH_APPLY_ROUNDS", 3)?,
            bin: std::env::var_os("BENCH_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_agent-type-backfill"))),
            diagnose: std::env::var("BENCH_DIAGNOSE")
                .unwrap_or_default()
                .split(';')
                .map(|prefix| prefix.split_whitespace().map(str::to_owned).collect())
                .filter(|prefix: &Vec<String>| !prefix.is_empty())
                .collect(),
        })
    }

    fn batch_args(&self) -> Vec<String> {
        self.batch_size
            .map(|size| vec!["--batch-size".to_owned(), size.to_string()])
            .unwrap_or_default()
    }
}

struct Log(Instant);

impl Log {
    fn note(&self, message: impl AsRef<str>) {
        eprintln!(
            "[{:>8.1}s] {}",
            self.0.elapsed().as_secs_f64(),
            message.as_ref()
        );
    }
}

/// CPU spent by server processes that exited: the postmaster accounts its reaped children (the
/// backends a run opened and closed, parallel workers included) in its own cutime/cstime.
struct ServerCpu {
    postmaster: i32,
    ticks_per_second: f64,
}

impl ServerCpu {
    fn reaped(&self) -> Result<Duration> {
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
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
}

struct ToolRun {
    wall: Duration,
    max_rss_kib: i64,
    user: Duration,
    system: Duration,
    server: Duration,
    internal_ms: Option<u64>,
    summary: Value,
    flips: FlipSet,
}

fn timeval(tv: libc::timeval) -> Duration {
    // The kernel never reports negative CPU time.
    Duration::from_secs(u64::try_from(tv.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(tv.tv_usec).unwrap_or(0))
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// Runs the binary once through the launcher.
async fn run_tool(
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
        summary,
        flips,
    })
}

fn dry_run_args(config: &Config, batch: Option<u32>) -> Vec<String> {
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

struct FloorRun {
    wall: Duration,
    server: Duration,
    flips: FlipSet,
}

fn canonical_json(text: &str) -> Result<String> {
    Ok(serde_json::from_str::<Value>(text)
        .with_context(|| format!("the server returned non-JSON {text:?}"))?
        .to_string())
}

/// (b): the same flips from one statement, on a fresh connection so its backend's CPU is counted.
/// Which server settings the floor runs under.
#[derive(Clone, Copy, PartialEq)]
enum FloorSession {
    /// The server's defaults: what a DBA typing the query would get.
    Defaults,
    /// `jit = off`, as the tool's own sessions run.
    JitOff,
}

async fn run_floor(url: &str, server: &ServerCpu) -> Result<FloorRun> {
    run_floor_with(url, server, FloorSession::Defaults).await
}

async fn run_floor_with(url: &str, server: &ServerCpu, session: FloorSession) -> Result<FloorRun> {
    let mut options = sqlx::postgres::PgConnectOptions::from_str(url)?;
    if session == FloorSession::JitOff {
        options = options.options([("jit", "off")]);
    }
    let mut connection = PgConnection::connect_with(&options).await?;
    let before = server.reaped()?;
    let started = Instant::now();
    let rows = sqlx::query(FLOOR_SQL)
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

struct ScriptRun {
    load: Duration,
    resolve_loop: Duration,
    /// `load` plus `resolve_loop` scaled from the sample to every profile.
    estimate: Duration,
    sampled: usize,
    total: usize,
    sampled_ids: BTreeSet<Uuid>,
    load_rss_growth_kib: i64,
    server: Duration,
    flips: FlipSet,
}

fn vm_rss_kib() -> i64 {
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
enum ScriptStatements {
    /// An unnamed statement parsed and planned on every call: what node-postgres sends for
    /// `pool.query(text, values)`, the original script's client.
    Unnamed,
    /// One prepared statement reused for every call (sqlx's default): cheaper than the script.
    Prepared,
}

async fn run_script(
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

const TOOL_DEFAULT_BATCH: u32 = 1000;

/// Where a dry-run's time goes: the tool's own statements (`db::census`, `db::flip_candidates`,
/// then the candidate pages) called from the bench in one READ ONLY REPEATABLE READ transaction
/// with the tool's session settings, each timed, plus the plans of the server pass and the floor.
async fn anatomy(url: &str, batch: u32, cpu: &ServerCpu) -> Result<Vec<String>> {
    use agent_type_backfill::resolver::{SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES};
    use agent_type_backfill::{db, parse_column};
    let options = sqlx::postgres::PgConnectOptions::from_str(url)?.options([("jit", "off")]);
    let mut connection = PgConnection::connect_with(&options).await?;
    let before = cpu.reaped()?;
    let started = Instant::now();
    let mut transaction = connection.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *transaction)
        .await?;
    let step = Instant::now();
    let census = db::census(&mut transaction).await?;
    let census_time = step.elapsed();
    let step = Instant::now();
    let candidates = db::flip_candidates(&mut transaction).await?;
    let pass_time = step.elapsed();
    let step = Instant::now();
    let mut pages = 0;
    for ids in candidates.profile_ids.chunks(batch as usize) {
        let rows = db::profiles_by_id(&mut transaction, ids).await?;
        let columns = rows.iter().map(parse_column).collect::<Result<Vec<_>>>()?;
        db::snapshots_for(&mut transaction, &columns).await?;
        pages += 1;
    }
    let pages_time = step.elapsed();
    transaction.rollback().await?;
    let wall = started.elapsed();
    cpu.settle().await;
    let server = cpu.reaped()?.saturating_sub(before);
    let mut lines = vec![
        format!(
            "all statements: wall {:.2}s | server CPU {:.2}s",
            secs(wall),
            secs(server)
        ),
        format!(
            "  census ({} profiles, {} malformed)            {:>6.2}s",
            census.profiles,
            census.malformed,
            secs(census_time)
        ),
        format!(
            "  server pass ({} candidate profiles, {} untouchable elements) {:>6.2}s",
            candidates.profile_ids.len(),
            candidates.untouchable_elements,
            secs(pass_time)
        ),
        format!(
            "  {pages} candidate pages (rows by id, lean parse, snapshots)  {:>6.2}s",
            secs(pages_time)
        ),
    ];
    let explain: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN (ANALYZE, BUFFERS) {}",
        db::FLIP_CANDIDATES
    ))
    .bind(&VALID_AGENT_TYPES[..])
    .bind(SELF_DECLARED_TYPE)
    .bind(UNKNOWN_TYPE)
    .fetch_all(&mut connection)
    .await?;
    lines.push(
        "EXPLAIN (ANALYZE, BUFFERS) of the server pass (jit off, as the tool runs it):".into(),
    );
    lines.extend(
        explain
            .into_iter()
            .map(|line| format!("    {}", clip(&line))),
    );
    connection.close().await?;

    let mut connection = PgConnection::connect(url).await?;
    let explain: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {FLOOR_SQL}"))
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
fn clip(line: &str) -> String {
    const WIDTH: usize = 160;
    match line.char_indices().nth(WIDTH) {
        Some((cut, _)) => format!("{} ...", &line[..cut]),
        None => line.to_owned(),
    }
}

struct DataFacts {
    profiles: i64,
    agents: i64,
    snapshots: i64,
    unclassified: i64,
    database_bytes: i64,
    profiles_bytes: i64,
}

async fn data_facts(pool: &PgPool) -> Result<DataFacts> {
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
async fn seeded_database(
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

fn compare(label: &str, expected: &FlipSet, found: &FlipSet) -> Result<()> {
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

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}

fn mib(kib: i64) -> f64 {
    kib as f64 / 1024.0
}

fn machine_facts() -> Vec<(String, String)> {
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

fn load_average() -> String {
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
fn source_state() -> String {
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

async fn run(launcher: Launcher) -> Result<()> {
    let log = Log(Instant::now());
    let config = Config::from_env()?;
    let tenth = (config.profiles / 10).max(1);
    let scratch = std::env::temp_dir().join(format!("atb-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch)?;
    // Others rebuild target/release while a long run goes on; time one fixed copy of the binary.
    let bin = scratch.join("agent-type-backfill");
    fs::copy(&config.bin, &bin).with_context(|| format!("could not copy {:?}", config.bin))?;
    let bin_modified = fs::metadata(&config.bin)?
        .modified()
        .ok()
        .map(|time| chrono::DateTime::<chrono::Utc>::from(time).to_rfc3339())
        .unwrap_or_default();
    let source = source_state();
    let load_at_start = load_average();
    log.note(format!(
        "profiles={} (and {tenth}), rounds={}, binary {:?} built {bin_modified}, source {source}",
        config.profiles, config.rounds, config.bin
    ));

    let server = tokio::task::spawn_blocking(EphemeralPostgres::start).await??;
    let cpu = ServerCpu {
        postmaster: server.pid(),
        ticks_per_second: unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64,
    };
    let tool = Tool {
        bin: &bin,
        scratch: &scratch,
        cpu: &cpu,
        launcher: std::sync::Mutex::new(launcher),
    };
    let outcome = bench(&config, &server, &tool, &log, tenth).await;
    tokio::task::spawn_blocking(move || server.stop()).await??;
    tool.launcher
        .into_inner()
        .map_err(|_| anyhow::anyhow!("launcher lock poisoned"))?
        .finish()?;
    let _ = fs::remove_dir_all(&scratch);
    let mut report = outcome?;
    let load_at_end = load_average();
    let mut header = String::new();
    writeln!(header, "== agent-type-backfill benchmark ==")?;
    writeln!(
        header,
        "command: BENCH_PROFILES={} cargo bench --bench backfill  (other knobs: {})",
        config.profiles,
        knobs()
    )?;
    for (name, value) in machine_facts() {
        writeln!(header, "machine {name}: {value}")?;
    }
    writeln!(
        header,
        "load average (1/5/15 min): start {load_at_start}, end {load_at_end}"
    )?;
    writeln!(
        header,
        "binary: {:?} (built {bin_modified}); source {source}",
        config.bin
    )?;
    report.insert_str(0, &header);
    println!("{report}");
    log.note("done");
    Ok(())
}

fn knobs() -> String {
    let set: Vec<String> = std::env::vars()
        .filter(|(name, _)| name.starts_with("BENCH_") && name != "BENCH_PROFILES")
        .map(|(name, value)| format!("{name}={value}"))
        .collect();
    if set.is_empty() {
        "defaults".into()
    } else {
        set.join(" ")
    }
}

async fn bench(
    config: &Config,
    server: &EphemeralPostgres,
    tool: &Tool<'_>,
    log: &Log,
    tenth: usize,
) -> Result<String> {
    let cpu = tool.cpu;
    let mut out = String::new();
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&server.url("postgres"))
        .await?;
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(&admin)
        .await?;
    let version_num: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
        .fetch_one(&admin)
        .await?;
    writeln!(out, "PostgreSQL: {version}")?;
    writeln!(
        out,
        "server settings (src/ephemeral.rs): fsync=off synchronous_commit=off full_page_writes=off shared_buffers=256MB; client and server share the machine"
    )?;

    let spec = |profiles: usize, seed: u64| BulkSpec {
        profiles,
        snapshot_per_mille: 600,
        unclassified_per_mille: 167,
        stale_per_mille: config.stale_per_mille,
        seed,
    };
    let databases = [
        ("bench_n", config.profiles, config.seed),
        ("bench_tenth", tenth, config.seed ^ 0x5EED),
    ];
    let mut expected: HashMap<&str, FlipSet> = HashMap::new();
    for (name, profiles, seed) in databases {
        log.note(format!(
            "seeding {name}: {profiles} profiles through seed::seed_bulk"
        ));
        let (seeding, vacuum) = seeded_database(&admin, server, name, spec(profiles, seed)).await?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect(&server.url(name))
            .await?;
        let facts = data_facts(&pool).await?;
        pool.close().await;
        let warm = run_floor(&server.url(name), cpu).await?;
        writeln!(
            out,
            "data {name}: {} profiles, {} agents, {} snapshots ({:.1}% of agents; {} unclassified = {:.1}% of snapshots), \
             {} flips = {:.3}% of agents (stale_per_mille={}); database {:.0} MiB, member_profiles {:.0} MiB; \
             seed_bulk {:.1}s, VACUUM ANALYZE {:.1}s",
            facts.profiles,
            facts.agents,
            facts.snapshots,
            100.0 * facts.snapshots as f64 / facts.agents as f64,
            facts.unclassified,
            100.0 * facts.unclassified as f64 / facts.snapshots as f64,
            warm.flips.len(),
            100.0 * warm.flips.len() as f64 / facts.agents as f64,
            config.stale_per_mille,
            facts.database_bytes as f64 / 1048576.0,
            facts.profiles_bytes as f64 / 1048576.0,
            secs(seeding),
            secs(vacuum),
        )?;
        log.note(format!(
            "{name}: seeded in {:.1}s, {} flips",
            secs(seeding),
            warm.flips.len()
        ));
        expected.insert(name, warm.flips);
    }
    let url_n = server.url("bench_n");
    let expected_n = &expected["bench_n"];

    // Main comparison: a, b, c alternate so drift in machine load hits all three alike.
    let mut a_runs = Vec::new();
    let mut b_runs = Vec::new();
    let mut b_jit_off_runs = Vec::new();
    let mut c_runs = Vec::new();
    let mut c_prepared = None;
    for round in 1..=config.rounds {
        log.note(format!("round {round}: (a) dry-run"));
        let a = run_tool(tool, &url_n, &dry_run_args(config, None), None).await?;
        compare("(a) dry-run vs expected", expected_n, &a.flips)?;
        log.note(format!(
            "round {round}: (a) {:.2}s, RSS {:.1} MiB; (b) floor",
            secs(a.wall),
            mib(a.max_rss_kib)
        ));
        let b = run_floor(&url_n, cpu).await?;
        compare("(b) floor vs expected", expected_n, &b.flips)?;
        let b_jit_off = run_floor_with(&url_n, cpu, FloorSession::JitOff).await?;
        compare(
            "(b') floor, jit off, vs expected",
            expected_n,
            &b_jit_off.flips,
        )?;
        log.note(format!(
            "round {round}: (b) {:.2}s, (b') jit off {:.2}s",
            secs(b.wall),
            secs(b_jit_off.wall)
        ));
        b_jit_off_runs.push(b_jit_off);
        if round <= config.c_rounds {
            log.note(format!(
                "round {round}: (c) script pattern, every {}th profile",
                config.c_every
            ));
            let c = run_script(&url_n, config.c_every, cpu, ScriptStatements::Unnamed).await?;
            let on_sample: FlipSet = a
                .flips
                .iter()
                .filter(|flip| c.sampled_ids.contains(&flip.0))
                .cloned()
                .collect();
            compare(
                "(c) script vs (a) on the sampled profiles",
                &on_sample,
                &c.flips,
            )?;
            log.note(format!(
                "round {round}: (c) load {:.2}s + loop {:.2}s over {} of {} profiles -> {:.1}s",
                secs(c.load),
                secs(c.resolve_loop),
                c.sampled,
                c.total,
                secs(c.estimate)
            ));
            c_runs.push(c);
            if round == 1 {
                let every = config.c_every.max(10);
                log.note(format!(
                    "round {round}: (c') script pattern with a reused prepared statement, every {every}th profile"
                ));
                let prepared = run_script(&url_n, every, cpu, ScriptStatements::Prepared).await?;
                log.note(format!(
                    "round {round}: (c') -> {:.1}s",
                    secs(prepared.estimate)
                ));
                c_prepared = Some(prepared);
            }
        }
        a_runs.push(a);
        b_runs.push(b);
    }

    writeln!(out)?;
    writeln!(
        out,
        "-- dry-run (a) vs floor (b) vs script pattern (c), N = {} profiles, batch size {} --",
        config.profiles,
        config
            .batch_size
            .map_or("tool default (1000)".to_owned(), |size| size.to_string())
    )?;
    writeln!(
        out,
        "round | (a) wall s | (a) in-tool s | (a) peak RSS MiB | (a) client CPU s (user+sys) | (a) server CPU s | (b) wall s | (b) server CPU s | (b') jit off wall s | (c) s"
    )?;
    for (index, ((a, b), b_jit_off)) in a_runs.iter().zip(&b_runs).zip(&b_jit_off_runs).enumerate()
    {
        let c = c_runs.get(index).map_or("-".to_owned(), |c| {
            if c.sampled == c.total {
                format!(
                    "{:.2} (load {:.2} + loop {:.2})",
                    secs(c.estimate),
                    secs(c.load),
                    secs(c.resolve_loop)
                )
            } else {
                format!(
                    "{:.1} EXTRAPOLATED (load {:.2} + loop {:.2} over {} of {} profiles, x{:.1})",
                    secs(c.estimate),
                    secs(c.load),
                    secs(c.resolve_loop),
                    c.sampled,
                    c.total,
                    c.total as f64 / c.sampled as f64
                )
            }
        });
        writeln!(
            out,
            "{:>5} | {:>10.2} | {:>13.2} | {:>16.1} | {:>7.2} ({:.2}+{:.2}) | {:>16.2} | {:>10.2} | {:>16.2} | {:>18.2} | {c}",
            index + 1,
            secs(a.wall),
            a.internal_ms.unwrap_or_default() as f64 / 1000.0,
            mib(a.max_rss_kib),
            secs(a.user + a.system),
            secs(a.user),
            secs(a.system),
            secs(a.server),
            secs(b.wall),
            secs(b.server),
            secs(b_jit_off.wall),
        )?;
    }
    let a_med = median(&a_runs.iter().map(|a| secs(a.wall)).collect::<Vec<_>>());
    let b_med = median(&b_runs.iter().map(|b| secs(b.wall)).collect::<Vec<_>>());
    let b_jit_off_med = median(
        &b_jit_off_runs
            .iter()
            .map(|b| secs(b.wall))
            .collect::<Vec<_>>(),
    );
    let c_med = median(&c_runs.iter().map(|c| secs(c.estimate)).collect::<Vec<_>>());
    let rss_n = a_runs
        .iter()
        .map(|a| a.max_rss_kib)
        .max()
        .unwrap_or_default();
    writeln!(
        out,
        "median | (a) {a_med:.2}s | (b) {b_med:.2}s | (b') {b_jit_off_med:.2}s | (c) {c_med:.1}s{}",
        if c_runs.iter().any(|c| c.sampled < c.total) {
            " (extrapolated from a sample)"
        } else {
            ""
        }
    )?;
    if let Some(c) = c_runs.first() {
        writeln!(
            out,
            "(c) bench-process RSS growth after SELECT * of {} rows: {:.0} MiB; (c) server CPU {:.2}s",
            c.total,
            mib(c.load_rss_growth_kib),
            secs(c.server)
        )?;
    }
    let flips_n = expected_n.len();
    let profiles_changed = a_runs[0].summary["profiles_changed"]
        .as_u64()
        .unwrap_or_default();
    writeln!(
        out,
        "flip sets: (a) = (b) = expected in every round ({flips_n} flips in {profiles_changed} profiles); (c) = (a) on {}",
        c_runs.first().map_or("-".to_owned(), |c| if c.sampled == c.total {
            "every profile".to_owned()
        } else {
            format!("its sample of {} profiles (every {}th)", c.sampled, config.c_every)
        })
    )?;

    log.note("anatomy: the tool's statements called without the binary");
    let batch = config.batch_size.unwrap_or(TOOL_DEFAULT_BATCH);
    let anatomy = anatomy(&url_n, batch, cpu).await?;
    writeln!(out)?;
    writeln!(
        out,
        "-- anatomy of (a): the tool's own statements (src/db.rs) called from the bench, batch {batch}, one READ ONLY REPEATABLE READ transaction --"
    )?;
    for line in anatomy {
        writeln!(out, "{line}")?;
    }

    log.note(format!(
        "N/10: (a) and (b) on bench_tenth ({tenth} profiles)"
    ));
    let url_tenth = server.url("bench_tenth");
    let expected_tenth = &expected["bench_tenth"];
    let mut tenth_a = Vec::new();
    let mut tenth_b = Vec::new();
    for _ in 0..config.rounds {
        let a = run_tool(tool, &url_tenth, &dry_run_args(config, None), None).await?;
        compare("(a) at N/10", expected_tenth, &a.flips)?;
        let b = run_floor(&url_tenth, cpu).await?;
        compare("(b) at N/10", expected_tenth, &b.flips)?;
        tenth_a.push(a);
        tenth_b.push(b);
    }
    let rss_tenth = tenth_a
        .iter()
        .map(|a| a.max_rss_kib)
        .max()
        .unwrap_or_default();
    let ta_med = median(&tenth_a.iter().map(|a| secs(a.wall)).collect::<Vec<_>>());
    let tb_med = median(&tenth_b.iter().map(|b| secs(b.wall)).collect::<Vec<_>>());
    writeln!(out)?;
    writeln!(
        out,
        "-- N/10 = {tenth} profiles ({} flips) --",
        expected_tenth.len()
    )?;
    writeln!(
        out,
        "(a) wall s: {}; peak RSS MiB: {}",
        tenth_a
            .iter()
            .map(|a| format!("{:.2}", secs(a.wall)))
            .collect::<Vec<_>>()
            .join(", "),
        tenth_a
            .iter()
            .map(|a| format!("{:.1}", mib(a.max_rss_kib)))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    writeln!(
        out,
        "(b) wall s: {}; a/b (medians) {:.2}",
        tenth_b
            .iter()
            .map(|b| format!("{:.2}", secs(b.wall)))
            .collect::<Vec<_>>()
            .join(", "),
        ta_med / tb_med
    )?;

    let mut sweep_lines = Vec::new();
    if !config.sweep.is_empty() {
        let mut by_size: Vec<(u32, Vec<ToolRun>)> = config
            .sweep
            .iter()
            .map(|size| (*size, Vec::new()))
            .collect();
        for round in 1..=config.sweep_rounds {
            for (size, runs) in by_size.iter_mut() {
                log.note(format!("batch sweep round {round}: --batch-size {size}"));
                let a = run_tool(tool, &url_n, &dry_run_args(config, Some(*size)), None).await?;
                compare("(a) in the batch sweep", expected_n, &a.flips)?;
                runs.push(a);
            }
        }
        for (size, runs) in &by_size {
            sweep_lines.push(format!(
                "--batch-size {size:>6}: wall s {} (median {:.2}); peak RSS MiB {}; client CPU s {}; server CPU s {}",
                runs.iter().map(|a| format!("{:.2}", secs(a.wall))).collect::<Vec<_>>().join(", "),
                median(&runs.iter().map(|a| secs(a.wall)).collect::<Vec<_>>()),
                runs.iter().map(|a| format!("{:.1}", mib(a.max_rss_kib))).collect::<Vec<_>>().join(", "),
                runs.iter().map(|a| format!("{:.2}", secs(a.user + a.system))).collect::<Vec<_>>().join(", "),
                runs.iter().map(|a| format!("{:.2}", secs(a.server))).collect::<Vec<_>>().join(", "),
            ));
        }
    }
    if !sweep_lines.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "-- batch size sweep, (a) at N = {} --",
            config.profiles
        )?;
        for line in &sweep_lines {
            writeln!(out, "{line}")?;
        }
    }

    for prefix in &config.diagnose {
        log.note(format!("diagnostic dry-run under {prefix:?}"));
        let a = run_tool(tool, &url_n, &dry_run_args(config, None), Some(prefix)).await?;
        compare("(a) under a diagnostic wrapper", expected_n, &a.flips)?;
        writeln!(out)?;
        writeln!(
            out,
            "diagnostic dry-run under {:?}: wall {:.2}s (not in the figures)",
            prefix.join(" "),
            secs(a.wall)
        )?;
    }

    let apply = bench_apply(config, server, &admin, tool, log, version_num).await?;
    writeln!(out)?;
    out.push_str(&apply.text);

    let a_over_b = a_med / b_med;
    let c_over_a = c_med / a_med;
    writeln!(out)?;
    writeln!(out, "-- targets --")?;
    let verdict = |met: bool| if met { "MET" } else { "NOT MET" };
    writeln!(
        out,
        "dry-run <= 1.5x floor:             a/b = {a_over_b:.2} (per round: {})  {}",
        a_runs
            .iter()
            .zip(&b_runs)
            .map(|(a, b)| format!("{:.2}", secs(a.wall) / secs(b.wall)))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(a_over_b <= 1.5)
    )?;
    writeln!(
        out,
        "  the same against the floor with jit off (the tool's own setting): a/b' = {:.2}",
        a_med / b_jit_off_med
    )?;
    writeln!(
        out,
        "dry-run >= 30x faster than script: c/a = {c_over_a:.1}{}  {}",
        if c_runs.iter().any(|c| c.sampled < c.total) {
            " ((c) extrapolated from a sample)"
        } else {
            ""
        },
        verdict(c_over_a >= 30.0)
    )?;
    writeln!(
        out,
        "  (c) and (b): c/b = {:.1}, the floor's own margin over the script pattern",
        c_med / b_med
    )?;
    if let Some(prepared) = &c_prepared {
        writeln!(
            out,
            "  (c') with one reused prepared statement instead of node-postgres's unnamed ones: {:.1}s ({} of {} profiles, scaled), c'/a = {:.1}",
            secs(prepared.estimate),
            prepared.sampled,
            prepared.total,
            secs(prepared.estimate) / a_med
        )?;
    }
    writeln!(
        out,
        "peak RSS <= 64 MiB at N:           {:.1} MiB at {} profiles  {}",
        mib(rss_n),
        config.profiles,
        verdict(mib(rss_n) <= 64.0)
    )?;
    writeln!(
        out,
        "peak RSS about the same at N/10:   {:.1} MiB at {tenth} profiles (RSS at N / RSS at N/10 = {:.2})",
        mib(rss_tenth),
        rss_n as f64 / rss_tenth as f64
    )?;
    writeln!(
        out,
        "apply of ~{} flips <= 1.2x dry-run: {:.2}  {}",
        apply.flips,
        apply.ratio,
        verdict(apply.ratio <= 1.2)
    )?;
    admin.close().await;
    Ok(out)
}

/// CREATE DATABASE ... TEMPLATE refuses while any session is connected to the source; say who is.
async fn copy_database(
    admin: &PgPool,
    source: &str,
    target: &str,
    strategy: &str,
    log: &Log,
) -> Result<()> {
    let mut attempt = 1;
    loop {
        let created = sqlx::query(&format!(
            "CREATE DATABASE {target} TEMPLATE {source}{strategy}"
        ))
        .execute(admin)
        .await;
        match created {
            Ok(_) => return Ok(()),
            Err(error) if attempt < 5 => {
                let sessions: Vec<String> = sqlx::query_scalar(
                    "SELECT format('pid %s %s %s %s', pid, backend_type, state, application_name) \
                     FROM pg_stat_activity WHERE datname = $1",
                )
                .bind(source)
                .fetch_all(admin)
                .await?;
                log.note(format!(
                    "copy of {source} failed ({error}); sessions on it: {sessions:?}; retrying"
                ));
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
}

struct ApplyFigures {
    text: String,
    flips: usize,
    ratio: f64,
}

/// Apply on fresh copies of a database holding about `apply_flips` flips, each copy dry-run first
/// so both runs see the same cache state.
#[allow(clippy::too_many_arguments)]
async fn bench_apply(
    config: &Config,
    server: &EphemeralPostgres,
    admin: &PgPool,
    tool: &Tool<'_>,
    log: &Log,
    version_num: i32,
) -> Result<ApplyFigures> {
    let cpu = tool.cpu;
    // FILE_COPY copies the files instead of WAL-logging every block; far faster for big copies.
    let strategy = if version_num >= 150_000 {
        " STRATEGY FILE_COPY"
    } else {
        ""
    };
    log.note("apply: template copy of bench_n");
    let started = Instant::now();
    copy_database(admin, "bench_n", "bench_apply_tpl", strategy, log).await?;
    let copy_time = started.elapsed();
    let mut tpl = PgConnection::connect(&server.url("bench_apply_tpl")).await?;
    // Every bulk flip is a stale 'buying' agent whose probe says 'sales'; probing it as 'buying'
    // removes the flip without touching member_profiles.
    let trimmed = sqlx::query(&format!(
        "UPDATE agent_capabilities_snapshot SET inferred_type = 'buying' \
         WHERE agent_url IN (SELECT url FROM ({FLOOR_SQL}) f ORDER BY id, idx OFFSET $1)"
    ))
    .bind(i64::try_from(config.apply_flips)?)
    .execute(&mut tpl)
    .await?
    .rows_affected();
    sqlx::raw_sql("VACUUM (ANALYZE) agent_capabilities_snapshot")
        .execute(&mut tpl)
        .await?;
    tpl.close().await?;
    let expected = run_floor(&server.url("bench_apply_tpl"), cpu).await?.flips;
    let flips = expected.len();
    log.note(format!(
        "apply: template has {flips} flips ({trimmed} trimmed)"
    ));

    let mut text = String::new();
    writeln!(
        text,
        "-- apply of {flips} flips over {} profiles (copies of bench_n trimmed to at most {} flips; CREATE DATABASE TEMPLATE took {:.1}s) --",
        config.profiles,
        config.apply_flips,
        secs(copy_time)
    )?;
    writeln!(
        text,
        "round | dry-run wall s | apply wall s | apply/dry-run | written | apply peak RSS MiB | apply client CPU s | apply server CPU s"
    )?;
    let mut ratios = Vec::new();
    for round in 1..=config.apply_rounds {
        let name = format!("bench_apply_{round}");
        copy_database(admin, "bench_apply_tpl", &name, strategy, log).await?;
        let url = server.url(&name);
        log.note(format!("apply round {round}: dry-run then apply on {name}"));
        let dry = run_tool(tool, &url, &dry_run_args(config, None), None).await?;
        compare("dry-run on the apply copy", &expected, &dry.flips)?;
        let mut args: Vec<String> = [
            "--apply",
            "--format",
            "json",
            "--max-flips",
            APPLY_MAX_FLIPS,
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(config.batch_args());
        let applied = run_tool(tool, &url, &args, None).await?;
        compare("apply's planned flips", &expected, &applied.flips)?;
        let written = applied.summary["written"].as_u64().unwrap_or_default();
        ensure!(
            usize::try_from(written)? == flips,
            "apply wrote {written} of {flips} flips: {}",
            applied.summary
        );
        let after = run_floor(&url, cpu).await?;
        ensure!(
            after.flips.is_empty(),
            "{} flips left after apply",
            after.flips.len()
        );
        let mut check = PgConnection::connect(&url).await?;
        let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM type_reclassification_log")
            .fetch_one(&mut check)
            .await?;
        check.close().await?;
        ensure!(
            usize::try_from(audited)? == flips,
            "{audited} audit rows for {flips} flips"
        );
        let ratio = secs(applied.wall) / secs(dry.wall);
        ratios.push(ratio);
        writeln!(
            text,
            "{round:>5} | {:>14.2} | {:>12.2} | {:>13.2} | {written:>7} | {:>18.1} | {:>18.2} | {:>18.2}",
            secs(dry.wall),
            secs(applied.wall),
            ratio,
            mib(applied.max_rss_kib),
            secs(applied.user + applied.system),
            secs(applied.server),
        )?;
        sqlx::query(&format!("DROP DATABASE {name}"))
            .execute(admin)
            .await?;
    }
    let ratio = median(&ratios);
    writeln!(
        text,
        "median apply/dry-run {ratio:.2}; after each apply the floor query finds 0 flips and the audit log holds {flips} rows"
    )?;
    Ok(ApplyFigures { text, flips, ratio })
}
