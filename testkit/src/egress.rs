//! A real HTTP CONNECT proxy for tests of egress proxies: Debian's
//! `tinyproxy` (package `tinyproxy`), started in the foreground on a free
//! loopback port with a generated config, killed on drop.
//!
//! Its log (connection level) shows the CONNECT targets it was asked for;
//! with an outgoing address set, the upstream sees the proxy's address as
//! the peer, so a test can tell tunnelled connections from direct ones.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::proxy::free_port;

/// How long tinyproxy may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy demands and where it leaves from.
#[derive(Clone, Debug, Default)]
pub struct TinyProxyOptions {
    /// `BasicAuth user password`: CONNECT without them is answered 407.
    pub basic_auth: Option<(String, String)>,
    /// The local address of its outgoing connections (any 127.0.0.0/8
    /// address works on Linux loopback).
    pub outgoing: Option<IpAddr>,
}

pub struct TinyProxy {
    pub addr: SocketAddr,
    child: Child,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TinyProxy {
    /// An open proxy (no credentials asked).
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(TinyProxyOptions::default())
    }

    pub fn start_with(options: TinyProxyOptions) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        // No `ConnectPort` line: CONNECT is allowed to any port (the
        // upstream doubles listen on random ones).
        let mut config = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 200\nLogLevel Connect\n"
        );
        if let Some((user, password)) = &options.basic_auth {
            config.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        if let Some(outgoing) = options.outgoing {
            config.push_str(&format!("Bind {outgoing}\n"));
        }
        let config_path = dir.path().join("tinyproxy.conf");
        std::fs::write(&config_path, config)?;
        let log_path = dir.path().join("tinyproxy.log");
        let log = std::fs::File::create(&log_path)?;
        let child = Command::new("tinyproxy")
            // In the foreground, logging to stderr.
            .arg("-d")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context(
                "starting tinyproxy (is it installed? scripts/install-test-deps.sh installs it)",
            )?;
        let mut proxy = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            log_path,
            _dir: dir,
        };
        proxy.wait_listening()?;
        Ok(proxy)
    }

    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("tinyproxy exited ({status}):\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "tinyproxy did not listen within {START_TIMEOUT:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://127.0.0.1:PORT`, the form an egress proxy URL takes.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything tinyproxy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The `host:port` of every CONNECT it was asked for, in order (the
    /// refused ones too).
    pub fn connect_targets(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|line| {
                let (_, request) = line.split_once("): CONNECT ")?;
                request.split_whitespace().next().map(str::to_owned)
            })
            .collect()
    }
}
