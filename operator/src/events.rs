//! Kubernetes Events about relays (`kubectl describe clauderelay NAME`),
//! through kube-runtime's recorder. Events are published on transitions
//! only (a problem appears, an owned object is created or changed, Redis
//! becomes unreachable, a breaker opens or closes), and the same event for
//! the same relay is sent at most once per [`REPEAT_AFTER`] (kube's
//! recorder then counts repeats within its own window as a series of one
//! Event, keyed by reason and related object, not by note). Notes name
//! objects, regions and Secret keys, never a value.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use claude_relay_crds::ClaudeRelay;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use tracing::warn;

/// How long an identical event for the same relay is held back.
pub const REPEAT_AFTER: Duration = Duration::from_secs(300);

type EventKey = (ObjectRef<ClaudeRelay>, String, Option<String>);

pub struct Events {
    recorder: Recorder,
    /// When each (relay, reason, note) was last sent.
    sent: Mutex<HashMap<EventKey, Instant>>,
}

impl Events {
    pub fn new(recorder: Recorder) -> Self {
        Self {
            recorder,
            sent: Mutex::default(),
        }
    }

    /// Publishes `event` about `relay` unless the same one went out within
    /// [`REPEAT_AFTER`]. Best effort: a failure is logged, never returned.
    pub async fn publish(&self, relay: &ClaudeRelay, event: Event) {
        let key = (
            ObjectRef::from_obj(relay),
            event.reason.clone(),
            event.note.clone(),
        );
        {
            let mut sent = self.sent.lock().expect("event map lock");
            let now = Instant::now();
            sent.retain(|_, at| now.duration_since(*at) < REPEAT_AFTER);
            if sent.contains_key(&key) {
                return;
            }
            sent.insert(key, now);
        }
        if let Err(e) = self.recorder.publish(&event, &relay.object_ref(&())).await {
            warn!(error = %e, reason = %event.reason, "cannot publish event");
        }
    }

    pub async fn warning(&self, relay: &ClaudeRelay, reason: &str, action: &str, note: String) {
        self.publish(relay, event(EventType::Warning, reason, action, note))
            .await;
    }

    /// A normal event about `object`, an object of `relay`: the recorder
    /// keeps one Event per (reason, related object).
    pub async fn about_owned(
        &self,
        relay: &ClaudeRelay,
        object: ObjectReference,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let mut event = event(EventType::Normal, reason, action, note);
        event.secondary = Some(object);
        self.publish(relay, event).await;
    }
}

fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    }
}
