//! Runs the real `claude-relay-proxy` binary as a child process, the way a
//! user or a Deployment does, on free loopback ports.

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

/// Free loopback addresses for the API and admin listeners.
pub fn free_addresses() -> (SocketAddr, SocketAddr) {
    let addr = || format!("127.0.0.1:{}", free_port()).parse().unwrap();
    (addr(), addr())
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
    /// Writes `config` (with `{listen}` and `{admin}` replaced by free
    /// addresses) to a temporary file, starts the binary on it, and waits
    /// until `/readyz` answers 200.
    pub fn start(binary: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        // A port found free may be taken by a test running alongside before
        // the proxy binds it: then it starts again, on other ports.
        let mut attempts = 3;
        loop {
            let dir = tempfile::tempdir().unwrap();
            let (api, admin) = free_addresses();
            let config_path = dir.path().join("config.yaml");
            std::fs::write(
                &config_path,
                config
                    .replace("{listen}", &api.to_string())
                    .replace("{admin}", &admin.to_string()),
            )
            .unwrap();
            let path = config_path.clone();
            let args = ["--config".as_ref(), path.as_os_str()];
            match Self::launch(binary, &args, env, api, admin, dir, config_path) {
                Ok(process) => return process,
                Err(log) if attempts > 1 && log.contains("Address already in use") => {
                    attempts -= 1;
                }
                Err(log) => panic!("proxy exited before ready:\n{log}"),
            }
        }
    }

    /// Starts the binary with `args` instead of `--config FILE`, for a config
    /// from elsewhere (`--config-map`) that listens on `api` and `admin`
    /// (see [`free_addresses`]), and waits until `/readyz` answers 200.
    /// [`Self::rewrite_config`] does not apply.
    pub fn start_with_args(
        binary: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        api: SocketAddr,
        admin: SocketAddr,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("config.yaml");
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        Self::launch(binary, &args, env, api, admin, dir, config_path)
            .unwrap_or_else(|log| panic!("proxy exited before ready:\n{log}"))
    }

    /// Starts the binary and waits until `/readyz` answers 200; `Err` with
    /// its log when it exits before.
    fn launch(
        binary: &Path,
        args: &[&std::ffi::OsStr],
        env: &[(&str, &str)],
        api: SocketAddr,
        admin: SocketAddr,
        dir: tempfile::TempDir,
        config_path: PathBuf,
    ) -> Result<Self, String> {
        let log_path = dir.path().join("proxy.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = Command::new(binary);
        command
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().expect("start claude-relay-proxy");
        let mut process = Self {
            api,
            admin,
            config_path,
            log_path,
            child: Some(child),
            _dir: dir,
        };
        if process.wait_ready(Duration::from_secs(20)) {
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
    /// write aside, then rename over.
    pub fn rewrite_config(&self, config: &str) {
        let text = config
            .replace("{listen}", &self.api.to_string())
            .replace("{admin}", &self.admin.to_string());
        let tmp = self.config_path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Whether `/readyz` answered 200; `false` when the process exited first.
    fn wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("proxy exited with {status} before ready");
                return false;
            }
            if crate::http::blocking_get_status(self.admin, "/readyz") == Some(200) {
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
