//! What a kubelet (and the Deployment and HPA controllers) would do for the
//! proxy Deployment the operator renders, done by the test harness: start
//! its pods as local processes with the container's args and env, Secret
//! volumes materialised as files at their mount paths, and report the ready
//! pods back in the Deployment's status.
//!
//! Each pod is the proxy binary run under `unshare --mount` (root needed):
//! in its own mount namespace a tmpfs covers the parent of the mount paths
//! (`/etc/claude-relay`; the empty directory is created on the host if it is
//! missing, the only trace the tests leave there) and each volume is bind
//! mounted, read-only like a Secret volume, at its `mountPath`, so the
//! proxy reads the very paths the rendered config names. What a pod gets
//! that the Deployment does not say: `KUBECONFIG` (instead of the in-cluster
//! service account; against the API double it authenticates as the pod's
//! service account, so RBAC applies the operator's Role) and `--listen`/`--admin-listen` through
//! `CLAUDE_RELAY_LISTEN` and `CLAUDE_RELAY_ADMIN_LISTEN` (instead of a pod IP
//! of its own: replicas share the host's ports). Containers other than
//! `proxy` (the GeoIP updater sidecar) are not started.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Secret};
use kube::api::{Patch, PatchParams};
use std::os::unix::fs::PermissionsExt;

use kube::ResourceExt;
use serde_json::json;

use claude_relay_testkit::proxy::{ANY_PORT, ProxyProcess};

use crate::cluster::Cluster;
use crate::operator::binary;

pub struct Pod {
    pub name: String,
    pub proxy: ProxyProcess,
}

/// The container's `$(VAR)` references expanded from `env`, as Kubernetes
/// does for args and env values (`$$` stands for `$`; unknown ones stay).
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some(close) = tail.strip_prefix("$(").and_then(|t| t.find(')'))
            && let Some(value) = env.get(&tail[2..2 + close])
        {
            out.push_str(value);
            rest = &tail[3 + close..];
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The pod's environment: values, and `valueFrom` of pod fields, Secrets and ConfigMaps.
async fn environment(
    cluster: &Cluster,
    container: &Container,
    pod: &str,
    service_account: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for var in container.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            expand(value, &env)
        } else if let Some(from) = &var.value_from {
            if let Some(field) = &from.field_ref {
                match field.field_path.as_str() {
                    "metadata.name" => pod.to_string(),
                    "metadata.namespace" => cluster.namespace.clone(),
                    "spec.serviceAccountName" => service_account.to_string(),
                    "spec.nodeName" => "e2e-node".into(),
                    "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                    other => {
                        anyhow::bail!("env {}: the harness cannot give fieldRef {other}", var.name)
                    }
                }
            } else if let Some(key) = &from.secret_key_ref {
                let secret = cluster.api::<Secret>().get(&key.name).await?;
                let bytes = secret
                    .data
                    .unwrap_or_default()
                    .remove(&key.key)
                    .map(|b| b.0)
                    .unwrap_or_default();
                String::from_utf8(bytes)?
            } else if let Some(key) = &from.config_map_key_ref {
                let map = cluster.api::<ConfigMap>().get(&key.name).await?;
                map.data
                    .unwrap_or_default()
                    .remove(&key.key)
                    .unwrap_or_default()
            } else {
                anyhow::bail!(
                    "env {}: the harness cannot resolve this valueFrom",
                    var.name
                );
            }
        } else {
            String::new()
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// Whether this process may make mount namespaces; the reason if not.
fn check_mount_namespaces() -> anyhow::Result<()> {
    static CHECKED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| {
            let output = std::process::Command::new("unshare")
                .args(["--mount", "--propagation", "private", "--", "true"])
                .output()
                .map_err(|e| format!("cannot run unshare (util-linux): {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`unshare --mount` failed ({}): the e2e tests start each proxy pod in a mount namespace of its own, which needs root (or CAP_SYS_ADMIN); run them as root or in the CI container",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Starts `count` pods of `deployment` and waits until each is ready.
pub async fn start(
    cluster: &Cluster,
    deployment: &Deployment,
    count: usize,
    dir: &Path,
) -> anyhow::Result<Vec<Pod>> {
    check_mount_namespaces()?;
    let template = deployment
        .spec
        .as_ref()
        .map(|s| s.template.clone())
        .ok_or_else(|| anyhow::anyhow!("the Deployment has no spec"))?;
    let pod_spec = template
        .spec
        .ok_or_else(|| anyhow::anyhow!("the pod template has no spec"))?;
    let container = pod_spec
        .containers
        .iter()
        .find(|c| c.name == "proxy")
        .ok_or_else(|| anyhow::anyhow!("the pod template has no proxy container"))?;
    anyhow::ensure!(
        container.command.is_none(),
        "the proxy container overrides the image's entrypoint; the harness runs the entrypoint (claude-relay-proxy)"
    );
    let service_account = pod_spec.service_account_name.clone().unwrap_or_default();
    let mut pods = Vec::new();
    for index in 0..count {
        let name = format!("{}-e2e-{index}", deployment.name_any());
        let pod_dir = dir.join(&name);
        std::fs::create_dir_all(&pod_dir)?;
        let env = environment(cluster, container, &name, &service_account).await?;
        let args: Vec<String> = container
            .args
            .iter()
            .flatten()
            .map(|a| expand(a, &env))
            .collect();

        let proxy_binary = binary("claude-relay-proxy");
        let mut script = String::from("set -e\n");
        let mut scratch_roots: Vec<PathBuf> = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = pod_spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == mount.name)
                .ok_or_else(|| anyhow::anyhow!("volumeMount {} names no volume", mount.name))?;
            // An emptyDir over a directory that holds the harness's own files
            // (the pod's `/tmp` when the target directory is under /tmp) would
            // hide the volumes, the kubeconfig and the binary from the pod: the
            // host directory stands in for that scratch space instead.
            let mount_path = Path::new(&mount.mount_path);
            if volume.empty_dir.is_some()
                && (dir.starts_with(mount_path) || proxy_binary.starts_with(mount_path))
            {
                continue;
            }
            let source = pod_dir.join("volumes").join(&volume.name);
            std::fs::create_dir_all(&source)?;
            if let Some(secret) = &volume.secret {
                let secret_name = secret.secret_name.clone().unwrap_or_default();
                let data = cluster
                    .api::<Secret>()
                    .get(&secret_name)
                    .await?
                    .data
                    .unwrap_or_default();
                let mode = secret.default_mode.unwrap_or(0o644) as u32;
                for (key, bytes) in data {
                    let file = source.join(&key);
                    std::fs::write(&file, &bytes.0)?;
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode))?;
                }
            } else if volume.empty_dir.is_none() {
                anyhow::bail!(
                    "volume {}: the harness only provides Secret and emptyDir volumes",
                    volume.name
                );
            }
            let target = Path::new(&mount.mount_path);
            if !target.exists() {
                let root: PathBuf = target.components().take(3).collect();
                if !scratch_roots.contains(&root) {
                    std::fs::create_dir_all(&root)?;
                    script.push_str(&format!(
                        "mount -t tmpfs -o mode=755 e2e-pod {}\n",
                        quote(&root.display().to_string())
                    ));
                    scratch_roots.push(root);
                }
                script.push_str(&format!("mkdir -p {}\n", quote(&mount.mount_path)));
            }
            script.push_str(&format!(
                "mount --bind {} {}\n",
                quote(&source.display().to_string()),
                quote(&mount.mount_path)
            ));
            if mount.read_only == Some(true) {
                script.push_str(&format!(
                    "mount -o remount,bind,ro {}\n",
                    quote(&mount.mount_path)
                ));
            }
        }
        script.push_str("exec \"$@\"\n");

        let proxy_binary = proxy_binary.display().to_string();
        let mut command: Vec<&str> = vec![
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
            "sh",
            &proxy_binary,
        ];
        command.extend(args.iter().map(String::as_str));
        // Against the double, the pod is its service account, and RBAC
        // checks what the operator's Role grants it; a real cluster gets the
        // tests' own credentials (in-cluster ones do not work off the cluster).
        let kubeconfig = match &cluster.api {
            Some(api) => {
                let path = pod_dir.join("kubeconfig");
                api.write_service_account_kubeconfig(&path, &cluster.namespace, &service_account)?;
                path
            }
            None => cluster.kubeconfig.clone(),
        };
        let kubeconfig = kubeconfig.display().to_string();
        let mut vars: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        vars.push(("KUBECONFIG", &kubeconfig));
        // Free ports the proxy picks itself and reports (its ready file):
        // none can be taken by another process between a pick and the bind.
        vars.push(("CLAUDE_RELAY_LISTEN", ANY_PORT));
        vars.push(("CLAUDE_RELAY_ADMIN_LISTEN", ANY_PORT));
        let proxy = tokio::task::block_in_place(|| {
            ProxyProcess::start_with_args_in(Path::new("unshare"), &command, &vars, &pod_dir)
        });
        pods.push(Pod { name, proxy });
    }
    Ok(pods)
}

/// What the HPA and the Deployment controller would write: the replica
/// count the HPA wants (its minimum: no load metrics here) when the
/// Deployment leaves it to an HPA, and the status with `ready` ready pods.
pub async fn report(cluster: &Cluster, deployment: &str, ready: i32) -> anyhow::Result<Deployment> {
    let api = cluster.api::<Deployment>();
    let current = api.get(deployment).await?;
    let hpa = cluster
        .api::<HorizontalPodAutoscaler>()
        .get_opt(deployment)
        .await?;
    let replicas = match current.spec.as_ref().and_then(|s| s.replicas) {
        Some(r) => r,
        None => {
            let wanted = hpa
                .and_then(|h| h.spec)
                .and_then(|s| s.min_replicas)
                .unwrap_or(1);
            let patch = json!({"spec": {"replicas": wanted}});
            api.patch(deployment, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            wanted
        }
    };
    let current = api.get(deployment).await?;
    let status = json!({"status": {
        "observedGeneration": current.metadata.generation,
        "replicas": replicas,
        "updatedReplicas": replicas,
        "readyReplicas": ready,
        "availableReplicas": ready,
        "conditions": [{"type": "Available", "status": if ready > 0 { "True" } else { "False" },
            "reason": "MinimumReplicasAvailable", "message": "reported by the e2e harness"}],
    }});
    Ok(api
        .patch_status(deployment, &PatchParams::default(), &Patch::Merge(&status))
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_kubernetes() {
        let env = BTreeMap::from([("POD_NAMESPACE".to_string(), "team-a".to_string())]);
        assert_eq!(
            expand("$(POD_NAMESPACE)/main-config", &env),
            "team-a/main-config"
        );
        assert_eq!(
            expand("$$(POD_NAMESPACE) $(UNKNOWN) $", &env),
            "$(POD_NAMESPACE) $(UNKNOWN) $"
        );
    }
}
