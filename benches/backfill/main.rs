//! `cargo bench --bench backfill`: the tool's dry-run against a one-query floor and against the
//! access pattern of the original TypeScript script, on a throwaway PostgreSQL, plus the cost of an
//! apply. Figures and how to read them: bench/README-figures.md.
//!
//! Knobs (environment): BENCH_PROFILES (1000000), BENCH_ROUNDS (3), BENCH_STALE_PER_MILLE (2),
//! BENCH_SEED, BENCH_BATCH_SIZE (tool default), BENCH_CHUNK_SIZE (tool default),
//! BENCH_BATCH_SWEEP ("1000,5000,10000", "" skips),
//! BENCH_SWEEP_ROUNDS (2), BENCH_C_EVERY (1 = every profile), BENCH_C_ROUNDS, BENCH_APPLY_FLIPS
//! (1000), BENCH_APPLY_ROUNDS (3), BENCH_BIN (binary to time), BENCH_DIAGNOSE (command prefixes
//! separated by ';', e.g. "perf record -e cpu-clock -a -g -o /tmp/a.data --": one extra dry-run at
//! N under each, reported apart from the figures), BENCH_BOUNDS (1; 0 skips the lower bounds of
//! a plan in chunks by key, run each round beside (a) and (b)).

// Ratios, rates and MiB of counts far below 2^52, for a printed report: the rounding is the point.
#![allow(clippy::cast_precision_loss)]

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

use agent_type_backfill::resolver::{
    diff_flips, resolve_agents, SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES,
};
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

/// The resolve rule and the flip rule of src/resolver.rs, evaluated inside the server, with the
/// rule's vocabulary spliced in from the resolver's own constants as literals, as a DBA would type
/// them.
static FLOOR_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let vocabulary = format!("'{{{}}}'::text[]", VALID_AGENT_TYPES.join(","));
    FLOOR_TEMPLATE
        .replace("{VOCABULARY}", &vocabulary)
        .replace("{SELF_DECLARED}", SELF_DECLARED_TYPE)
        .replace("{UNKNOWN}", UNKNOWN_TYPE)
});

const FLOOR_TEMPLATE: &str = r#"
WITH elements AS (
    SELECT p.id, e.ord - 1 AS idx, e.elem
    FROM member_profiles p
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(p.agents) = 'array' THEN p.agents ELSE '[]'::jsonb END
    ) WITH ORDINALITY AS e(elem, ord)
    WHERE jsonb_typeof(e.elem) = 'object' AND jsonb_typeof(e.elem -> 'url') = 'string'
), resolved AS (
    SELECT x.id, x.idx, x.elem ->> 'url' AS url,
           coalesce(nullif(x.elem -> 'type', 'null'::jsonb), '"{UNKNOWN}"'::jsonb) AS from_type,
           CASE
               WHEN s.agent_url IS NOT NULL THEN
                   CASE
                       WHEN s.inferred_type = ANY (
                           {VOCABULARY}
                       ) THEN s.inferred_type
                       WHEN x.elem -> 'type' = '"{SELF_DECLARED}"'::jsonb THEN '{SELF_DECLARED}'
                       ELSE '{UNKNOWN}'
                   END
               WHEN jsonb_typeof(x.elem -> 'type') = 'string'
                    AND NOT (x.elem ->> 'type') = ANY (
                        {VOCABULARY}
                    ) THEN '{UNKNOWN}'
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

mod config;
mod facts;
mod launcher;
mod runs;

use config::*;
use facts::*;
use launcher::*;
use runs::*;

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
    let chunk = config.chunk_size.unwrap_or(TOOL_DEFAULT_CHUNK);
    let mut bound_runs: Vec<Vec<BoundRun>> = BOUNDS.iter().map(|_| Vec::new()).collect();
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
        if config.bounds {
            for ((name, sql), runs) in BOUNDS.iter().zip(bound_runs.iter_mut()) {
                let bound = run_bound(&url_n, sql, chunk, TOOL_DEFAULT_JOBS, cpu).await?;
                ensure!(
                    bound.profiles == a.summary["profiles_scanned"].as_u64().unwrap_or_default(),
                    "{name} read {} profiles, the dry-run {}",
                    bound.profiles,
                    a.summary["profiles_scanned"]
                );
                log.note(format!("round {round}: {name} {:.2}s", secs(bound.wall)));
                runs.push(bound);
            }
        }
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
        "round | (a) wall s | (a) in-tool s | (a) peak RSS MiB | (a) client CPU s (user+sys) | (a) server CPU s | (a) slowest statement s | (b) wall s | (b) server CPU s | (b') jit off wall s | (c) s"
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
            "{:>5} | {:>10.2} | {:>13.2} | {:>16.1} | {:>7.2} ({:.2}+{:.2}) | {:>16.2} | {:>23} | {:>10.2} | {:>16.2} | {:>18.2} | {c}",
            index + 1,
            secs(a.wall),
            a.internal_ms.unwrap_or_default() as f64 / 1000.0,
            mib(a.max_rss_kib),
            secs(a.user + a.system),
            secs(a.user),
            secs(a.system),
            secs(a.server),
            a.slowest_statement
                .map_or("-".to_owned(), |slowest| format!("{:.3}", secs(slowest))),
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

    if config.bounds {
        writeln!(out)?;
        writeln!(
            out,
            "-- lower bounds: the least a plan in chunks of {chunk} profiles by key must do, {TOOL_DEFAULT_JOBS} jobs as the tool runs them (benches/backfill/runs.rs BOUNDS) --"
        )?;
        writeln!(
            out,
            "bound | wall s per round | server CPU s per round | slowest statement s | median / floor (b) median"
        )?;
        for ((name, _), runs) in BOUNDS.iter().zip(&bound_runs) {
            let list = |value: &dyn Fn(&BoundRun) -> String| {
                runs.iter().map(value).collect::<Vec<_>>().join(", ")
            };
            let bound_med = median(&runs.iter().map(|run| secs(run.wall)).collect::<Vec<_>>());
            writeln!(
                out,
                "{name} | {} | {} | {:.3} | {:.2}",
                list(&|run| format!("{:.2}", secs(run.wall))),
                list(&|run| format!("{:.2}", secs(run.server))),
                secs(runs.iter().map(|run| run.slowest).max().unwrap_or_default()),
                bound_med / b_med,
            )?;
        }
        writeln!(
            out,
            "(a) the dry-run itself | median / floor (b) median {:.2}",
            a_med / b_med
        )?;
    }
    log.note("plans of one chunk and of the floor");
    writeln!(out)?;
    writeln!(out, "-- plans --")?;
    for line in plans(&url_n, chunk).await? {
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
        "dry-run <= floor (issue 19):       a/b = {a_over_b:.2} (per round: {})  {}",
        a_runs
            .iter()
            .zip(&b_runs)
            .map(|(a, b)| format!("{:.2}", secs(a.wall) / secs(b.wall)))
            .collect::<Vec<_>>()
            .join(", "),
        verdict(a_over_b <= 1.0)
    )?;
    if let Some(lookups) = bound_runs.last().filter(|runs| !runs.is_empty()) {
        let bound_med = median(&lookups.iter().map(|run| secs(run.wall)).collect::<Vec<_>>());
        writeln!(
            out,
            "  no plan in chunks by key can go below bound (3): {:.2}x the floor here",
            bound_med / b_med
        )?;
    }
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
    if config.apply_rounds == 0 {
        // Nothing asked for: no template copy either, which at 10,000,000 profiles is a copy of
        // the whole database.
        return Ok(ApplyFigures {
            text: "-- apply: not measured (BENCH_APPLY_ROUNDS=0) --\n".to_owned(),
            flips: 0,
            ratio: f64::NAN,
        });
    }
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
         WHERE agent_url IN (SELECT url FROM ({}) f ORDER BY id, idx OFFSET $1)",
        *FLOOR_SQL
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
