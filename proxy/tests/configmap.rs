//! `--config-map`: the proxy, run as a real process with `KUBECONFIG`
//! pointing at a double of the Kubernetes API, follows its ConfigMap through
//! list and watch, keeps the config in force on bad versions, deletion and
//! watch errors, and refuses to start without its ConfigMap.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use claude_relay_testkit::http::{self as th, request, send};
use claude_relay_testkit::proxy::{ProxyProcess, free_addresses};
use claude_relay_testkit::upstream::MockUpstream;
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const NAMESPACE: &str = "team-a";
const NAME: &str = "main-config";
const MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

// ---------------------------------------------------------------------------
// A double of the Kubernetes API: ConfigMaps of one namespace, list and watch.
// Like RBAC with `resourceNames`, it refuses any list or watch without the
// field selector `metadata.name=main-config`.

type Body = UnsyncBoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Objects {
    resource_version: u64,
    current: Option<Value>,
    /// Every change, as watch events: (resourceVersion, type, object).
    history: Vec<(u64, &'static str, Value)>,
    forbidden: bool,
    /// The next this many watch requests answer 500.
    failing_watches: usize,
    /// Every request's path and decoded query.
    requests: Vec<String>,
}

struct ApiState {
    objects: Mutex<Objects>,
    /// Bumped on every change; `u64::MAX` ends the watches in progress.
    changed: watch::Sender<u64>,
}

struct KubeApi {
    state: Arc<ApiState>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    kubeconfig: String,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeApi {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(ApiState {
            objects: Mutex::new(Objects {
                resource_version: 100,
                ..Objects::default()
            }),
            changed: watch::channel(0).0,
        });
        let task = tokio::spawn(serve(listener, state.clone()));
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                r#"apiVersion: v1
kind: Config
clusters:
  - name: double
    cluster: {{server: "http://{addr}"}}
users:
  - name: proxy
    user: {{token: test-token}}
contexts:
  - name: double
    context: {{cluster: double, user: proxy, namespace: elsewhere}}
current-context: double
"#
            ),
        )
        .unwrap();
        Self {
            state,
            task,
            kubeconfig: kubeconfig.display().to_string(),
            _dir: dir,
        }
    }

    /// Creates or replaces the ConfigMap with `data`.
    fn put(&self, data: Value) {
        let mut objects = self.state.objects.lock().unwrap();
        objects.resource_version += 1;
        let rv = objects.resource_version;
        let kind = if objects.current.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let object = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": NAME,
                "namespace": NAMESPACE,
                "uid": "5f0c9f6e-0000-4000-8000-00000000c0f1",
                "resourceVersion": rv.to_string(),
            },
            "data": data,
        });
        objects.current = Some(object.clone());
        objects.history.push((rv, kind, object));
        drop(objects);
        self.state.changed.send_modify(|v| *v = rv);
    }

    fn put_config(&self, config: &str) {
        self.put(json!({ "config.yaml": config }));
    }

    fn delete(&self) {
        let mut objects = self.state.objects.lock().unwrap();
        let mut object = objects.current.take().expect("nothing to delete");
        objects.resource_version += 1;
        let rv = objects.resource_version;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        objects.history.push((rv, "DELETED", object));
        drop(objects);
        self.state.changed.send_modify(|v| *v = rv);
    }

    fn forbid(&self) {
        self.state.objects.lock().unwrap().forbidden = true;
    }

    /// Ends the watches in progress and fails the next `count` watch requests.
    fn break_watches(&self, count: usize) {
        self.state.objects.lock().unwrap().failing_watches = count;
        self.state.changed.send_modify(|v| *v = u64::MAX);
    }

    fn requests(&self) -> Vec<String> {
        self.state.objects.lock().unwrap().requests.clone()
    }
}

async fn serve(listener: TcpListener, state: Arc<ApiState>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, req.uri())) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn status(code: u16, reason: &str, message: &str) -> Response<Body> {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() = StatusCode::from_u16(code).unwrap();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

fn answer(state: &Arc<ApiState>, uri: &http::Uri) -> Response<Body> {
    let query: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut objects = state.objects.lock().unwrap();
    objects.requests.push(format!("{} {:?}", uri.path(), query));
    if uri.path() != format!("/api/v1/namespaces/{NAMESPACE}/configmaps") {
        return status(
            404,
            "NotFound",
            "the server could not find the requested resource",
        );
    }
    if objects.forbidden || param("fieldSelector") != Some(&format!("metadata.name={NAME}")) {
        return status(
            403,
            "Forbidden",
            "configmaps is forbidden: User \"system:serviceaccount:team-a:main-proxy\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"team-a\"",
        );
    }
    if matches!(param("watch"), Some("true" | "1")) {
        if objects.failing_watches > 0 {
            objects.failing_watches -= 1;
            return status(500, "InternalError", "etcd is having a bad day");
        }
        let from: u64 = param("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        drop(objects);
        return watch_stream(state.clone(), from);
    }
    let list = json!({
        "apiVersion": "v1",
        "kind": "ConfigMapList",
        "metadata": {"resourceVersion": objects.resource_version.to_string()},
        "items": objects.current.iter().collect::<Vec<_>>(),
    });
    let mut response = Response::new(Full::new(Bytes::from(list.to_string())).boxed_unsync());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

/// Newline-delimited watch events after `from`, as they happen.
fn watch_stream(state: Arc<ApiState>, from: u64) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut changed = state.changed.subscribe();
        let mut sent = from;
        loop {
            let pending: Vec<(u64, String)> = {
                let objects = state.objects.lock().unwrap();
                objects
                    .history
                    .iter()
                    .filter(|(rv, _, _)| *rv > sent)
                    .map(|(rv, kind, object)| {
                        (*rv, json!({"type": kind, "object": object}).to_string())
                    })
                    .collect()
            };
            for (rv, line) in pending {
                if tx.send(Bytes::from(line + "\n")).await.is_err() {
                    return;
                }
                sent = rv;
            }
            if changed.changed().await.is_err() || *changed.borrow() == u64::MAX {
                return; // ends the response: the client watches again
            }
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    response
}

// ---------------------------------------------------------------------------

fn config(api: SocketAddr, admin: SocketAddr, upstream: &str, key_file: &str) -> String {
    format!(
        r#"
server:
  listen: "{api}"
  admin_listen: "{admin}"
  reload_interval: 100ms
  shutdown_grace: 5s
clients:
  - id: app
    relay_keys: [{{env: TEST_RELAY_KEY}}]
regions:
  - name: region-{port}
    base_url: {upstream}
    api_keys: [{{file: {key_file}}}]
"#,
        port = upstream.rsplit(':').next().unwrap()
    )
}

fn write(dir: &tempfile::TempDir, name: &str, content: &str) -> String {
    let path = dir.path().join(name);
    let tmp = dir.path().join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path.display().to_string()
}

async fn message(proxy: &ProxyProcess) -> th::Answer {
    send(
        &th::client(),
        request(
            Method::POST,
            &proxy.url("/v1/messages"),
            &[
                ("x-api-key", RELAY_KEY),
                ("content-type", "application/json"),
            ],
            MESSAGE,
        ),
    )
    .await
}

/// Waits at most `within` for `check`; how long it took.
async fn wait_for(what: &str, within: Duration, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn keys_seen(upstream: &MockUpstream) -> HashSet<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.headers["x-api-key"].to_str().unwrap().to_string())
        .collect()
}

/// Starts the proxy on `--config-map team-a/main-config`.
fn start_proxy(kube: &KubeApi, api: SocketAddr, admin: SocketAddr) -> ProxyProcess {
    ProxyProcess::start_with_args(
        BIN.as_ref(),
        &["--config-map", &format!("{NAMESPACE}/{NAME}")],
        &[
            ("KUBECONFIG", kube.kubeconfig.as_str()),
            ("TEST_RELAY_KEY", RELAY_KEY),
        ],
        api,
        admin,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_configmap_version_takes_effect_within_seconds_without_failing_requests() {
    let kube = KubeApi::start().await;
    let (first, second) = (MockUpstream::start().await, MockUpstream::start().await);
    let secrets = tempfile::tempdir().unwrap();
    let key_a = write(&secrets, "key-a", "sk-ant-A1\n");
    let key_b = write(&secrets, "key-b", "sk-ant-B1\n");
    let (api, admin) = free_addresses();
    kube.put_config(&config(api, admin, &first.base_url(), &key_a));

    // The bare name and the environment variable, as a pod may give them.
    let proxy = ProxyProcess::start_with_args(
        BIN.as_ref(),
        &[],
        &[
            ("KUBECONFIG", kube.kubeconfig.as_str()),
            ("TEST_RELAY_KEY", RELAY_KEY),
            ("CLAUDE_RELAY_CONFIG_MAP", NAME),
            ("POD_NAMESPACE", NAMESPACE),
        ],
        api,
        admin,
    );
    assert_eq!(message(&proxy).await.status, 200);
    assert_eq!(keys_seen(&first), HashSet::from(["sk-ant-A1".to_string()]));

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, sent, url) = (stop.clone(), sent.clone(), proxy.url("/v1/messages"));
        load.push(tokio::spawn(async move {
            let client = th::client();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let headers = [
                    ("x-api-key", RELAY_KEY),
                    ("content-type", "application/json"),
                ];
                let answer = send(&client, request(Method::POST, &url, &headers, MESSAGE)).await;
                if answer.status != 200 {
                    failures.push(format!("{} {:?}", answer.status, answer.body));
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            failures
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new region with a new key: what a changed UpstreamRegion renders.
    kube.put_config(&config(api, admin, &second.base_url(), &key_b));
    let took = wait_for("the new region", Duration::from_secs(5), async || {
        keys_seen(&second).contains("sk-ant-B1")
    })
    .await;
    assert!(took < Duration::from_secs(3), "the change took {took:?}");
    let before = first.request_count();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        first.request_count(),
        before,
        "the old region still gets requests"
    );

    // A mounted Secret rotates: referenced files are still followed.
    write(&secrets, "key-b", "sk-ant-B2\n");
    wait_for("the rotated key", Duration::from_secs(5), async || {
        keys_seen(&second).contains("sk-ant-B2")
    })
    .await;

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        let failures = worker.await.unwrap();
        assert!(failures.is_empty(), "requests failed: {failures:?}");
    }
    assert!(
        sent.load(Ordering::Relaxed) > 50,
        "too little load to mean anything"
    );
    assert_eq!(
        proxy
            .metric("claude_relay_config_reloads_total{result=\"ok\"}")
            .await
            .unwrap_or(0.0),
        2.0
    );
    assert_eq!(
        proxy
            .metric("claude_relay_config_reloads_total{result=\"failed\"}")
            .await
            .unwrap_or(0.0),
        0.0
    );

    // Only list and watch of the one ConfigMap, by field selector.
    let requests = kube.requests();
    assert!(
        requests.iter().any(|r| r.contains("(\"watch\", \"true\")")),
        "{requests:?}"
    );
    for r in &requests {
        assert!(
            r.starts_with("/api/v1/namespaces/team-a/configmaps ")
                && r.contains("(\"fieldSelector\", \"metadata.name=main-config\")"),
            "{r}"
        );
    }
    assert!(
        proxy.log().contains("configuration reloaded"),
        "{}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_versions_deletion_and_watch_errors_keep_the_config_in_force() {
    let kube = KubeApi::start().await;
    let (first, second) = (MockUpstream::start().await, MockUpstream::start().await);
    let secrets = tempfile::tempdir().unwrap();
    let key_a = write(&secrets, "key-a", "sk-ant-A1\n");
    let key_b = write(&secrets, "key-b", "sk-ant-B1\n");
    let (api, admin) = free_addresses();
    let good = config(api, admin, &first.base_url(), &key_a);
    kube.put_config(&good);
    let proxy = start_proxy(&kube, api, admin);
    assert_eq!(message(&proxy).await.status, 200);
    let failed = "claude_relay_config_reloads_total{result=\"failed\"}";

    // An invalid document is rejected; the old config serves on.
    kube.put_config(&good.replace("base_url", "base_uri"));
    wait_for("a rejected version", Duration::from_secs(5), async || {
        proxy.metric(failed).await.unwrap_or(0.0) == 1.0
    })
    .await;
    assert_eq!(message(&proxy).await.status, 200);
    assert!(proxy.log().contains("base_uri"), "{}", proxy.log());

    // A version without the key is rejected too.
    kube.put(json!({"other.yaml": good}));
    wait_for(
        "a version without the key",
        Duration::from_secs(5),
        async || proxy.metric(failed).await.unwrap_or(0.0) == 2.0,
    )
    .await;
    assert!(
        proxy
            .log()
            .contains("ConfigMap team-a/main-config has no key `config.yaml`"),
        "{}",
        proxy.log()
    );

    // Deleted: logged, and the last config stays in force.
    kube.delete();
    wait_for(
        "the deletion in the log",
        Duration::from_secs(5),
        async || proxy.log().contains("config source deleted"),
    )
    .await;
    let before = first.request_count();
    assert_eq!(message(&proxy).await.status, 200);
    assert_eq!(first.request_count(), before + 1);

    // Created again with another region: followed as before.
    kube.put_config(&config(api, admin, &second.base_url(), &key_b));
    wait_for(
        "the re-created ConfigMap",
        Duration::from_secs(5),
        async || message(&proxy).await.status == 200 && second.request_count() > 0,
    )
    .await;

    // The API fails the watch for a while: counted, retried, then followed again.
    kube.break_watches(2);
    wait_for(
        "counted watch errors",
        Duration::from_secs(10),
        async || {
            proxy
                .metric("claude_relay_config_reloads_total{result=\"watch_error\"}")
                .await
                .unwrap_or(0.0)
                >= 2.0
        },
    )
    .await;
    assert_eq!(message(&proxy).await.status, 200);
    kube.put_config(&good);
    wait_for(
        "the version after the errors",
        Duration::from_secs(10),
        async || {
            let before = first.request_count();
            message(&proxy).await.status == 200 && first.request_count() > before
        },
    )
    .await;
    assert_eq!(proxy.metric(failed).await.unwrap_or(0.0), 2.0);
}

/// Runs the binary to its exit (within `within`): code, output, time taken.
fn run_to_exit(args: &[&str], env: &[(&str, &str)], within: Duration) -> (i32, String, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let file = std::fs::File::create(&out).unwrap();
    let start = Instant::now();
    let mut child = std::process::Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .env_remove("POD_NAMESPACE")
        .env_remove("CLAUDE_RELAY_CONFIG")
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let output = std::fs::read_to_string(&out).unwrap();
            return (status.code().unwrap_or(-1), output, start.elapsed());
        }
        if start.elapsed() > within {
            let _ = child.kill();
            panic!(
                "still running after {within:?}: {}",
                std::fs::read_to_string(&out).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_its_configmap_the_proxy_does_not_start_and_says_why() {
    let kube = KubeApi::start().await;
    let kubeconfig = kube.kubeconfig.clone();
    // Runs off the async workers, which serve the API double meanwhile.
    let run = |args: &'static [&'static str]| {
        let kubeconfig = kubeconfig.clone();
        tokio::task::spawn_blocking(move || {
            run_to_exit(
                args,
                &[("KUBECONFIG", &kubeconfig)],
                Duration::from_secs(20),
            )
        })
    };

    // Missing: waits the given time, then names what it waited for.
    let (code, output, took) = run(&[
        "--config-map",
        "team-a/main-config",
        "--config-map-wait",
        "1s",
    ])
    .await
    .unwrap();
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("ConfigMap team-a/main-config does not exist (waited 1s)"),
        "{output}"
    );
    assert!(took >= Duration::from_secs(1), "{took:?}");

    // Forbidden: no waiting; names the namespace, the name and the verbs.
    kube.forbid();
    let (code, output, took) = run(&["--config-map", "team-a/main-config"]).await.unwrap();
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains(
            "ConfigMap team-a/main-config: the Kubernetes API refused to list it (HTTP 403"
        ) && output.contains(
            "get, list and watch on configmaps (resourceNames: [main-config]) in namespace team-a"
        ),
        "{output}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");

    // `--config` and `--config-map` exclude each other.
    let (code, output, _) = run(&[
        "--config",
        "/nonexistent.yaml",
        "--config-map",
        "team-a/main-config",
    ])
    .await
    .unwrap();
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("cannot be used with"), "{output}");
}
