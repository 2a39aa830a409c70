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

/// Expiry is measured from when the candidate saw the Lease change, on its
/// own clock: a Lease it sees unchanged for `leaseDurationSeconds` is taken
/// over, whatever its renewTime says.
#[tokio::test]
async fn a_lease_seen_unchanged_for_its_duration_is_taken_over_with_optimistic_concurrency() {
    let (client, mut handle) = mock_client();
    // renewTime in the future (a holder's clock ahead): only local time counts.
    let renewed = Timestamp::now() + jiff_secs(3600);
    let unrenewed = move || {
        let mut lease = lease("operator-b", renewed);
        lease["spec"]["leaseDurationSeconds"] = json!(1);
        lease
    };
    let server = tokio::spawn(async move {
        // First sight: held until seen unchanged for a second.
        expect(&mut handle, Method::GET, LEASE, 200, move |_| unrenewed()).await;
        expect(&mut handle, Method::GET, LEASE, 200, move |_| unrenewed()).await;
        let put = expect(&mut handle, Method::PUT, LEASE, 200, |seen| {
            seen.body.clone()
        })
        .await;
        // The second candidate loses the race for the same resourceVersion.
        expect(&mut handle, Method::GET, LEASE, 200, move |_| unrenewed()).await;
        expect(&mut handle, Method::PUT, LEASE, 409, |_| conflict()).await;
        put.body
    });
    let elector = elector(client);
    assert!(!elector.try_acquire().await.unwrap());
    tokio::time::sleep(Duration::from_millis(1100)).await;
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
