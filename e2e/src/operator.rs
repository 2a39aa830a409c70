//! The operator binary as a process, started as its Deployment in the Helm
//! chart starts it, against the test's Kubernetes API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use claude_relay_testkit::http::blocking_get_status;
use claude_relay_testkit::proxy::free_addresses;

/// A binary of the workspace: beside the test binary's `deps` directory,
/// where `cargo test --workspace` builds them (the packages' own
/// integration tests need them), or in `E2E_BIN_DIR`.
pub fn binary(name: &str) -> PathBuf {
    let dir = match std::env::var_os("E2E_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()
            .expect("the test binary's path")
            .ancestors()
            .nth(2)
            .expect("target/<profile>")
            .to_path_buf(),
    };
    let path = dir.join(name);
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!(
            "{} is missing: build it first (`cargo build -p claude-relay-proxy -p claude-relay-operator`; `cargo test --workspace` does)",
            path.display()
        )
    });
    // `cargo test -p claude-relay-e2e` alone does not rebuild the binaries:
    // refuse to test an old build of changed sources.
    let package = name.trim_start_matches("claude-relay-");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for sources in [root.join(package).join("src"), root.join("crds/src")] {
        if let Some(newer) = newest_file(&sources).filter(|(t, _)| *t > built) {
            panic!(
                "{} is older than {}: rebuild it (`cargo build -p claude-relay-{package}`) or run `cargo test --workspace`",
                path.display(),
                newer.1.display()
            );
        }
    }
    path
}

fn newest_file(dir: &Path) -> Option<(std::time::SystemTime, PathBuf)> {
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let candidate = if path.is_dir() {
            newest_file(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (t, path))
        };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

pub struct OperatorProcess {
    pub admin: std::net::SocketAddr,
    pub identity: String,
    log_path: PathBuf,
    child: Option<Child>,
}

impl OperatorProcess {
    /// Starts the operator with `KUBECONFIG`, its Lease in `namespace`,
    /// refreshing status every `status_refresh`; waits until `/readyz`
    /// answers (the CRDs are found). The admin port is picked free; should
    /// another process take it before the operator binds it (the operator
    /// then stops at once), it starts again on another.
    pub fn start(
        kubeconfig: &Path,
        namespace: &str,
        watch_namespace: Option<&str>,
        identity: &str,
        status_refresh: Duration,
        dir: &Path,
    ) -> Self {
        Self::start_with_env(
            kubeconfig,
            namespace,
            watch_namespace,
            identity,
            status_refresh,
            dir,
            &[],
        )
    }

    /// [`Self::start`] with more environment variables (`LEASE_NAME`, ...).
    pub fn start_with_env(
        kubeconfig: &Path,
        namespace: &str,
        watch_namespace: Option<&str>,
        identity: &str,
        status_refresh: Duration,
        dir: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let mut attempts = 3;
        loop {
            let (_, admin) = free_addresses();
            let log_path = dir.join(format!("{identity}.log"));
            let log = std::fs::File::create(&log_path).expect("operator log file");
            let mut command = Command::new(binary("claude-relay-operator"));
            command
                .env("KUBECONFIG", kubeconfig)
                .env("ADMIN_LISTEN", admin.to_string())
                .env("POD_NAMESPACE", namespace)
                .env("POD_NAME", identity)
                .env(
                    "STATUS_REFRESH",
                    format!("{}ms", status_refresh.as_millis()),
                )
                .env("RUST_LOG", "info,kube=warn")
                .stdout(log.try_clone().expect("log file"))
                .stderr(log)
                .stdin(Stdio::null());
            if let Some(ns) = watch_namespace {
                command.env("WATCH_NAMESPACE", ns);
            }
            command.envs(env.iter().copied());
            let child = command.spawn().expect("start claude-relay-operator");
            let mut process = Self {
                admin,
                identity: identity.into(),
                log_path,
                child: Some(child),
            };
            match process.wait_ready(Duration::from_secs(30)) {
                Ok(()) => return process,
                Err(log) if attempts > 1 && log.contains("Address already in use") => {
                    attempts -= 1;
                }
                Err(log) => panic!("the operator exited before ready:\n{log}"),
            }
        }
    }

    /// `Err` with the log when the process exits before `/readyz` answers.
    fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .is_some()
            {
                return Err(self.log());
            }
            // Its own listener, not another process's on the same port:
            // the operator logs it once bound.
            if self.log().contains("admin listener")
                && blocking_get_status(self.admin, "/readyz") == Some(200)
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "the operator was not ready within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory of the process in bytes (Linux `/proc`), while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The value of the first metric line that starts with `line_start`.
    pub async fn metric(&self, line_start: &str) -> Option<f64> {
        let answer = claude_relay_testkit::http::send(
            &claude_relay_testkit::http::client(),
            claude_relay_testkit::http::request(
                http::Method::GET,
                &format!("http://{}/metrics", self.admin),
                &[],
                "",
            ),
        )
        .await;
        String::from_utf8_lossy(&answer.body)
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    /// SIGTERM, then waits for the exit (the Lease is released on the way out).
    pub fn stop(&mut self, within: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
