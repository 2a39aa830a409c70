//! `--config-map`: the proxy, run as a real process with `KUBECONFIG`
//! pointing at a double of the Kubernetes API, follows its ConfigMap through
//! list and watch, keeps the config in force on bad versions, deletion and
//! watch errors, and refuses to start without its ConfigMap.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use claude_relay_e2e::apiserver::{ApiServer, service_account_token};
use claude_relay_testkit::http::{self as th, request, send, wait_for};
use claude_relay_testkit::proxy::{ANY_PORT, ProxyProcess};
use claude_relay_testkit::upstream::MockUpstream;
use http::Method;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_claude-relay-proxy");
const RELAY_KEY: &str = "relay-key-for-tests";
const NAMESPACE: &str = "team-a";
const NAME: &str = "main-config";
const MESSAGE: &str =
    r#"{"model":"claude-test","max_tokens":8,"messages":[{"role":"user","content":"Hi"}]}"#;

// ---------------------------------------------------------------------------
// The Kubernetes API: the e2e crate's double, with the ConfigMap's namespace
// and the Role and RoleBinding the operator renders for the proxy's service
// account, as whom the proxy authenticates. Its RBAC, like a real one with
// `resourceNames`, refuses a list or watch without the field selector
// `metadata.name=main-config`.

const SERVICE_ACCOUNT: &str = "main-proxy";

struct KubeApi {
    api: ApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: String,
}

impl KubeApi {
    async fn start() -> Self {
        let api = ApiServer::start().await;
        api.with_store(|store| {
            let namespaces = store.resource("", "v1", "namespaces").unwrap();
            store
                .create(&namespaces, "", json!({"metadata": {"name": NAMESPACE}}))
                .unwrap();
            let roles = store
                .resource("rbac.authorization.k8s.io", "v1", "roles")
                .unwrap();
            let role = json!({
                "metadata": {"name": SERVICE_ACCOUNT},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                    "resourceNames": [NAME], "verbs": ["get", "list", "watch"]}],
            });
            store.create(&roles, NAMESPACE, role).unwrap();
            let bindings = store
                .resource("rbac.authorization.k8s.io", "v1", "rolebindings")
                .unwrap();
            let binding = json!({
                "metadata": {"name": SERVICE_ACCOUNT},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SERVICE_ACCOUNT},
                "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
            });
            store.create(&bindings, NAMESPACE, binding).unwrap();
        });
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        // The context's namespace is not the ConfigMap's: the proxy must not use it.
        api.write_service_account_kubeconfig(&kubeconfig, "elsewhere", SERVICE_ACCOUNT)
            .unwrap();
        // ... while the token stays the service account's of team-a.
        let text = std::fs::read_to_string(&kubeconfig).unwrap().replace(
            &service_account_token("elsewhere", SERVICE_ACCOUNT),
            &service_account_token(NAMESPACE, SERVICE_ACCOUNT),
        );
        std::fs::write(&kubeconfig, text).unwrap();
        Self {
            api,
            kubeconfig: kubeconfig.display().to_string(),
            _dir: dir,
        }
    }

    /// Creates or replaces the ConfigMap with `data`.
    fn put(&self, data: Value) {
        self.api.with_store(|store| {
            let rt = store.resource("", "v1", "configmaps").unwrap();
            let object = json!({"metadata": {"name": NAME}, "data": data});
            match store.get(&rt, NAMESPACE, NAME) {
                Ok(_) => store.replace(&rt, NAMESPACE, NAME, object, false),
                Err(_) => store.create(&rt, NAMESPACE, object),
            }
            .unwrap();
        });
    }

    fn put_config(&self, config: &str) {
        self.put(json!({ "config.yaml": config }));
    }

    fn delete(&self) {
        self.api.with_store(|store| {
            let rt = store.resource("", "v1", "configmaps").unwrap();
            store.delete(&rt, NAMESPACE, NAME, false).unwrap();
        });
    }

    /// Takes the service account's access away.
    fn forbid(&self) {
        self.api.with_store(|store| {
            let rt = store
                .resource("rbac.authorization.k8s.io", "v1", "rolebindings")
                .unwrap();
            store
                .delete(&rt, NAMESPACE, SERVICE_ACCOUNT, false)
                .unwrap();
        });
    }

    /// Ends the watches in progress and fails the next `count` watch requests.
    fn break_watches(&self, count: usize) {
        self.api.fail_watches(count);
    }

    fn requests(&self) -> Vec<String> {
        self.api.requests()
    }
}

// ---------------------------------------------------------------------------

fn config(upstream: &str, key_file: &str) -> String {
    format!(
        r#"
server:
  listen: "{ANY_PORT}"
  admin_listen: "{ANY_PORT}"
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

fn keys_seen(upstream: &MockUpstream) -> HashSet<String> {
    upstream
        .requests()
        .iter()
        .map(|r| r.headers["x-api-key"].to_str().unwrap().to_string())
        .collect()
}

/// Starts the proxy on `--config-map team-a/main-config`.
fn start_proxy(kube: &KubeApi) -> ProxyProcess {
    ProxyProcess::start_with_args(
        BIN.as_ref(),
        &["--config-map", &format!("{NAMESPACE}/{NAME}")],
        &[
            ("KUBECONFIG", kube.kubeconfig.as_str()),
            ("TEST_RELAY_KEY", RELAY_KEY),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_configmap_version_takes_effect_within_seconds_without_failing_requests() {
    let kube = KubeApi::start().await;
    let (first, second) = (MockUpstream::start().await, MockUpstream::start().await);
    let secrets = tempfile::tempdir().unwrap();
    let key_a = write(&secrets, "key-a", "sk-ant-A1\n");
    let key_b = write(&secrets, "key-b", "sk-ant-B1\n");
    kube.put_config(&config(&first.base_url(), &key_a));

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
    kube.put_config(&config(&second.base_url(), &key_b));
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

    // Only list and watch of the one ConfigMap, by field selector, as its
    // service account.
    let requests = kube.requests();
    assert!(
        requests.iter().any(|r| r.contains("watch=true")),
        "{requests:?}"
    );
    for r in &requests {
        assert!(
            r.starts_with("GET /api/v1/namespaces/team-a/configmaps?")
                && r.contains("fieldSelector=metadata.name=main-config")
                && r.contains("[system:serviceaccount:team-a:main-proxy] -> 200"),
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
    let good = config(&first.base_url(), &key_a);
    kube.put_config(&good);
    let proxy = start_proxy(&kube);
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
    kube.put_config(&config(&second.base_url(), &key_b));
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
