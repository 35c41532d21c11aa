//! `rehearse`: the whole operator procedure against a throwaway local registry, through the same
//! code paths as a real run, leaving nothing behind.

use std::io::Write;

use anyhow::{ensure, Context, Result};

use crate::backfill;
use crate::cli::RehearseArgs;
use crate::config::BackfillConfig;
use crate::domain::Mode;
use crate::interrupt::StopSignal;
use crate::report;
use crate::support::ephemeral::EphemeralPostgres;
use crate::support::seed;

pub(crate) async fn rehearse(args: &RehearseArgs, out: &mut (dyn Write + Send)) -> Result<()> {
    // Listening before the server starts: Ctrl-C (SIGINT) or SIGTERM at any moment still stops
    // the throwaway cluster and removes its directory, as success and failure do.
    let stop = crate::interrupt::StopSignal::from_os()?;
    let server = tokio::task::spawn_blocking(EphemeralPostgres::start)
        .await
        .context("the server start-up task panicked")??;
    let mut interrupted = stop.clone();
    let outcome = tokio::select! {
        outcome = rehearse_on(&server, args, out) => outcome,
        signal = interrupted.wait() => {
            Err(crate::error::Failure::Interrupted {
                stop: crate::outcome::Stop::from_number(signal),
                what: "the rehearsal's throwaway server is stopped and its directory removed",
            }
            .into())
        }
    };
    tokio::task::spawn_blocking(move || server.stop())
        .await
        .context("the server shutdown task panicked")??;
    outcome
}

async fn rehearse_on(
    server: &EphemeralPostgres,
    args: &RehearseArgs,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let pool = seed::create_database(server, "registry")
        .await
        .context("could not create the rehearsal database")?;
    crate::support::MIGRATOR
        .run(&pool)
        .await
        .context("could not apply migrations/ to the rehearsal database")?;
    seed::seed_rehearsal(&pool, args.profiles)
        .await
        .context("could not seed the rehearsal registry")?;
    seed::seed_crawler_disagreements(&pool).await?;
    // As on staging: the dry-runs and the apply run as roles with exactly the RUNBOOK's grants,
    // so the rehearsal proves them too.
    let (planner, writer) = ("backfill_planner", "backfill");
    seed::create_runbook_roles(&pool, planner, writer).await?;

    let steps = [
        ("1/3", "staging dry-run", Mode::DryRun, planner),
        ("2/3", "apply", Mode::Apply, writer),
        ("3/3", "re-run after apply (dry-run)", Mode::DryRun, planner),
    ];
    let mut summaries = Vec::new();
    for (step, title, mode, role) in steps {
        writeln!(out, "=== rehearsal {step}: {title}, as role {role} ===")
            .context("could not write to stdout")?;
        let role_url = server.url_as(role, "registry");
        let mut config = BackfillConfig::new(mode, role_url);
        config.run.format = args.format;
        let mut printer = report::printer(config.run.format, out);
        summaries.push(backfill::execute(&config, printer.as_mut(), StopSignal::never()).await?);
        drop(printer);
        writeln!(out).context("could not write to stdout")?;
    }

    let audit_rows = seed::backfill_audit_rows(&pool).await?;
    pool.close().await;
    let (dry, apply, rerun) = (&summaries[0], &summaries[1], &summaries[2]);
    ensure!(
        dry.flips == apply.written && apply.written == audit_rows && rerun.flips == 0,
        "rehearsal failed: dry-run planned {}, apply wrote {}, audit has {audit_rows} rows, re-run found {}",
        dry.flips,
        apply.written,
        rerun.flips
    );
    writeln!(
        out,
        "rehearsal passed: the dry-run planned {} flips, the apply wrote {} with {audit_rows} audit rows, \
         the re-run found none; the throwaway server and its files are removed",
        dry.flips, apply.written
    )
    .context("could not write to stdout")?;
    Ok(())
}
