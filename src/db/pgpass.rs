//! The password file, read as libpq reads it (`passwordFromFile` in libpq's fe-connect.c): the
//! first line whose host, port, database and user fields each equal the connection's or are `*`
//! wins; `\` escapes the next character in every field, the password included; a file with any
//! group or world permission is ignored with a warning.

use std::path::PathBuf;

use sqlx::postgres::PgConnectOptions;

/// libpq's compiled-in socket directory on Debian; a connection through it matches
/// `localhost` lines.
const DEFAULT_SOCKET_DIRECTORY: &str = "/var/run/postgresql";

/// `PGPASSFILE`, or `~/.pgpass`. libpq never falls back from one to the other.
pub fn file() -> Option<PathBuf> {
    match std::env::var_os("PGPASSFILE") {
        Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
        _ => home().map(|home| home.join(".pgpass")),
    }
}

fn home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
        return Some(PathBuf::from(home));
    }
    // No HOME: the account's home directory, as libpq falls back to.
    let entry = unsafe { libc::getpwuid(libc::geteuid()) };
    if entry.is_null() {
        return None;
    }
    let directory = unsafe { std::ffi::CStr::from_ptr((*entry).pw_dir) };
    Some(PathBuf::from(directory.to_string_lossy().into_owned()))
}

/// The host a line must name: a socket in the default directory (or no host) is `localhost`.
pub(crate) fn host_key(options: &PgConnectOptions) -> String {
    let host = super::connect::address(options).host;
    if host.is_empty() || host.trim_end_matches('/') == DEFAULT_SOCKET_DIRECTORY {
        "localhost".to_owned()
    } else {
        host
    }
}

/// The database a line must name: without one in the URL, the server uses the user's name.
pub(crate) fn database_key(options: &PgConnectOptions) -> String {
    options
        .get_database()
        .unwrap_or(options.get_username())
        .to_owned()
}

pub(crate) fn password_for(options: &PgConnectOptions) -> Option<String> {
    let path = file()?;
    let text = read_private(&path)?;
    find(
        &text,
        &host_key(options),
        &options.get_port().to_string(),
        &database_key(options),
        options.get_username(),
    )
}

fn read_private(path: &std::path::Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).ok()?;
    if !metadata.is_file() {
        tracing::warn!("password file '{}' is not a plain file", path.display());
        return None;
    }
    if metadata.permissions().mode() & 0o077 != 0 {
        // The file is consulted again to explain a refused login; libpq warns once.
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "password file '{}' has group or world access; permissions should be u=rw \
                 (0600) or less: ignoring it",
                path.display()
            );
        });
        return None;
    }
    match std::fs::read(path) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(error) => {
            tracing::warn!("could not read password file '{}': {error}", path.display());
            None
        }
    }
}

pub(super) fn find(
    text: &str,
    host: &str,
    port: &str,
    database: &str,
    user: &str,
) -> Option<String> {
    text.lines()
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .find_map(|line| {
            let rest = field_matches(line, host)?;
            let rest = field_matches(rest, port)?;
            let rest = field_matches(rest, database)?;
            let rest = field_matches(rest, user)?;
            Some(unescape_password(rest))
        })
}

/// libpq's `pwdfMatchesString`: the field up to the next unescaped `:` equals `token` once
/// unescaped, or is exactly `*`. Returns what follows the `:`.
fn field_matches<'a>(line: &'a str, token: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut wanted = token.chars();
    let mut chars = line.char_indices();
    while let Some((_, c)) = chars.next() {
        let (c, escaped) = if c == '\\' {
            match chars.next() {
                Some((_, next)) => (next, true),
                None => return None,
            }
        } else {
            (c, false)
        };
        if c == ':' && !escaped {
            return match wanted.next() {
                None => Some(&line[line.len() - chars.as_str().len()..]),
                Some(_) => None,
            };
        }
        if wanted.next() != Some(c) {
            return None;
        }
    }
    None
}

/// The password runs to the first unescaped `:` or the end of the line.
fn unescape_password(field: &str) -> String {
    let mut password = String::new();
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        match c {
            ':' => break,
            '\\' => match chars.next() {
                Some(next) => password.push(next),
                None => password.push('\\'),
            },
            other => password.push(other),
        }
    }
    password
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as libpq's `passwordFromFile` reads them: escapes in every field, `*` only as a
    /// whole field, comments, CRLF, the first match, and the password ending at an unescaped `:`.
    #[test]
    fn password_file_lines_match_and_unescape_as_in_libpq() {
        let find_in = |text: &str| find(text, "db", "5432", "registry", "backfill");
        assert_eq!(
            find_in("db:5432:registry:backfill:se\\:cr\\\\et\n").as_deref(),
            Some("se:cr\\et")
        );
        assert_eq!(find_in("*:*:*:*:any").as_deref(), Some("any"));
        assert_eq!(
            find_in("# db:5432:registry:backfill:no\n*:5432:*:backfill:yes\r\n").as_deref(),
            Some("yes")
        );
        assert_eq!(
            find_in("*:*:*:backfill:first\ndb:5432:registry:backfill:second").as_deref(),
            Some("first")
        );
        assert_eq!(
            find_in("d*:5432:registry:backfill:x"),
            None,
            "no partial wildcards"
        );
        assert_eq!(find_in("db:5432:registry:backfil:x"), None);
        assert_eq!(find_in("db:5432:registry:backfill2:x"), None);
        assert_eq!(
            find_in("db:5432:registry:backfill"),
            None,
            "no password field"
        );
        assert_eq!(
            find_in("db:5432:registry:backfill:a:b").as_deref(),
            Some("a")
        );
        assert_eq!(find_in("db:5432:registry:backfill:*").as_deref(), Some("*"));
        assert_eq!(
            find_in("db:5432:registry:backfill:trailing\\").as_deref(),
            Some("trailing\\")
        );
        assert_eq!(
            find(
                "\\/run\\:pg:5432:registry:backfill:s",
                "/run:pg",
                "5432",
                "registry",
                "backfill"
            )
            .as_deref(),
            Some("s"),
            "an escaped socket directory"
        );
    }
}
