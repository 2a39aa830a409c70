//! Runs the real `claude-relay-proxy` binary as a child process, the way a
//! user or a Deployment does, on free loopback ports that the proxy picks
//! itself (port 0) and reports in its ready file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Two free loopback addresses. Found free, then released: another process
/// may take one before it is bound, so a server that can bind port 0
/// should ([`ANY_PORT`]).
pub fn free_addresses() -> (SocketAddr, SocketAddr) {
    let addr = || format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (addr(), addr())
}

/// An address that asks the kernel for a free port when bound.
pub const ANY_PORT: &str = "127.0.0.1:0";

fn with_addresses(config: &str, api: &str, admin: &str) -> String {
    config.replace("{listen}", api).replace("{admin}", admin)
}

/// The API and admin addresses a proxy wrote to its `--ready-file`; `None`
/// until it has.
pub fn read_ready_file(path: &Path) -> Option<(SocketAddr, SocketAddr)> {
    let text = std::fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let address = |name: &str| json[name].as_str()?.parse().ok();
    Some((address("api")?, address("admin")?))
}

pub struct ProxyProcess {
    pub api: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl ProxyProcess {
    /// Writes `config` (with `{listen}` and `{admin}` replaced by
    /// `127.0.0.1:0`: the proxy binds free ports itself, so no other process
    /// can take them between a pick and the bind) to a temporary file,
    /// starts the binary on it, reads the addresses it bound from its
    /// `--ready-file`, and waits until `/readyz` answers 200.
    pub fn start(binary: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, with_addresses(config, ANY_PORT, ANY_PORT)).unwrap();
        let path = config_path.clone();
        let args = ["--config".as_ref(), path.as_os_str()];
        Self::launch(binary, &args, env, dir, config_path)
            .unwrap_or_else(|log| panic!("proxy exited before ready:\n{log}"))
    }

    /// Starts the binary with `args` instead of `--config FILE`, for a config
    /// from elsewhere (`--config-map`), and waits until `/readyz` answers
    /// 200. The addresses are those the proxy reports having bound (give
    /// port 0 in the config, `--listen` or `--admin-listen` for free ports).
    /// [`Self::rewrite_config`] does not apply.
    pub fn start_with_args(binary: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_with_args_in(binary, args, env, &std::env::temp_dir())
    }

    /// [`Self::start_with_args`], with the process's own files (its log and
    /// ready file) in a new directory under `parent`: for a process that
    /// does not see the host's temporary directory (a pod whose `/tmp` is
    /// an emptyDir).
    pub fn start_with_args_in(
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        parent: &Path,
    ) -> Self {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let config_path = dir.path().join("config.yaml");
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        Self::launch(binary, &args, env, dir, config_path)
            .unwrap_or_else(|log| panic!("proxy exited before ready:\n{log}"))
    }

    /// Starts the binary, learns its addresses from its ready file and
    /// waits until `/readyz` answers 200; `Err` with its log when it exits
    /// before.
    fn launch(
        binary: &Path,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
        dir: tempfile::TempDir,
        config_path: PathBuf,
    ) -> Result<Self, String> {
        let log_path = dir.path().join("proxy.log");
        let ready_path = dir.path().join("ready.json");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .env("CLAUDE_RELAY_READY_FILE", &ready_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start claude-relay-proxy");
        let unknown = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut process = Self {
            api: unknown,
            admin: unknown,
            config_path,
            log_path,
            child: Some(child),
            _dir: dir,
        };
        if process.wait_ready(&ready_path, Duration::from_secs(20)) {
            Ok(process)
        } else {
            Err(process.log())
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.api)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The Prometheus text of the admin port.
    pub async fn metrics(&self) -> String {
        let answer = crate::http::send(
            &crate::http::client(),
            crate::http::request(http::Method::GET, &self.admin_url("/metrics"), &[], ""),
        )
        .await;
        String::from_utf8_lossy(&answer.body).into_owned()
    }

    /// The value of the first metric line that starts with `line_start`.
    pub async fn metric(&self, line_start: &str) -> Option<f64> {
        self.metrics()
            .await
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Replaces the config file the way a config management tool does:
    /// write aside, then rename over. `{listen}` and `{admin}` read as at
    /// the start, so the listen addresses do not change.
    pub fn rewrite_config(&self, config: &str) {
        let text = with_addresses(config, ANY_PORT, ANY_PORT);
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Whether the proxy reported its addresses and `/readyz` answered 200;
    /// `false` when the process exited first.
    fn wait_ready(&mut self, ready_file: &Path, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut reported = false;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("proxy exited with {status} before ready");
                return false;
            }
            if !reported && let Some((api, admin)) = read_ready_file(ready_file) {
                (self.api, self.admin, reported) = (api, admin, true);
            }
            if reported && crate::http::blocking_get_status(self.admin, "/readyz") == Some(200) {
                return true;
            }
            if Instant::now() > deadline {
                panic!("proxy not ready within {within:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }

    /// Waits for the process to exit; its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
