//! The claude-relay operator: reconciles each ClaudeRelay, and the
//! UpstreamRegions it selects, into the objects that run its proxies, and
//! reports their health (breaker state included) in the relay's status.
//!
//! Permissions it needs (for the chart's ClusterRole): `clauderelays` and
//! `upstreamregions` get/list/watch and `patch` on their `status`;
//! get/list/watch on `secrets` (the cache keeps only their key names, to
//! check that referenced keys exist; a Redis URL or password is read with a
//! get when its Secret changes);
//! get/list/watch/patch/delete on the owned kinds (`get` on deployments: the
//! replica hand-over to an HPA reads who owns `spec.replicas`) (`configmaps`, `services`,
//! `serviceaccounts`, `deployments`, `roles`, `rolebindings`,
//! `poddisruptionbudgets`, `horizontalpodautoscalers`); `bind`/`escalate` are
//! not needed because the Role it grants holds only permissions it has itself
//! (get/list/watch on configmaps); create/patch on `events.k8s.io` events;
//! get/create/update on `coordination.k8s.io` leases.
#![forbid(unsafe_code)]

pub mod admin;
pub mod breakers;
pub mod cache;
pub mod controller;
pub mod error;
pub mod events;
pub mod handover;
pub mod leader;
pub mod metrics;
pub mod regions;
pub mod render;
pub mod status;
