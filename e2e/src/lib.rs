//! End-to-end tests of claude-relay: the operator and several proxy replicas
//! as real processes, a real Redis, a Claude API double, and a Kubernetes
//! API (a real cluster when `KUBECONFIG` is set, else [`apiserver`], a double
//! served on loopback). See `e2e/README.md`.

pub mod apiserver;
pub mod cluster;
pub mod hpa;
pub mod operator;
pub mod pods;
