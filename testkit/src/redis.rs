//! Real Redis deployments for tests, each on its own free loopback ports,
//! without persistence, killed on drop:
//! - [`RedisServer`]: one standalone server; it can be stopped and started
//!   again on the same port, to test what clients do while Redis is away;
//! - [`RedisSentinel`]: a primary, one replica and one Sentinel monitoring them;
//! - [`RedisCluster`]: a Redis Cluster of three primaries and no replicas;
//! - [`RedisTlsServer`]: a standalone server that speaks TLS only, with a
//!   certificate from a CA generated for the test.
//!
//! They need `redis-server` and `redis-cli` (Debian: `redis-server`,
//! `redis-tools`); Sentinel runs as `redis-server --sentinel`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// How long a starting server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a cluster or a replica may take to become usable.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one `redis-cli` call.
const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two polls of a condition.
const POLL: Duration = Duration::from_millis(20);

/// The arguments of one server on a given port (the port may be picked again
/// when it turned out to be taken).
type ArgsFor = Box<dyn Fn(u16) -> anyhow::Result<Vec<String>> + Send + Sync>;

pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    args: ArgsFor,
    /// For a TLS-only server: the CA file `redis-cli` verifies it with.
    tls_ca: Option<PathBuf>,
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers PING.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Box::new(|port| Ok(standalone_args(port))), None)
    }

    /// Starts a server with the arguments `args` gives for a free port.
    fn start_with(args: ArgsFor, tls_ca: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut last_error = None;
        // A port found free may be taken before redis-server binds it; try a few.
        let mut server = Self {
            port: 0,
            child: None,
            args,
            tls_ca,
        };
        for _ in 0..3 {
            server.port = free_port()?;
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// `redis://127.0.0.1:{port}` (`rediss://` for a TLS server)
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Kills the server (like a crash: no shutdown handshake) and waits for it to exit.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing redis-server")?;
            child.wait().context("waiting for redis-server")?;
        }
        Ok(())
    }

    /// Starts a fresh, empty server on the same port (stopping the old one
    /// first if it still runs).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Runs `redis-cli` against this server (over TLS for a TLS server) and
    /// returns what it printed: one line per reply element.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        cli(self.port, self.tls_ca.as_deref(), args)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut child = Command::new("redis-server")
            .args((self.args)(self.port)?)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it installed? apt-get install redis-server)")?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("checking redis-server")? {
                bail!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                );
            }
            let up = match &self.tls_ca {
                None => ping(self.port),
                Some(ca) => cli(self.port, Some(ca), &["PING"]).is_ok_and(|r| r.trim() == "PONG"),
            };
            if up {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "redis-server on port {} did not answer PING within {START_TIMEOUT:?}",
                    self.port
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .field("tls", &self.tls_ca.is_some())
            .finish()
    }
}

/// A primary, one replica of it and one Sentinel monitoring both, under the
/// service name [`RedisSentinel::SERVICE_NAME`] with a quorum of one. The
/// Sentinel declares the primary down after one second without answers.
pub struct RedisSentinel {
    primary: RedisServer,
    replica: RedisServer,
    sentinel: RedisServer,
    _dir: tempfile::TempDir,
}

impl RedisSentinel {
    pub const SERVICE_NAME: &'static str = "mymaster";

    /// Starts the three processes and returns once the replica is in sync
    /// and the Sentinel knows the replica (so it could fail over to it).
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a directory for the servers")?;
        // Replication writes RDB files (a replica saves what it loads): they
        // go to the temporary directory, not to the test's working directory.
        let primary_dir = dir.path().join("primary");
        let replica_dir = dir.path().join("replica");
        for d in [&primary_dir, &replica_dir] {
            std::fs::create_dir(d).context("creating a server directory")?;
        }
        let primary = RedisServer::start_with(
            Box::new(move |port| Ok(with_dir(standalone_args(port), &primary_dir))),
            None,
        )?;
        let primary_port = primary.port();
        let replica = RedisServer::start_with(
            Box::new(move |port| {
                let mut args = with_dir(standalone_args(port), &replica_dir);
                args.extend([
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    primary_port.to_string(),
                ]);
                Ok(args)
            }),
            None,
        )?;
        poll(
            "the replica to sync with the primary",
            SETTLE_TIMEOUT,
            || {
                Ok(replica
                    .cli(&["INFO", "replication"])?
                    .contains("master_link_status:up"))
            },
        )?;
        let conf = dir.path().join("sentinel.conf");
        let dir_path = dir.path().to_owned();
        let sentinel = RedisServer::start_with(
            Box::new(move |port| {
                // Sentinel rewrites its config file, so it gets a fresh one each start.
                let name = Self::SERVICE_NAME;
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\n\
                         bind 127.0.0.1\n\
                         daemonize no\n\
                         dir {dir}\n\
                         sentinel monitor {name} 127.0.0.1 {primary_port} 1\n\
                         sentinel down-after-milliseconds {name} 1000\n\
                         sentinel failover-timeout {name} 10000\n\
                         sentinel parallel-syncs {name} 1\n",
                        dir = dir_path.display(),
                    ),
                )
                .context("writing sentinel.conf")?;
                Ok(vec![conf.display().to_string(), "--sentinel".into()])
            }),
            None,
        )?;
        let replica_port = replica.port().to_string();
        poll(
            "the sentinel to discover the replica",
            SETTLE_TIMEOUT,
            || {
                let replicas = sentinel.cli(&["SENTINEL", "REPLICAS", Self::SERVICE_NAME])?;
                let lines: Vec<&str> = replicas.lines().map(str::trim).collect();
                Ok(lines
                    .windows(2)
                    .any(|w| w == ["port", replica_port.as_str()])
                    && lines.windows(2).any(|w| w == ["flags", "slave"]))
            },
        )?;
        Ok(Self {
            primary,
            replica,
            sentinel,
            _dir: dir,
        })
    }

    /// The Sentinel, as `127.0.0.1:{port}`.
    pub fn sentinel_addr(&self) -> String {
        format!("127.0.0.1:{}", self.sentinel.port())
    }

    /// The server that was the primary at start.
    pub fn primary(&self) -> &RedisServer {
        &self.primary
    }

    /// The server that was the replica at start.
    pub fn replica(&self) -> &RedisServer {
        &self.replica
    }

    /// The port of the primary as the Sentinel names it now.
    pub fn primary_port(&self) -> anyhow::Result<u16> {
        let reply =
            self.sentinel
                .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::SERVICE_NAME])?;
        let mut lines = reply.lines();
        let (Some(_host), Some(port)) = (lines.next(), lines.next()) else {
            bail!("the sentinel knows no primary: {reply:?}");
        };
        port.trim()
            .parse()
            .with_context(|| format!("the sentinel's primary port {port:?}"))
    }

    /// Waits until the replica has every write the primary took so far.
    pub fn wait_for_replication(&self) -> anyhow::Result<()> {
        let acked = self.primary.cli(&["WAIT", "1", "5000"])?;
        ensure!(
            acked.trim() == "1",
            "the replica did not acknowledge: {acked:?}"
        );
        Ok(())
    }

    /// Kills the primary and waits until the Sentinel has promoted the
    /// replica, which then accepts writes.
    pub fn kill_primary_and_fail_over(&mut self) -> anyhow::Result<()> {
        self.primary.stop()?;
        let replica_port = self.replica.port();
        poll(
            "the sentinel to promote the replica",
            SETTLE_TIMEOUT,
            || {
                Ok(self.primary_port()? == replica_port
                    && self.replica.cli(&["ROLE"])?.starts_with("master"))
            },
        )
    }
}

/// A Redis Cluster of three primaries that share the 16384 slots evenly.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts three nodes, joins them with `redis-cli --cluster create` and
    /// returns once every node sees the cluster as ok.
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a directory for nodes.conf")?;
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let dir = dir.path().to_owned();
            nodes.push(RedisServer::start_with(
                Box::new(move |port| {
                    let mut args = standalone_args(port);
                    // The bus would be on port + 10000, which may be taken or
                    // beyond 65535: it gets a free port of its own.
                    let bus = free_port()?;
                    let conf = dir.join(format!("nodes-{port}.conf"));
                    // A node that could not start on a port leaves no config behind.
                    let _ = std::fs::remove_file(&conf);
                    args.extend(
                        [
                            "--cluster-enabled",
                            "yes",
                            "--cluster-port",
                            &bus.to_string(),
                            "--cluster-config-file",
                            &conf.display().to_string(),
                            "--cluster-node-timeout",
                            "5000",
                            "--dir",
                            &dir.display().to_string(),
                        ]
                        .map(String::from),
                    );
                    Ok(args)
                }),
                None,
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = nodes[0].cli(&create)?;
        ensure!(
            output.contains("[OK] All 16384 slots covered"),
            "redis-cli --cluster create failed:\n{output}"
        );
        poll("every node to see the cluster ok", SETTLE_TIMEOUT, || {
            for node in &nodes {
                let info = node.cli(&["CLUSTER", "INFO"])?;
                let ok = [
                    "cluster_state:ok",
                    "cluster_slots_ok:16384",
                    "cluster_known_nodes:3",
                ]
                .iter()
                .all(|line| info.lines().any(|l| l.trim() == *line));
                if !ok {
                    return Ok(false);
                }
            }
            Ok(true)
        })?;
        Ok(Self { nodes, _dir: dir })
    }

    /// The nodes, as `127.0.0.1:{port}`.
    pub fn node_addrs(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect()
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// The hash slot of `key`, as the cluster computes it.
    pub fn key_slot(&self, key: &str) -> anyhow::Result<u16> {
        let reply = self.nodes[0].cli(&["CLUSTER", "KEYSLOT", key])?;
        reply
            .trim()
            .parse()
            .with_context(|| format!("CLUSTER KEYSLOT answered {reply:?}"))
    }
}

/// A standalone server that accepts TLS only (`--port 0`), with a server
/// certificate for `localhost` and `127.0.0.1` issued by a CA made for it.
pub struct RedisTlsServer {
    server: RedisServer,
    ca_file: PathBuf,
    _dir: tempfile::TempDir,
}

impl RedisTlsServer {
    pub fn start() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("creating a directory for certificates")?;
        let files = write_certificates(dir.path())?;
        let ca_file = files.ca.clone();
        let server = RedisServer::start_with(
            Box::new(move |port| {
                Ok([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1 -::1",
                    "--tls-cert-file",
                    &files.cert.display().to_string(),
                    "--tls-key-file",
                    &files.key.display().to_string(),
                    "--tls-ca-cert-file",
                    &files.ca.display().to_string(),
                    "--tls-auth-clients",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                ]
                .map(String::from)
                .to_vec())
            }),
            Some(ca_file.clone()),
        )
        .context("starting redis-server with TLS (was it built with TLS support?)")?;
        Ok(Self {
            server,
            ca_file,
            _dir: dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// `rediss://127.0.0.1:{port}`
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The PEM file of the CA that issued the server's certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn server(&self) -> &RedisServer {
        &self.server
    }
}

struct CertificateFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A CA, and a server certificate it signed for `localhost` and `127.0.0.1`.
fn write_certificates(dir: &Path) -> anyhow::Result<CertificateFiles> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "claude-relay test CA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;

    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    let files = CertificateFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    std::fs::write(&files.ca, ca.pem())?;
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    Ok(files)
}

/// A plain server on `port`: loopback only, nothing written to disk.
fn standalone_args(port: u16) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        // No persistence: every start is empty, and nothing is written to disk.
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
    ]
    .map(String::from)
    .to_vec()
}

/// `args` with the server's working directory (for any file it writes) set to `dir`.
fn with_dir(mut args: Vec<String>, dir: &Path) -> Vec<String> {
    args.extend(["--dir".to_string(), dir.display().to_string()]);
    args
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// Polls `ready` until it says yes; errors of `ready` count as "not yet".
fn poll(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = ready();
        if matches!(last, Ok(true)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what} (last: {last:?})");
        }
        std::thread::sleep(POLL);
    }
}

/// Runs `redis-cli -h 127.0.0.1 -p {port} {args}`, killed after
/// [`CLI_TIMEOUT`]; an error when it fails or prints an error reply.
fn cli(port: u16, tls_ca: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
    let mut command = Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(ca) = tls_ca {
        command.arg("--tls").arg("--cacert").arg(ca);
    }
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting redis-cli (is it installed? apt-get install redis-tools)")?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + CLI_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for redis-cli")? {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        None => bail!("redis-cli {args:?} on port {port}: no answer within {CLI_TIMEOUT:?}"),
        Some(status) if !status.success() => {
            bail!("redis-cli {args:?} on port {port}: {status}: {out}{err}")
        }
        // redis-cli exits 0 on an error reply and prints it as `ERR ...`.
        Some(_) if out.starts_with("ERR ") || out.starts_with("(error)") => {
            bail!("redis-cli {args:?} on port {port}: {out}")
        }
        Some(_) => Ok(out),
    }
}

/// True when the server answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

/// A TCP link to a server (Redis) that holds every byte sent to it for a
/// fixed time, keeping their order; answers come back at once. Each round
/// trip through it takes `delay`, so a test can tell one round trip from
/// several whatever else the machine is doing.
pub struct SlowLink {
    addr: SocketAddr,
    accepting: tokio::task::JoinHandle<()>,
}

impl SlowLink {
    /// Listens on a free loopback port; call inside a Tokio runtime.
    pub async fn start(target: SocketAddr, delay: Duration) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay_slowly(client, target, delay));
            }
        });
        Ok(Self { addr, accepting })
    }

    /// `redis://` at the link.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn relay_slowly(client: tokio::net::TcpStream, target: SocketAddr, delay: Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(target).await else {
        return;
    };
    let _ = (client.set_nodelay(true), server.set_nodelay(true));
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let (held, mut due) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reading = async move {
        let mut buffer = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from_client.read(&mut buffer).await {
            let _ = held.send((tokio::time::Instant::now() + delay, buffer[..n].to_vec()));
        }
    };
    let writing = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to_server.write_all(&bytes).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    };
    let answering = async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    };
    tokio::join!(reading, writing, answering);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_and_restarts_on_the_same_port() {
        let mut server = RedisServer::start().unwrap();
        let port = server.port();
        assert!(ping(port));
        server.stop().unwrap();
        assert!(!ping(port));
        assert!(!server.is_running());
        server.restart().unwrap();
        assert_eq!(server.port(), port);
        assert!(ping(port));
        drop(server);
        assert!(!ping(port), "drop must kill the server");
    }

    #[test]
    fn cli_reports_error_replies() {
        let server = RedisServer::start().unwrap();
        assert_eq!(server.cli(&["SET", "k", "v"]).unwrap().trim(), "OK");
        assert_eq!(server.cli(&["GET", "k"]).unwrap().trim(), "v");
        assert!(server.cli(&["NO-SUCH-COMMAND"]).is_err());
    }

    #[test]
    fn tls_server_speaks_tls_only() {
        let server = RedisTlsServer::start().unwrap();
        assert!(server.url().starts_with("rediss://127.0.0.1:"));
        assert_eq!(server.server().cli(&["PING"]).unwrap().trim(), "PONG");
        // Plain text on the TLS port gets no PONG.
        assert!(!ping(server.port()));
        let port = server.port();
        drop(server);
        assert!(
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
            "drop must kill the server"
        );
    }

    #[test]
    fn sentinel_names_the_primary_and_drop_kills_everything() {
        let setup = RedisSentinel::start().unwrap();
        assert_eq!(setup.primary_port().unwrap(), setup.primary().port());
        assert!(setup.replica().cli(&["ROLE"]).unwrap().starts_with("slave"));
        // What replication writes lands in a temporary directory.
        let cwd = std::env::current_dir().unwrap();
        for server in [setup.primary(), setup.replica()] {
            let dir = server.cli(&["CONFIG", "GET", "dir"]).unwrap();
            let dir = dir
                .lines()
                .nth(1)
                .expect("CONFIG GET answers name and value");
            assert_ne!(Path::new(dir.trim()), cwd);
            assert!(
                Path::new(dir.trim()).starts_with(std::env::temp_dir()),
                "{dir}"
            );
        }
        let ports = [
            setup.primary().port(),
            setup.replica().port(),
            setup.sentinel.port(),
        ];
        assert!(ports.iter().all(|p| ping(*p)));
        drop(setup);
        assert!(ports.iter().all(|p| !ping(*p)), "drop must kill all three");
    }

    #[test]
    fn cluster_spreads_slots_over_three_primaries() {
        let cluster = RedisCluster::start().unwrap();
        assert_eq!(cluster.node_addrs().len(), 3);
        // A hash tag decides the slot alone.
        assert_eq!(
            cluster.key_slot("a:{tag}:1").unwrap(),
            cluster.key_slot("b:{tag}:2").unwrap()
        );
        let shards = cluster.nodes()[1].cli(&["CLUSTER", "NODES"]).unwrap();
        assert_eq!(
            shards.lines().filter(|l| l.contains("master")).count(),
            3,
            "{shards}"
        );
        let ports: Vec<u16> = cluster.nodes().iter().map(RedisServer::port).collect();
        drop(cluster);
        assert!(ports.iter().all(|p| !ping(*p)), "drop must kill every node");
    }
}
