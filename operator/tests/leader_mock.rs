//! Lease-based leader election against a scripted API server.

mod common;

use std::time::Duration;

use claude_relay_operator::leader::{Elector, LeaseConfig};
use common::*;
use http::Method;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/claude-relay-operator";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

fn elector(client: kube::Client) -> Elector {
    Elector::new(
        client,
        LeaseConfig {
            name: "claude-relay-operator".into(),
            namespace: "ops".into(),
            identity: "operator-a".into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        },
    )
}

fn lease(holder: &str, renewed: Timestamp) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "claude-relay-operator", "namespace": "ops", "resourceVersion": "42"},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "renewTime": renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "leaseTransitions": 3,
        },
    })
}

fn conflict() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"})
}

#[tokio::test]
async fn creates_the_lease_when_there_is_none() {
    let (client, mut handle) = mock_client();
    let server = tokio::spawn(async move {
        expect(&mut handle, Method::GET, LEASE, 404, |_| not_found()).await;
        expect(&mut handle, Method::POST, LEASES, 201, |seen| {
            seen.body.clone()
        })
        .await
        .body
    });
    assert!(elector(client).try_acquire().await.unwrap());
    let created = server.await.unwrap();
    assert_eq!(created["spec"]["holderIdentity"], "operator-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
}

#[tokio::test]
async fn a_fresh_lease_of_another_replica_is_left_alone() {
    let (client, mut handle) = mock_client();
    let server = tokio::spawn(async move {
        expect(&mut handle, Method::GET, LEASE, 200, |_| {
            lease("operator-b", Timestamp::now())
        })
        .await;
    });
    assert!(!elector(client).try_acquire().await.unwrap());
    server.await.unwrap();
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_with_optimistic_concurrency() {
    let (client, mut handle) = mock_client();
    let stale = Timestamp::now() - jiff_secs(60);
    let server = tokio::spawn(async move {
        expect(&mut handle, Method::GET, LEASE, 200, move |_| {
            lease("operator-b", stale)
        })
        .await;
        let put = expect(&mut handle, Method::PUT, LEASE, 200, |seen| {
            seen.body.clone()
        })
        .await;
        // The second candidate loses the race for the same resourceVersion.
        expect(&mut handle, Method::GET, LEASE, 200, move |_| {
            lease("operator-b", stale)
        })
        .await;
        expect(&mut handle, Method::PUT, LEASE, 409, |_| conflict()).await;
        put.body
    });
    let elector = elector(client);
    assert!(elector.try_acquire().await.unwrap());
    assert!(!elector.try_acquire().await.unwrap());
    let put = server.await.unwrap();
    assert_eq!(put["metadata"]["resourceVersion"], "42");
    assert_eq!(put["spec"]["holderIdentity"], "operator-a");
    assert_eq!(put["spec"]["leaseTransitions"], 4);
}

fn jiff_secs(secs: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_secs(secs)
}
