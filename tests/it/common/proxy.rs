//! A fault proxy: a small TCP proxy on 127.0.0.1 between a client (the tool, or PgBouncer) and a
//! server that forwards bytes until told, or until the client sends a chosen statement, and then
//! freezes the link (stops forwarding and keeps both sockets open, as a hung pooler, a dead NAT
//! entry or a stalled VPN does), slows it, drops it (FIN) or resets it (RST).
//!
//! Moments are conditions, not times: "after the client's first message containing `FOR
//! UPDATE` has been forwarded", so a test waits for what it means, however loaded the machine.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the link does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Forward,
    /// Nothing is forwarded either way; the sockets stay open.
    Freeze,
    /// Every chunk waits this long before it is forwarded.
    Slow(Duration),
    /// Both sockets are closed (FIN).
    Drop,
    /// Both sockets are reset (RST).
    Reset,
}

struct Trigger {
    pattern: Vec<u8>,
    /// Matching chunks still to let through before the fault.
    skip: usize,
    fault: Fault,
}

struct Shared {
    trigger: Mutex<Option<Trigger>>,
    /// Client bytes replaced, same length for same length, as a pooler that rewrites
    /// statements would.
    rewrite: Mutex<Option<(Vec<u8>, Vec<u8>)>>,
    /// When the current fault began.
    since: Mutex<Option<Instant>>,
    fault: watch::Sender<Fault>,
}

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
    accepting: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy in front of the server `url` points at (`url_for` then routes a URL through it).
    pub async fn to(url: &str) -> Proxy {
        let (host, port) = super::deployment::host_port(url);
        Proxy::start(&host, port).await
    }

    /// Starts forwarding 127.0.0.1:`port` to `server_host`:`server_port`.
    pub async fn start(server_host: &str, server_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            trigger: Mutex::new(None),
            rewrite: Mutex::new(None),
            since: Mutex::new(None),
            fault: watch::channel(Fault::Forward).0,
        });
        let server = format!("{server_host}:{server_port}");
        let accepting = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(pipe(client, server.clone(), shared.clone()));
                }
            }
        });
        Proxy {
            port,
            shared,
            accepting,
        }
    }

    /// A URL like `url` that goes through the proxy.
    pub fn url_for(&self, url: &str) -> String {
        crate::common::deployment::via(url, "127.0.0.1", self.port)
    }

    /// The link does `fault` from now on, on every connection, open or new.
    pub fn set(&self, fault: Fault) {
        *self.shared.since.lock().unwrap() = (fault != Fault::Forward).then(Instant::now);
        self.shared.fault.send_replace(fault);
    }

    /// The link does `fault` once the client's `skip + 1`-th chunk containing `pattern` has been
    /// forwarded: the server gets that statement, its answer is what the fault takes.
    pub fn after(&self, pattern: &str, skip: usize, fault: Fault) {
        *self.shared.trigger.lock().unwrap() = Some(Trigger {
            pattern: pattern.as_bytes().to_vec(),
            skip,
            fault,
        });
    }

    /// Replaces `from` with `to` (of the same length: the protocol's lengths stay right) in
    /// everything the client sends.
    pub fn rewrite(&self, from: &str, to: &str) {
        assert_eq!(from.len(), to.len(), "a rewrite keeps the message length");
        *self.shared.rewrite.lock().unwrap() =
            Some((from.as_bytes().to_vec(), to.as_bytes().to_vec()));
    }

    /// When the fault in force began, if one is.
    pub fn faulted_at(&self) -> Option<Instant> {
        *self.shared.since.lock().unwrap()
    }

    /// Waits until a fault is in force.
    pub async fn faulted(&self) -> Instant {
        let mut fault = self.shared.fault.subscribe();
        fault
            .wait_for(|fault| *fault != Fault::Forward)
            .await
            .unwrap();
        self.faulted_at().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accepting.abort();
        // Open links end with the proxy.
        self.shared.fault.send_replace(Fault::Drop);
    }
}

/// Whether `chunk` from the client arms the fault.
fn fires(shared: &Shared, chunk: &[u8]) -> Option<Fault> {
    let mut trigger = shared.trigger.lock().unwrap();
    let armed = trigger.as_mut()?;
    if !chunk
        .windows(armed.pattern.len())
        .any(|window| window == armed.pattern.as_slice())
    {
        return None;
    }
    if armed.skip > 0 {
        armed.skip -= 1;
        return None;
    }
    trigger.take().map(|trigger| trigger.fault)
}

fn rewritten(shared: &Shared, chunk: &mut [u8]) {
    let rewrite = shared.rewrite.lock().unwrap();
    let Some((from, to)) = rewrite.as_ref() else {
        return;
    };
    let mut at = 0;
    while at + from.len() <= chunk.len() {
        if chunk[at..at + from.len()] == from[..] {
            chunk[at..at + from.len()].copy_from_slice(to);
            at += from.len();
        } else {
            at += 1;
        }
    }
}

async fn pipe(mut client: TcpStream, server: String, shared: Arc<Shared>) {
    let mut fault = shared.fault.subscribe();
    // A link frozen before the connection came is frozen before the server hears of it.
    while *fault.borrow_and_update() == Fault::Freeze {
        if fault.changed().await.is_err() {
            return;
        }
    }
    let Ok(mut upstream) = TcpStream::connect(&server).await else {
        return;
    };
    let (mut from_client, mut from_server) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
    loop {
        let current = *fault.borrow_and_update();
        match current {
            Fault::Drop => return,
            Fault::Reset => {
                #[allow(deprecated)]
                let _ = (
                    client.set_linger(Some(Duration::ZERO)),
                    upstream.set_linger(Some(Duration::ZERO)),
                );
                return;
            }
            Fault::Freeze => {
                if fault.changed().await.is_err() {
                    return;
                }
                continue;
            }
            Fault::Forward | Fault::Slow(_) => {}
        }
        let delay = match current {
            Fault::Slow(delay) => delay,
            _ => Duration::ZERO,
        };
        tokio::select! {
            read = client.read(&mut from_client) => {
                let Ok(n @ 1..) = read else { return };
                tokio::time::sleep(delay).await;
                rewritten(&shared, &mut from_client[..n]);
                if upstream.write_all(&from_client[..n]).await.is_err() {
                    return;
                }
                if let Some(next) = fires(&shared, &from_client[..n]) {
                    *shared.since.lock().unwrap() = Some(Instant::now());
                    shared.fault.send_replace(next);
                }
            }
            read = upstream.read(&mut from_server) => {
                let Ok(n @ 1..) = read else { return };
                tokio::time::sleep(delay).await;
                if client.write_all(&from_server[..n]).await.is_err() {
                    return;
                }
            }
            changed = fault.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}
