//! libpq's network parameters, which sqlx does not read: `connect_timeout` and TCP keepalives.
//!
//! sqlx opens its sockets itself and offers no hook to set options on them (sqlx-core's
//! `connect_tcp` sets only TCP_NODELAY). Every TCP socket this process opens to the server's
//! port is one of the tool's database connections, so after each connect the tool sets the
//! options on its own sockets to that port, found through `/proc/self/fd` (Linux only; elsewhere
//! keepalives stay at the system's defaults and the client-side deadlines alone bound the wait).

use std::time::Duration;

use anyhow::Result;

use super::deadline::DEFAULT_CONNECT_TIMEOUT;
use crate::error::{Failure, Usage};

/// The URL query parameters read here and hidden from sqlx (which would warn about each).
const LINK_PARAMETERS: [&str; 6] = [
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
];

/// How the tool's TCP connections notice a dead peer, and how long a connect may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LinkSettings {
    pub connect_timeout: Option<Duration>,
    /// `None` with `keepalives=0`.
    pub keepalives: Option<Keepalives>,
}

/// Defaults are the tool's, not the kernel's two hours: a peer gone silent is noticed after
/// idle + interval × count = 60 s of silence on an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalives {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
    /// How long sent data may stay unacknowledged before the kernel drops the connection;
    /// zero leaves the system's default.
    pub user_timeout: Duration,
}

impl Default for Keepalives {
    fn default() -> Self {
        Keepalives {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 3,
            user_timeout: Duration::from_secs(60),
        }
    }
}

impl LinkSettings {
    /// Reads the parameters as libpq does: whole numbers (seconds; milliseconds for
    /// `tcp_user_timeout`); `connect_timeout` of zero or less waits for ever and 1 means 2;
    /// `PGCONNECT_TIMEOUT` when the URL has none.
    pub(crate) fn from_url(url: &str) -> Result<LinkSettings> {
        let mut connect = std::env::var("PGCONNECT_TIMEOUT")
            .ok()
            .filter(|value| !value.is_empty())
            .map(|value| integer("PGCONNECT_TIMEOUT", &value))
            .transpose()?;
        let mut keepalives = Some(Keepalives::default());
        let mut enabled = true;
        for (key, value) in query_pairs(url) {
            match key {
                "connect_timeout" => connect = Some(integer(key, value)?),
                "keepalives" => enabled = integer(key, value)? != 0,
                _ => {}
            }
            let Some(settings) = keepalives.as_mut() else {
                continue;
            };
            match key {
                "keepalives_idle" => settings.idle = seconds(key, value)?,
                "keepalives_interval" => settings.interval = seconds(key, value)?,
                "keepalives_count" => {
                    settings.count = u32::try_from(integer(key, value)?.max(0)).unwrap_or(u32::MAX)
                }
                "tcp_user_timeout" => {
                    settings.user_timeout =
                        Duration::from_millis(u64::try_from(integer(key, value)?).unwrap_or(0))
                }
                _ => {}
            }
        }
        if !enabled {
            keepalives = None;
        }
        let connect_timeout = match connect {
            None => Some(DEFAULT_CONNECT_TIMEOUT),
            Some(seconds) if seconds <= 0 => None,
            Some(seconds) => Some(Duration::from_secs(
                u64::try_from(seconds.max(2)).unwrap_or(u64::MAX),
            )),
        };
        Ok(LinkSettings {
            connect_timeout,
            keepalives,
        })
    }

    /// Sets the keepalive options on every TCP socket of this process connected to `port`.
    pub(crate) fn apply_to_sockets(&self, port: u16) {
        let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
            tracing::debug!("no /proc/self/fd: TCP keepalives stay at the system's defaults");
            return;
        };
        for entry in entries.flatten() {
            let Some(fd) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<libc::c_int>().ok())
            else {
                continue;
            };
            if peer_port(fd) != Some(port) {
                continue;
            }
            if let Err(error) = self.apply(fd) {
                tracing::warn!("could not set TCP keepalives on a database connection: {error}");
            }
        }
    }

    fn apply(&self, fd: libc::c_int) -> std::io::Result<()> {
        let Some(keepalives) = self.keepalives else {
            return set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 0);
        };
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPIDLE,
            whole_seconds(keepalives.idle),
        )?;
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            whole_seconds(keepalives.interval),
        )?;
        let count = libc::c_int::try_from(keepalives.count).unwrap_or(libc::c_int::MAX);
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, count)?;
        if !keepalives.user_timeout.is_zero() {
            let millis = libc::c_int::try_from(keepalives.user_timeout.as_millis())
                .unwrap_or(libc::c_int::MAX);
            set(fd, libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, millis)?;
        }
        Ok(())
    }
}

/// The URL without the parameters read here, for sqlx to parse.
pub(crate) fn without_link_parameters(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
            !LINK_PARAMETERS.contains(&key)
        })
        .collect();
    if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    }
}

fn query_pairs(url: &str) -> impl Iterator<Item = (&str, &str)> {
    url.split_once('?')
        .map(|(_, query)| query.split('&'))
        .into_iter()
        .flatten()
        .filter_map(|pair| pair.split_once('='))
}

fn integer(key: &str, value: &str) -> Result<i64> {
    value.trim().parse::<i64>().map_err(|_| {
        Failure::Usage(Usage::ConnectOption {
            key: key.to_owned(),
            value: value.to_owned(),
        })
        .into()
    })
}

fn seconds(key: &str, value: &str) -> Result<Duration> {
    Ok(Duration::from_secs(
        u64::try_from(integer(key, value)?).unwrap_or(0),
    ))
}

fn whole_seconds(duration: Duration) -> libc::c_int {
    // The kernel refuses 0; libpq passes the operator's value on, and 1 s is its nearest.
    libc::c_int::try_from(duration.as_secs().max(1)).unwrap_or(libc::c_int::MAX)
}

fn set(
    fd: libc::c_int,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    let length = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>())
        .expect("an int's size fits socklen_t");
    // SAFETY: `value` outlives the call and `length` is its size.
    let done =
        unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(&value).cast(), length) };
    if done == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The remote port of `fd` when it is a connected TCP socket (IPv4 or IPv6).
fn peer_port(fd: libc::c_int) -> Option<u16> {
    // SAFETY: an all-zero sockaddr_storage is valid, and the kernel writes at most `length`.
    let mut address: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut length =
        libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_storage>()).ok()?;
    let done =
        unsafe { libc::getpeername(fd, std::ptr::from_mut(&mut address).cast(), &mut length) };
    if done != 0 {
        return None;
    }
    let mut kind: libc::c_int = 0;
    let mut kind_length = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
    // SAFETY: as above, for an int.
    let done = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            std::ptr::from_mut(&mut kind).cast(),
            &mut kind_length,
        )
    };
    if done != 0 || kind != libc::SOCK_STREAM {
        return None;
    }
    match libc::c_int::from(address.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let inet: libc::sockaddr_in = unsafe {
                std::ptr::from_ref(&address)
                    .cast::<libc::sockaddr_in>()
                    .read()
            };
            Some(u16::from_be(inet.sin_port))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let inet: libc::sockaddr_in6 = unsafe {
                std::ptr::from_ref(&address)
                    .cast::<libc::sockaddr_in6>()
                    .read()
            };
            Some(u16::from_be(inet.sin6_port))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_parameters_are_read_as_libpq_reads_them_and_hidden_from_sqlx() {
        let url = "postgres://u@db/x?sslmode=require&connect_timeout=1&keepalives_idle=7\
                   &keepalives_interval=3&keepalives_count=4&tcp_user_timeout=9000";
        let link = LinkSettings::from_url(url).unwrap();
        assert_eq!(
            link.connect_timeout,
            Some(Duration::from_secs(2)),
            "1 means 2"
        );
        assert_eq!(
            link.keepalives,
            Some(Keepalives {
                idle: Duration::from_secs(7),
                interval: Duration::from_secs(3),
                count: 4,
                user_timeout: Duration::from_millis(9000),
            })
        );
        assert_eq!(
            without_link_parameters(url),
            "postgres://u@db/x?sslmode=require"
        );
        assert_eq!(
            without_link_parameters("postgres://u@db/x?connect_timeout=3"),
            "postgres://u@db/x"
        );
        let off = LinkSettings::from_url("postgres://db/x?keepalives=0&connect_timeout=0").unwrap();
        assert_eq!(off.keepalives, None);
        assert_eq!(off.connect_timeout, None, "0 waits for ever, as in libpq");
        let plain = LinkSettings::from_url("postgres://db/x").unwrap();
        assert_eq!(plain.keepalives, Some(Keepalives::default()));
        assert_eq!(plain.connect_timeout, Some(DEFAULT_CONNECT_TIMEOUT));
        assert!(LinkSettings::from_url("postgres://db/x?connect_timeout=soon").is_err());
    }
}
