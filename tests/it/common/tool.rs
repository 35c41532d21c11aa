//! The built binary, run as an operator runs it: one builder for every end-to-end test, in the
//! style of just's test builder. Output goes to files, so a long run log never blocks the tool on
//! a full pipe and a killed run still leaves what it printed.

use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Dump, RunLog, TestDb};

pub const BIN: &str = env!("CARGO_BIN_EXE_agent-type-backfill");

/// How long a run may take before a test calls it hung.
pub const HANG: Duration = Duration::from_secs(90);

/// A directory of its own for what a test writes (run logs, plan files, a server's sockets),
/// removed when dropped: the one way tests make a temporary path.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "atb-test-{}",
            &Uuid::new_v4().simple().to_string()[..12]
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A scratch directory the tool may use as `TMPDIR` for a throwaway server, which belongs to
    /// the `postgres` user when the tests run as root.
    pub fn for_a_server() -> Scratch {
        let scratch = Scratch::new();
        std::fs::set_permissions(
            &scratch.0,
            std::os::unix::fs::PermissionsExt::from_mode(0o1777),
        )
        .unwrap();
        scratch
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// A file or directory named `name` inside, removed with the rest.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// [`Scratch::join`] as a command-line argument.
    pub fn arg(&self, name: &str) -> String {
        self.join(name).to_str().unwrap().to_owned()
    }

    /// What is in the directory, apart from `keep`.
    pub fn leftovers(&self, keep: &str) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name != keep)
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One invocation of the binary with a clean environment: no `DATABASE_URL`, password, password
/// file or log settings from the test's own environment.
pub struct Tool {
    command: Command,
    /// The exit code the run must end with, checked as it ends (`status`).
    status: Option<i32>,
    /// The database the run must leave as it was, checked as it ends (`writes_nothing`).
    unchanged: Option<String>,
}

impl Tool {
    pub fn new(args: &[&str]) -> Tool {
        let mut command = Command::new(BIN);
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .env_remove("PGSSLMODE")
            .env_remove("PGSSLROOTCERT")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        Tool {
            command,
            status: None,
            unchanged: None,
        }
    }

    /// The run must exit with `code`: however it is run, its end fails the test otherwise, with
    /// the run's whole output.
    pub fn status(mut self, code: i32) -> Tool {
        self.status = Some(code);
        self
    }

    /// The run must leave every row of `db` as it was: however it is run, its end fails the test
    /// otherwise, showing the rows it changed and the run's whole output.
    pub fn writes_nothing(mut self, db: &TestDb) -> Tool {
        self.unchanged = Some(db.url.clone());
        self
    }

    pub fn database(mut self, url: &str) -> Tool {
        self.command.env("DATABASE_URL", url);
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Tool {
        self.command.env(key, value);
        self
    }

    /// Runs to the end.
    pub fn run(self) -> Finished {
        let scratch = Scratch::new();
        let mut run = self.spawn_into(&scratch, "run");
        let status = run.child.wait().unwrap();
        run.finished(status)
    }

    /// Runs to the end, or kills the run and fails the test once it has taken `limit`: for runs
    /// a defect could keep retrying for ever.
    pub fn run_within(self, limit: Duration) -> Finished {
        let scratch = Scratch::new();
        let mut run = self.spawn_into(&scratch, "run");
        loop {
            if let Some(status) = run.child.try_wait().unwrap() {
                return run.finished(status);
            }
            if run.started.elapsed() > limit {
                run.kill();
                let _ = run.child.wait();
                panic!(
                    "the tool ran past {limit:?}; stderr:\n{}",
                    std::fs::read_to_string(&run.stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the run in the background, logging into a scratch directory of its own.
    pub fn spawn(self) -> ToolRun {
        let scratch = Scratch::new();
        let mut run = self.spawn_into(&scratch, "run");
        run.scratch = Some(scratch);
        run
    }

    /// Starts the run in the background, logging into `scratch` as `tag.stdout`, `tag.stderr`.
    pub fn spawn_into(mut self, scratch: &Scratch, tag: &str) -> ToolRun {
        let unchanged = self.unchanged.map(|url| {
            let before = Dump::now(&url);
            (url, before)
        });
        let stdout = scratch.0.join(format!("{tag}.stdout"));
        let stderr = scratch.0.join(format!("{tag}.stderr"));
        let child = self
            .command
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        ToolRun {
            child,
            stdout,
            stderr,
            started: Instant::now(),
            scratch: None,
            status: self.status,
            unchanged,
        }
    }
}

pub struct ToolRun {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    pub started: Instant,
    /// The run's own log directory, when it has one.
    scratch: Option<Scratch>,
    /// [`Tool::status`].
    status: Option<i32>,
    /// [`Tool::writes_nothing`]: the database's url, and its rows as the run started.
    unchanged: Option<(String, Dump)>,
}

impl ToolRun {
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        unsafe { libc::kill(pid, signal) };
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Waits until the run's stderr so far contains `needle` (true), or the run ends or hangs
    /// first (false): a condition to wait on, not a time.
    pub async fn stderr_shows(&mut self, needle: &str) -> bool {
        while self.started.elapsed() < HANG {
            let seen = std::fs::read_to_string(&self.stderr).unwrap_or_default();
            if seen.contains(needle) {
                return true;
            }
            if !self.running() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    /// Waits for the run to end; a run past [`HANG`] is killed and fails the test.
    pub async fn finish(mut self) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if self.started.elapsed() > HANG {
                self.kill();
                let _ = self.child.wait();
                panic!(
                    "the tool hung for {HANG:?}; stderr:\n{}",
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        self.finished(status)
    }

    fn finished(&mut self, status: ExitStatus) -> Finished {
        let stdout = std::fs::read_to_string(&self.stdout).unwrap();
        // A line cut short by SIGKILL is not part of the log.
        let complete = stdout.rfind('\n').map_or("", |end| &stdout[..=end]);
        let finished = Finished {
            log: RunLog::new(complete),
            status,
            stderr: std::fs::read_to_string(&self.stderr).unwrap(),
            stdout,
            elapsed: self.started.elapsed(),
        };
        drop(self.scratch.take());
        if let Some(code) = self.status {
            finished.exits(code);
        }
        if let Some((url, before)) = &self.unchanged {
            let what = format!(
                "{}\n--- stdout\n{}\n--- stderr\n{}",
                finished.describe(),
                finished.stdout,
                finished.stderr
            );
            before.assert_same(&Dump::now(url), &what);
        }
        finished
    }
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    /// The complete lines of stdout, as a run log.
    log: RunLog,
}

impl Finished {
    /// The exit code of a run that exited rather than died of a signal.
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("died of a signal: {}\n{}", self.describe(), self.stderr))
    }

    /// The run log (of a `--format json` run) as typed events.
    pub fn log(&self) -> &RunLog {
        &self.log
    }

    /// The audit run id of a JSON log that got as far as its header.
    pub fn run_id(&self) -> Option<String> {
        match self.log.events().first() {
            Some(super::Event::Start(start)) => Some(start.run_id.clone()),
            _ => None,
        }
    }

    /// Fails the test, showing the run's whole output, unless it exited with `code`; returns the
    /// run for the checks that follow.
    #[track_caller]
    pub fn exits(&self, code: i32) -> &Finished {
        assert_eq!(
            self.status.code(),
            Some(code),
            "expected exit {code}, got {}\n--- stdout\n{}\n--- stderr\n{}",
            self.describe(),
            self.stdout,
            self.stderr
        );
        self
    }

    /// Fails the test, showing its stderr, unless stderr contains `needle`; returns the run for
    /// the checks that follow.
    #[track_caller]
    pub fn stderr_has(&self, needle: &str) -> &Finished {
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }

    pub fn describe(&self) -> String {
        match (self.status.code(), self.status.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(signal)) => format!("signal {signal}"),
            _ => format!("{:?}", self.status),
        }
    }

    /// The one `error: ...` line a failed run prints.
    pub fn error_line(&self) -> String {
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|line| line.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "a failed run prints one error line:\n{}",
            self.stderr
        );
        errors[0].to_owned()
    }
}

/// [`Tool::writes_nothing`] is an expectation that can fail: a run that writes fails it.
#[test]
#[should_panic(expected = "the run was to write nothing, and changed these rows:\n- (")]
fn a_binary_apply_that_writes_fails_writes_nothing() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let db = runtime.block_on(TestDb::seeded(0));
    Tool::new(&["--apply"])
        .database(&db.url)
        .writes_nothing(&db)
        .run();
}
