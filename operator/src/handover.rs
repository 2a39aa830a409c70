//! Hands a Deployment's `spec.replicas` over to its HorizontalPodAutoscaler
//! without a dip, following the server-side apply "transferring ownership"
//! recipe of the Kubernetes docs.
//!
//! With autoscaling the operator's apply leaves `spec.replicas` out. Had the
//! operator's field manager owned it (fixed replicas before), the API server
//! would remove the field and default it to 1 until the HPA acts (~15 s).
//! So before that apply, a second field manager,
//! [`HANDOVER_MANAGER`], applies `spec.replicas` alone at
//! max(minReplicas, current): the field then has an owner left when the
//! operator drops it, keeps its value, and the HPA's first scale takes it
//! from that manager. A new autoscaled Deployment is created at minReplicas
//! the same way instead of at the default 1. Back to fixed replicas, the
//! operator's forced apply takes the field back from whoever holds it.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tracing::info;

use crate::controller::FIELD_MANAGER;
use crate::error::Result;

/// The field manager that holds `spec.replicas` between the operator and the HPA.
pub const HANDOVER_MANAGER: &str = "claude-relay-operator-handover";

/// Whether the Deployment's `spec.replicas` may still have to be handed over
/// before the operator applies it: only with an HPA, and only while the
/// operator's own manager owns the count or no Deployment is known yet. At
/// rest (the HPA or the handover manager holds it) this costs nothing.
pub fn may_be_needed(live: Option<&Deployment>, hpa: Option<&HorizontalPodAutoscaler>) -> bool {
    hpa.is_some() && live.is_none_or(|current| owns_replicas(current, FIELD_MANAGER))
}

/// Hands `spec.replicas` over to the HPA before the operator applies the
/// rendered Deployment without it: creates a missing Deployment at
/// minReplicas, or moves the operator's count (at least minReplicas) to
/// [`HANDOVER_MANAGER`]. Reads the live Deployment itself, since a cache may
/// not have seen the latest write yet and a stale "missing" would reset the
/// count.
pub async fn prepare(
    client: &Client,
    ns: &str,
    deployment: &Deployment,
    hpa: Option<&HorizontalPodAutoscaler>,
) -> Result<()> {
    let Some(hpa) = hpa else { return Ok(()) };
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let name = deployment.name_any();
    let min = hpa.spec.as_ref().and_then(|s| s.min_replicas).unwrap_or(1);
    match api.get_opt(&name).await? {
        None => {
            // Created at minReplicas, and the count handed over at once, so
            // the operator's apply may leave it out.
            let mut first = deployment.clone();
            first.spec.get_or_insert_default().replicas = Some(min);
            let operator = PatchParams::apply(FIELD_MANAGER).force();
            api.patch(&name, &operator, &Patch::Apply(&first)).await?;
            hand_over(&api, &name, min).await
        }
        Some(current) if owns_replicas(&current, FIELD_MANAGER) => {
            let replicas = current
                .spec
                .as_ref()
                .and_then(|s| s.replicas)
                .unwrap_or(0)
                .max(min);
            hand_over(&api, &name, replicas).await
        }
        // Already the handover manager's or the HPA's.
        Some(_) => Ok(()),
    }
}

/// Applies `spec.replicas` alone as [`HANDOVER_MANAGER`]; forced, since the
/// value may differ from the operator's (raised to minReplicas).
async fn hand_over(api: &Api<Deployment>, name: &str, replicas: i32) -> Result<()> {
    let body = json!({
        "apiVersion": Deployment::api_version(&()),
        "kind": Deployment::kind(&()),
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    info!(
        deployment = name,
        replicas, "spec.replicas handed over to the autoscaler"
    );
    Ok(())
}

/// Whether `manager`'s apply owns `spec.replicas`, per `metadata.managedFields`.
pub fn owns_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|entry| {
            entry.manager.as_deref() == Some(manager)
                && entry.operation.as_deref() == Some("Apply")
                && entry.subresource.as_deref().unwrap_or_default().is_empty()
        })
        .any(|entry| {
            entry.fields_v1.as_ref().is_some_and(|fields| {
                fields
                    .0
                    .pointer("/f:spec/f:replicas")
                    .is_some_and(Value::is_object)
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn managed(manager: &str, operation: &str, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(operation.into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        }
    }

    #[test]
    fn replicas_ownership_is_read_from_managed_fields() {
        let mut deployment = Deployment::default();
        assert!(!owns_replicas(&deployment, FIELD_MANAGER));
        deployment.metadata.managed_fields = Some(vec![
            managed(
                FIELD_MANAGER,
                "Apply",
                json!({"f:spec": {"f:template": {}}}),
            ),
            managed(
                "kube-controller-manager",
                "Update",
                json!({"f:spec": {"f:replicas": {}}}),
            ),
        ]);
        assert!(!owns_replicas(&deployment, FIELD_MANAGER));
        assert!(!owns_replicas(&deployment, "kube-controller-manager"));
        deployment.metadata.managed_fields = Some(vec![managed(
            FIELD_MANAGER,
            "Apply",
            json!({"f:spec": {"f:replicas": {}, "f:template": {}}}),
        )]);
        assert!(owns_replicas(&deployment, FIELD_MANAGER));
    }
}
