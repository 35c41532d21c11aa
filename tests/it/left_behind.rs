//! Nothing left behind: an interrupted rehearsal removes its throwaway cluster.

use std::time::{Duration, Instant};

use crate::common::{Scratch, Tool, HANG};

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

#[tokio::test]
async fn rehearse_interrupted_by_sigint_or_sigterm_removes_its_cluster_directory() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let scratch = Scratch::for_a_server();
        let logs = Scratch::new();
        // Enough profiles that the rehearsal is still seeding when the signal comes.
        let mut run = Tool::new(&["rehearse", "--profiles", "2000000"])
            .env("TMPDIR", scratch.path())
            .spawn_into(&logs, "rehearse");
        let started = Instant::now();
        while !started_cluster(&scratch) {
            assert!(
                run.running(),
                "the rehearsal ended before its server started"
            );
            assert!(started.elapsed() < HANG, "the server never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
