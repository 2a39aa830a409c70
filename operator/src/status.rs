//! The relay's status, computed from what a reconcile observed. Pure.

use claude_relay_crds::resources::{BreakerState, ClaudeRelayStatus, RegionBreaker};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::events::{Event, EventType};

use crate::breakers;

/// Why a relay cannot be rolled out; it keeps what ran before.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    MissingSecret,
    NoRegionsSelected,
    InvalidSpec,
}

impl Problem {
    pub fn reason(self) -> &'static str {
        match self {
            Problem::MissingSecret => "MissingSecret",
            Problem::NoRegionsSelected => "NoRegionsSelected",
            Problem::InvalidSpec => "InvalidSpec",
        }
    }
}

/// What one reconcile saw.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub generation: Option<i64>,
    pub problem: Option<(Problem, String)>,
    /// Proxy pods wanted and ready, from the Deployment.
    pub desired: i32,
    pub ready: i32,
    /// Names of the selected regions, in config order.
    pub regions: Vec<String>,
    /// Breakers read from Redis; `None` without Redis.
    pub breakers: Option<Vec<RegionBreaker>>,
    /// Set when Redis could not be read.
    pub redis_error: Option<String>,
}

pub fn status(
    previous: Option<&ClaudeRelayStatus>,
    observed: &Observed,
    now: &Time,
) -> ClaudeRelayStatus {
    let previous_conditions = previous
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        let status = if ok { "True" } else { "False" };
        // Keep the transition time unless the status flipped, so an
        // unchanged relay gets a byte-identical status (no write, no event).
        let last_transition_time = previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: observed.generation,
            last_transition_time,
        }
    };

    let (desired, ready) = (observed.desired, observed.ready);
    let open: Vec<&str> = observed
        .breakers
        .iter()
        .flatten()
        .filter(|b| b.state == BreakerState::Open)
        .map(|b| b.region.as_str())
        .collect();

    let conditions = if let Some((problem, message)) = &observed.problem {
        vec![
            condition("Ready", false, problem.reason(), message.clone()),
            condition("Degraded", true, problem.reason(), message.clone()),
        ]
    } else {
        let ready_condition = if ready >= 1 {
            condition(
                "Ready",
                true,
                "ProxiesReady",
                format!("{ready}/{desired} proxy pods ready"),
            )
        } else {
            condition(
                "Ready",
                false,
                "ProxiesNotReady",
                format!("0/{desired} proxy pods ready"),
            )
        };
        let degraded = if let Some(error) = &observed.redis_error {
            condition("Degraded", true, "RedisUnreachable", error.clone())
        } else if !open.is_empty() {
            condition(
                "Degraded",
                true,
                "BreakerOpen",
                format!("breaker open for {}", open.join(", ")),
            )
        } else if ready < desired {
            condition(
                "Degraded",
                true,
                "ReplicasUnavailable",
                format!("{ready}/{desired} proxy pods ready"),
            )
        } else {
            condition(
                "Degraded",
                false,
                "AsExpected",
                "all proxy pods ready, no breaker open".into(),
            )
        };
        vec![ready_condition, degraded]
    };

    let breakers = observed.breakers.clone().unwrap_or_default();
    ClaudeRelayStatus {
        observed_generation: observed.generation,
        conditions,
        replicas: desired,
        ready_replicas: ready,
        replicas_ready: Some(format!("{ready}/{desired}")),
        regions: observed.regions.clone(),
        region_count: observed.regions.len() as i32,
        breaker_summary: (!breakers.is_empty()).then(|| breakers::summary(&breakers)),
        breakers,
    }
}

/// Events for breakers that opened or closed since the previous status.
pub fn breaker_events(previous: &[RegionBreaker], current: &[RegionBreaker]) -> Vec<Event> {
    let mut events = Vec::new();
    for now in current {
        let Some(before) = previous.iter().find(|b| b.region == now.region) else {
            continue;
        };
        let reason_note = match (before.state, now.state) {
            (from, BreakerState::Open)
                if from != BreakerState::Open && from != BreakerState::Unknown =>
            {
                Some((
                    EventType::Warning,
                    "BreakerOpened",
                    format!(
                        "breaker of region {} opened (last error: {})",
                        now.region,
                        now.last_error.as_deref().unwrap_or("unknown")
                    ),
                ))
            }
            (BreakerState::Open | BreakerState::HalfOpen, BreakerState::Closed) => Some((
                EventType::Normal,
                "BreakerClosed",
                format!("breaker of region {} closed", now.region),
            )),
            _ => None,
        };
        if let Some((type_, reason, note)) = reason_note {
            events.push(Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "ReadBreakerState".into(),
                secondary: None,
            });
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn time(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn breaker(region: &str, state: BreakerState) -> RegionBreaker {
        RegionBreaker {
            region: region.into(),
            state,
            failure_rate: None,
            since: None,
            last_error: None,
        }
    }

    #[test]
    fn unchanged_observation_keeps_transition_times() {
        let observed = Observed {
            generation: Some(1),
            desired: 2,
            ready: 2,
            regions: vec!["us".into()],
            ..Default::default()
        };
        let first = status(None, &observed, &time(100));
        let second = status(Some(&first), &observed, &time(200));
        assert_eq!(first, second);
        assert_eq!(first.conditions[0].type_, "Ready");
        assert_eq!(first.conditions[0].status, "True");
        assert_eq!(first.conditions[1].status, "False");
        assert_eq!(first.replicas_ready.as_deref(), Some("2/2"));
    }

    #[test]
    fn open_breaker_degrades_and_problems_are_not_ready() {
        let observed = Observed {
            desired: 2,
            ready: 2,
            breakers: Some(vec![
                breaker("us", BreakerState::Closed),
                breaker("eu", BreakerState::Open),
            ]),
            ..Default::default()
        };
        let s = status(None, &observed, &time(1));
        assert_eq!(s.conditions[1].reason, "BreakerOpen");
        assert_eq!(s.breaker_summary.as_deref(), Some("us:closed eu:open"));

        let observed = Observed {
            problem: Some((Problem::MissingSecret, "Secret x not found".into())),
            ..Default::default()
        };
        let s = status(Some(&s), &observed, &time(2));
        assert_eq!(
            (
                s.conditions[0].status.as_str(),
                s.conditions[0].reason.as_str()
            ),
            ("False", "MissingSecret")
        );
        assert_eq!(s.conditions[0].last_transition_time, time(2));
    }

    #[test]
    fn events_on_open_and_close_only() {
        let before = vec![
            breaker("us", BreakerState::Closed),
            breaker("eu", BreakerState::Open),
        ];
        let after = vec![
            breaker("us", BreakerState::Open),
            breaker("eu", BreakerState::Closed),
        ];
        let reasons: Vec<_> = breaker_events(&before, &after)
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, ["BreakerOpened", "BreakerClosed"]);
        assert!(breaker_events(&after, &after).is_empty());
        // Unknown (no report) to open is not a transition the proxies saw.
        assert!(
            breaker_events(
                &[breaker("us", BreakerState::Unknown)],
                &[breaker("us", BreakerState::Open)]
            )
            .is_empty()
        );
    }
}
