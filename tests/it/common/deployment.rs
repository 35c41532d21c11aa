//! Test support for production deployment shapes: a PgBouncer in front of the test server, the
//! built binary run against a URL, and roles granted exactly what the runbook lists.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_type_backfill::support::ephemeral::server_owner;
use uuid::Uuid;

use super::{Finished, Tool};

/// Runs the built binary against `url` with a clean environment plus `env`.
pub fn tool(url: &str, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut tool = Tool::new(args).database(url);
    for (key, value) in env {
        tool = tool.env(key, value);
    }
    tool.run()
}

/// The host and port of a `postgres://user@host:port/db` URL.
pub fn host_port(url: &str) -> (String, u16) {
    let authority = url
        .split_once("://")
        .unwrap()
        .1
        .split(['/', '?'])
        .next()
        .unwrap();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, rest)| rest);
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "5432"));
    (host.to_owned(), port.parse().unwrap())
}

/// `url` with another user and no password.
pub fn as_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let rest = rest.rsplit_once('@').map_or(rest, |(_, rest)| rest);
    format!("{scheme}://{user}@{rest}")
}

/// `url` pointed at `host:port` instead.
pub fn via(url: &str, host: &str, port: u16) -> String {
    let (original_host, original_port) = host_port(url);
    url.replacen(
        &format!("@{original_host}:{original_port}/"),
        &format!("@{host}:{port}/"),
        1,
    )
}

/// A fresh role name, unique across the tests sharing one server.
pub fn role_name(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..8])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

impl PoolMode {
    fn name(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// Debian's PgBouncer with its default startup-parameter handling (no
/// `ignore_startup_parameters`), on a free loopback port, in front of one server. Stopped when
/// dropped.
pub struct PgBouncer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

pub fn pgbouncer_binary() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.is_file())
        .expect(
            "pgbouncer is not installed: these tests need it (apt-get install -y pgbouncer; \
             .ci/run installs it)",
        )
}

impl PgBouncer {
    /// `users` are the roles that may log in through it (auth_type trust still wants them in the
    /// auth_file).
    pub fn start(server_host: &str, server_port: u16, mode: PoolMode, users: &[&str]) -> PgBouncer {
        let binary = pgbouncer_binary();
        let dir = std::env::temp_dir().join(format!("atb-pgbouncer-{}", Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let port = free_port();
        let auth: String = users
            .iter()
            .map(|user| format!("\"{user}\" \"\"\n"))
            .collect();
        std::fs::write(dir.join("users.txt"), auth).unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n\
                 * = host={server_host} port={server_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {auth_file}\n\
                 pool_mode = {mode}\n\
                 default_pool_size = 10\n\
                 max_client_conn = 100\n",
                auth_file = dir.join("users.txt").display(),
                mode = mode.name(),
            ),
        )
        .unwrap();
        // Like PostgreSQL, PgBouncer refuses to run as root.
        let owner = server_owner().unwrap();
        if let Some((uid, gid)) = owner {
            for path in [
                dir.clone(),
                dir.join("users.txt"),
                dir.join("pgbouncer.ini"),
            ] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut command = Command::new(binary);
        command
            .arg(dir.join("pgbouncer.ini"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        unsafe {
            command.pre_exec(|| {
                // No pooler outlives a killed test.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().expect("start pgbouncer");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut stderr)
                    .unwrap();
                panic!("pgbouncer exited ({status}): {stderr}");
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen in time"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PgBouncer { child, dir, port }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A new, empty database `name` on `server`, and a pool of two connections to it.
pub async fn database_on(
    server: &agent_type_backfill::support::ephemeral::EphemeralPostgres,
    name: &str,
) -> sqlx::PgPool {
    agent_type_backfill::support::seed::create_database(server, name)
        .await
        .unwrap()
}

/// A `registry` database on `server` with `migrations/` applied and `profiles` ordinary profiles
/// seeded beside the named ones.
pub async fn registry_on(
    server: &agent_type_backfill::support::ephemeral::EphemeralPostgres,
    profiles: usize,
) -> sqlx::PgPool {
    let pool = database_on(server, "registry").await;
    agent_type_backfill::support::MIGRATOR
        .run(&pool)
        .await
        .unwrap();
    agent_type_backfill::support::seed::seed_rehearsal(&pool, profiles)
        .await
        .unwrap();
    pool
}
