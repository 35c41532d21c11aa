//! Nothing left behind: an interrupted rehearsal removes its throwaway cluster, and a cluster
//! left by a process killed with SIGKILL is removed by the next start, once provably dead.

use std::time::{Duration, Instant};

use crate::common::{Scratch, Tool, ToolRun, HANG};

/// The throwaway cluster directory under `scratch`, once its server has written its pid file.
fn started_cluster(scratch: &Scratch) -> bool {
    std::fs::read_dir(&scratch.0).unwrap().any(|entry| {
        let path = entry.unwrap().path();
        path.file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with("agent-type-backfill-pg-"))
            && path.join("data").join("postmaster.pid").exists()
    })
}

/// A long rehearsal in `scratch` as its `TMPDIR`, once its server has started.
async fn rehearsal_with_its_server_up(scratch: &Scratch, logs: &Scratch) -> ToolRun {
    // Enough profiles that the rehearsal is still seeding when the test acts.
    let mut run = Tool::new(&["rehearse", "--profiles", "2000000"])
        .env("TMPDIR", scratch.path())
        .spawn_into(logs, "rehearse");
    let started = Instant::now();
    while !started_cluster(scratch) {
        assert!(
            run.running(),
            "the rehearsal ended before its server started"
        );
        assert!(started.elapsed() < HANG, "the server never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run
}

#[tokio::test]
async fn rehearse_interrupted_by_sigint_or_sigterm_removes_its_cluster_directory() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let scratch = Scratch::for_a_server();
        let logs = Scratch::new();
        let run = rehearsal_with_its_server_up(&scratch, &logs).await;
        run.signal(signal);
        let done = run.finish().await;
        assert_eq!(done.code(), 128 + signal, "{}", done.stderr);
        let leftovers = scratch.leftovers("");
        assert!(
            leftovers.is_empty(),
            "signal {signal}: rehearse left {leftovers:?}"
        );
    }
}

/// A process's start time as `/proc/PID/stat` gives it (field 22).
fn start_time(pid: u32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields = &stat[stat.rfind(')').unwrap() + 1..];
    fields.split_whitespace().nth(19).unwrap().to_owned()
}

fn cluster_dir(base: &Scratch, name: &str, marker: Option<String>) -> std::path::PathBuf {
    let dir = base.0.join(name);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    if let Some(marker) = marker {
        std::fs::write(dir.join("owner.pid"), marker).unwrap();
    }
    dir
}

#[test]
fn only_cluster_directories_provably_ours_and_dead_are_removed() {
    let base = Scratch::new();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let me = std::process::id();
    let prefix = "agent-type-backfill-pg-";
    let stale = cluster_dir(
        &base,
        &format!("{prefix}{dead}-aaaa"),
        Some(format!("{dead} 1")),
    );
    let alive = cluster_dir(
        &base,
        &format!("{prefix}{me}-bbbb"),
        Some(format!("{me} {}", start_time(me))),
    );
    // The same pid reused by another process: its start time differs, so the owner is dead.
    let reused = cluster_dir(
        &base,
        &format!("{prefix}{me}-cccc"),
        Some(format!("{me} 1")),
    );
    let unmarked = cluster_dir(&base, &format!("{prefix}{dead}-dddd"), None);
    let mismatched = cluster_dir(
        &base,
        &format!("{prefix}{me}-eeee"),
        Some(format!("{dead} 1")),
    );
    let other = cluster_dir(
        &base,
        &format!("someone-else-{dead}"),
        Some(format!("{dead} 1")),
    );

    let mut removed = agent_type_backfill::support::ephemeral::remove_stale_clusters_in(&base.0);
    removed.sort();
    let mut expected = vec![stale.clone(), reused.clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(!stale.exists() && !reused.exists());
    for kept in [alive, unmarked, mismatched, other] {
        assert!(
            kept.exists(),
            "{kept:?} is not provably a dead cluster of ours"
        );
    }
}

/// The postgres pid a cluster directory's pid file names.
fn server_pid(scratch: &Scratch) -> Option<u32> {
    std::fs::read_dir(&scratch.0).unwrap().find_map(|entry| {
        let text =
            std::fs::read_to_string(entry.unwrap().path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    })
}

#[tokio::test]
async fn a_cluster_left_by_a_killed_process_is_removed_by_the_next_start() {
    let scratch = Scratch::for_a_server();
    let logs = Scratch::new();
    let run = rehearsal_with_its_server_up(&scratch, &logs).await;
    let started = Instant::now();
    // The pid file is written in steps: wait for its first line.
    let server = loop {
        if let Some(pid) = server_pid(&scratch) {
            break pid;
        }
        assert!(started.elapsed() < HANG, "no pid in the server's pid file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    run.kill();
    let _ = run.finish().await;
    assert_eq!(
        scratch.leftovers("").len(),
        1,
        "SIGKILL leaves the directory"
    );
    // The server follows its owner (its parent-death signal); wait for it to be gone.
    let started = Instant::now();
    while std::path::Path::new(&format!("/proc/{server}")).exists() {
        assert!(
            started.elapsed() < HANG,
            "postgres {server} outlived its owner"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    Tool::new(&["rehearse", "--profiles", "5"])
        .env("TMPDIR", scratch.path())
        .status(0)
        .run();
    let leftovers = scratch.leftovers("");
    assert!(
        leftovers.is_empty(),
        "the stale cluster is still there: {leftovers:?}"
    );
}
