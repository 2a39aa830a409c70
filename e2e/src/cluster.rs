//! The Kubernetes API the tests run against: a real cluster when
//! `KUBECONFIG` is set, else the [`ApiServer`] double. Either way the tests
//! work in a namespace of their own, `claude-relay-e2e-<random>`, with the
//! CRDs of `crds/yaml` installed, and go through a `kube::Client` as kubectl
//! would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::apiserver::ApiServer;

/// The field manager of what the tests apply (as `kubectl apply --server-side` would).
pub const TEST_MANAGER: &str = "claude-relay-e2e";

pub struct Cluster {
    pub client: Client,
    pub namespace: String,
    /// What the operator and the proxies get as `KUBECONFIG`.
    pub kubeconfig: PathBuf,
    /// The double, in local mode.
    pub api: Option<ApiServer>,
    /// CRDs this run installed (deleted again at cleanup in a real cluster).
    installed_crds: Vec<String>,
}

/// Where the tests keep files: under the target directory, not `/tmp`, since
/// each proxy gets a `/tmp` of its own.
pub fn work_dir() -> tempfile::TempDir {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/debug/deps/<test> -> target/e2e
    let base = exe
        .ancestors()
        .nth(3)
        .map(|p| p.join("e2e"))
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&base).expect("create the e2e work directory");
    tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(base)
        .expect("create a work directory")
}

/// A client for the kubeconfig file at `path`.
pub async fn client_for(path: &Path) -> anyhow::Result<Client> {
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(path)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

fn random_suffix() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("random bytes");
    hex::encode(bytes)
}

impl Cluster {
    /// A real cluster from `KUBECONFIG`, or a fresh double; a new namespace
    /// and the CRDs either way.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        match std::env::var_os("KUBECONFIG") {
            Some(path) => {
                let client = Client::try_default()
                    .await
                    .context("KUBECONFIG is set but names no usable cluster")?;
                Self::connect(client, PathBuf::from(path), None).await
            }
            None => {
                let api = ApiServer::start().await;
                let path = dir.join("kubeconfig");
                api.write_kubeconfig(&path, "default")?;
                let client = client_for(&path).await?;
                Self::connect(client, path, Some(api)).await
            }
        }
    }

    /// Makes the test namespace and installs the CRDs through `client`;
    /// `api` is the double when there is no real cluster.
    pub async fn connect(
        client: Client,
        kubeconfig: PathBuf,
        api: Option<ApiServer>,
    ) -> anyhow::Result<Self> {
        let mut cluster = Self {
            client,
            namespace: format!("claude-relay-e2e-{}", random_suffix()),
            kubeconfig,
            api,
            installed_crds: Vec::new(),
        };
        let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
        let mut ns = Namespace::default();
        ns.metadata.name = Some(cluster.namespace.clone());
        namespaces.create(&PostParams::default(), &ns).await?;
        cluster.install_crds().await?;
        Ok(cluster)
    }

    pub fn is_local(&self) -> bool {
        self.api.is_some()
    }

    /// Applies `crds/yaml/*.yaml` and waits until each is Established, as
    /// `kubectl apply -f crds/yaml/ && kubectl wait --for condition=established` does.
    async fn install_crds(&mut self) -> anyhow::Result<()> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/yaml");
        let api: Api<CustomResourceDefinition> = Api::all(self.client.clone());
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        files.sort();
        for file in files {
            let crd: CustomResourceDefinition =
                serde_yaml_ng::from_str(&std::fs::read_to_string(&file)?)
                    .with_context(|| format!("{} is not a CRD", file.display()))?;
            let name = crd.name_any();
            if api.get_opt(&name).await?.is_none() {
                self.installed_crds.push(name.clone());
            }
            api.patch(
                &name,
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(&crd),
            )
            .await?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let current = api.get(&name).await?;
                let established = current
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                if established {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the CRD {name} was not Established within 30 s");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Server-side apply of `object` into the test namespace, as the tests' own manager.
    pub async fn apply<K>(&self, object: &K) -> Result<K, kube::Error>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + Serialize
            + DeserializeOwned,
    {
        self.api::<K>()
            .patch(
                &object.name_any(),
                &PatchParams::apply(TEST_MANAGER).force(),
                &Patch::Apply(object),
            )
            .await
    }

    /// Every object of the test namespace (and, in local mode, the
    /// requests the double answered), for a failure report.
    pub async fn dump(&self) -> String {
        if let Some(api) = &self.api {
            // Polls repeat the same request: one line per run of them.
            let mut requests: Vec<(String, usize)> = Vec::new();
            for line in api.requests() {
                match requests.last_mut() {
                    Some((last, count)) if *last == line => *count += 1,
                    _ => requests.push((line, 1)),
                }
            }
            let tail = requests.len().saturating_sub(300);
            let lines: Vec<String> = requests[tail..]
                .iter()
                .map(|(line, n)| {
                    if *n > 1 {
                        format!("{line} (x{n})")
                    } else {
                        line.clone()
                    }
                })
                .collect();
            return format!(
                "=== objects\n{}\n=== API requests (last {})\n{}\n",
                api.dump(),
                lines.len(),
                lines.join("\n")
            );
        }
        let mut out = String::new();
        for (group, version, plural) in [
            ("relay.claude-relay.dev", "v1alpha1", "clauderelays"),
            ("relay.claude-relay.dev", "v1alpha1", "upstreamregions"),
            ("apps", "v1", "deployments"),
            ("", "v1", "configmaps"),
            ("", "v1", "services"),
            ("", "v1", "pods"),
            ("", "v1", "events"),
            ("autoscaling", "v2", "horizontalpodautoscalers"),
            ("policy", "v1", "poddisruptionbudgets"),
        ] {
            let gvk = kube::api::GroupVersionKind::gvk(group, version, "");
            let resource = kube::api::ApiResource {
                group: group.into(),
                version: version.into(),
                api_version: gvk.api_version(),
                kind: String::new(),
                plural: plural.into(),
            };
            let api: Api<kube::api::DynamicObject> =
                Api::namespaced_with(self.client.clone(), &self.namespace, &resource);
            match api.list(&Default::default()).await {
                Ok(list) => {
                    for item in list.items {
                        out.push_str(&format!(
                            "--- {plural}\n{}",
                            serde_yaml_ng::to_string(&item).unwrap_or_default()
                        ));
                    }
                }
                Err(e) => out.push_str(&format!("--- {plural}: cannot list: {e}\n")),
            }
        }
        out
    }

    /// Deletes the namespace, and in a real cluster the CRDs this run installed.
    pub async fn cleanup(&self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let _ = namespaces
            .delete(&self.namespace, &DeleteParams::default())
            .await;
        if self.api.is_none() {
            let crds: Api<CustomResourceDefinition> = Api::all(self.client.clone());
            for name in &self.installed_crds {
                let _ = crds.delete(name, &DeleteParams::default()).await;
            }
        }
    }
}

/// The columns `kubectl get` prints for an object of a CRD with
/// `additionalPrinterColumns`: (name, value). JSONPath as the CRDs use it:
/// `.a.b` and `.a[?(@.k=="v")].b`. `Age` is left out (it moves).
pub fn printer_columns(
    crd: &CustomResourceDefinition,
    object: &Value,
    wide: bool,
) -> Vec<(String, String)> {
    let version = &crd.spec.versions[0];
    let mut out = vec![(
        "NAME".to_string(),
        object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    )];
    for column in version.additional_printer_columns.iter().flatten() {
        if column.type_ == "date" || (!wide && column.priority.unwrap_or(0) > 0) {
            continue;
        }
        let value = json_path(object, &column.json_path).map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        });
        out.push((
            column.name.to_uppercase(),
            value.unwrap_or_else(|| "<none>".into()),
        ));
    }
    out
}

fn json_path(object: &Value, path: &str) -> Option<Value> {
    let mut current = object.clone();
    let mut rest = path.strip_prefix('.')?;
    while !rest.is_empty() {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let (field, tail) = rest.split_at(end);
        if !field.is_empty() {
            current = current.get(field)?.clone();
        }
        rest = tail;
        if let Some(filter) = rest.strip_prefix("[?(@.") {
            let close = filter.find(")]")?;
            let (condition, tail) = filter.split_at(close);
            let (key, value) = condition.split_once("==")?;
            let value = value.trim_matches('"');
            current = current
                .as_array()?
                .iter()
                .find(|item| item.get(key).and_then(Value::as_str) == Some(value))?
                .clone();
            rest = &tail[2..];
        }
        rest = rest.strip_prefix('.').unwrap_or(rest);
    }
    Some(current)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    use super::*;

    /// What a real cluster run does besides the scenarios (namespace, CRDs,
    /// the dump through the dynamic API, cleanup), pointed at the double.
    #[tokio::test]
    async fn real_cluster_paths_work_against_an_api_server() {
        let dir = work_dir();
        let api = ApiServer::start().await;
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path, "default").unwrap();
        let client = client_for(&path).await.unwrap();
        // As a real cluster: the double stays out of the Cluster.
        let cluster = Cluster::connect(client.clone(), path, None).await.unwrap();
        assert!(!cluster.is_local());
        assert_eq!(
            cluster.installed_crds,
            [
                "clauderelays.relay.claude-relay.dev",
                "upstreamregions.relay.claude-relay.dev"
            ]
        );
        let mut config_map = ConfigMap::default();
        config_map.metadata.name = Some("seen-in-the-dump".into());
        cluster.apply(&config_map).await.unwrap();
        let dump = cluster.dump().await;
        assert!(
            dump.contains("--- configmaps") && dump.contains("name: seen-in-the-dump"),
            "{dump}"
        );
        assert!(!dump.contains("cannot list"), "{dump}");

        cluster.cleanup().await;
        let namespaces: Api<Namespace> = Api::all(client.clone());
        assert!(
            namespaces
                .get_opt(&cluster.namespace)
                .await
                .unwrap()
                .is_none()
        );
        let crds: Api<CustomResourceDefinition> = Api::all(client);
        assert!(
            crds.list(&Default::default())
                .await
                .unwrap()
                .items
                .is_empty()
        );
    }

    #[test]
    fn json_path_of_the_printer_columns() {
        let object = json!({"status": {"conditions": [
            {"type": "Degraded", "status": "False"}, {"type": "Ready", "status": "True", "reason": "ProxiesReady"}],
            "replicasReady": "2/2", "regionCount": 2}});
        assert_eq!(
            json_path(&object, ".status.conditions[?(@.type==\"Ready\")].status"),
            Some(json!("True"))
        );
        assert_eq!(
            json_path(&object, ".status.conditions[?(@.type==\"Ready\")].reason"),
            Some(json!("ProxiesReady"))
        );
        assert_eq!(json_path(&object, ".status.regionCount"), Some(json!(2)));
        assert_eq!(json_path(&object, ".status.breakerSummary"), None);
    }
}
