//! One conformance suite for every store backend: each property is a generic
//! async fn over `Store`, run against the in-memory store and against a real
//! `redis-server` started per test. Redis-only tests (outage, restart) follow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use claude_relay_crds::config::RedisStoreConfig;
use claude_relay_proxy::store::{
    BudgetPeriod, Charges, MemoryStore, QuotaAsk, QuotaDecision, RateDecision, RedisStore,
    Settlement, Store, Usage, day_of, days_of, unix_ms,
};
use claude_relay_testkit::redis::RedisServer;
use futures_util::future::join_all;

const TTL: Duration = Duration::from_secs(60);

fn redis_config(url: &str) -> RedisStoreConfig {
    serde_json::from_value(serde_json::json!({
        "url": url,
        "pool_size": 4,
        "connect_timeout": "1s",
        "command_timeout": "250ms",
        "reconnect": {"min_delay": "50ms", "max_delay": "300ms"},
    }))
    .unwrap()
}

async fn redis_store(server: &RedisServer) -> RedisStore {
    let store = RedisStore::connect(&redis_config(&server.url()), "test/relay")
        .await
        .unwrap();
    assert!(store.is_connected());
    store
}

async fn nonce_is_accepted_once<S: Store>(store: Arc<S>) {
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000001", TTL)
            .await,
        Ok(true)
    );
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000001", TTL)
            .await,
        Ok(false)
    );
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000001", TTL)
            .await,
        Ok(false)
    );
    // Another nonce, and the same nonce of another client, are fresh.
    assert_eq!(
        store
            .claim_nonce("app", "nonce-0000000000000002", TTL)
            .await,
        Ok(true)
    );
    assert_eq!(
        store
            .claim_nonce("other", "nonce-0000000000000001", TTL)
            .await,
        Ok(true)
    );
}

async fn concurrent_claims_have_exactly_one_winner<S: Store + 'static>(store: Arc<S>) {
    for round in 0..20 {
        let nonce = format!("race-{round:016}");
        let claims = (0..50).map(|_| {
            let store = store.clone();
            let nonce = nonce.clone();
            // Spawned, so claims run in parallel on the runtime's threads.
            tokio::spawn(async move { store.claim_nonce("app", &nonce, TTL).await })
        });
        let results: Vec<bool> = join_all(claims)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let winners = results.iter().filter(|fresh| **fresh).count();
        assert_eq!(winners, 1, "round {round}: {winners} claims won");
    }
}

/// Claims arriving together (a store may send them as one batch): three
/// clients, the same nonce names in each, every claim twice, more than one
/// batch holds. Each (client, nonce) has exactly one winner.
async fn a_crowd_of_claims_has_one_winner_per_client_and_nonce<S: Store + 'static>(store: Arc<S>) {
    let claims = ["app", "other", "third"]
        .into_iter()
        .flat_map(|client| (0..100).flat_map(move |i| [(client, i), (client, i)]));
    let claims: Vec<_> = claims
        .map(|(client, i)| {
            let store = store.clone();
            let nonce = format!("crowd-{i:016}");
            let claimed = tokio::spawn(async move { store.claim_nonce(client, &nonce, TTL).await });
            ((client, i), claimed)
        })
        .collect();
    let mut winners = std::collections::HashMap::new();
    for (claim, claimed) in claims {
        let fresh = claimed.await.unwrap().unwrap();
        *winners.entry(claim).or_insert(0) += usize::from(fresh);
    }
    assert_eq!(winners.len(), 300);
    assert!(winners.values().all(|&n| n == 1), "{winners:?}");
}

async fn nonce_is_forgotten_after_its_ttl<S: Store>(store: Arc<S>) {
    let ttl = Duration::from_millis(300);
    assert_eq!(
        store.claim_nonce("app", "short-lived-00000001", ttl).await,
        Ok(true)
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        store.claim_nonce("app", "short-lived-00000001", ttl).await,
        Ok(false)
    );
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(
        store.claim_nonce("app", "short-lived-00000001", ttl).await,
        Ok(true)
    );
}

async fn rate_limit_window_and_retry_after<S: Store>(store: Arc<S>) {
    let window = Duration::from_millis(800);
    let start = Instant::now();
    for remaining in [2, 1, 0] {
        let decision = store.hit_rate_limit("app", 3, window).await.unwrap();
        assert_eq!(
            decision,
            RateDecision {
                allowed: true,
                remaining,
                retry_after: None
            }
        );
    }
    let refused = store.hit_rate_limit("app", 3, window).await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let retry_after = refused.retry_after.expect("a refusal says when to retry");
    assert!(
        retry_after > Duration::ZERO && retry_after <= window,
        "{retry_after:?}"
    );
    assert!(retry_after + start.elapsed() >= window - Duration::from_millis(50));
    // Another client has its own window.
    assert!(
        store
            .hit_rate_limit("other", 3, window)
            .await
            .unwrap()
            .allowed
    );
    // Once the window is over, requests pass again.
    tokio::time::sleep(retry_after + Duration::from_millis(50)).await;
    let again = store.hit_rate_limit("app", 3, window).await.unwrap();
    assert!(again.allowed, "{again:?}");
    assert_eq!(again.remaining, 2);
}

async fn rate_limit_holds_under_concurrency<S: Store + 'static>(store: Arc<S>) {
    let hits = (0..40).map(|_| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .hit_rate_limit("busy", 10, Duration::from_secs(30))
                .await
        })
    });
    let allowed = join_all(hits)
        .await
        .into_iter()
        .filter(|r| r.as_ref().unwrap().as_ref().unwrap().allowed)
        .count();
    assert_eq!(allowed, 10);
}

/// A minute boundary 45 s ago at the latest: windows are calendar minutes.
fn at_second_45() -> u64 {
    let now = unix_ms();
    now - now % 60_000 + 45_000
}

fn ask<'a>(slot: &'a str, now_ms: u64, tpm: u64, tpd: u64, max_concurrent: u32) -> QuotaAsk<'a> {
    QuotaAsk {
        tokens_per_minute: tpm,
        tokens_per_day: tpd,
        max_concurrent,
        usd_nanos_per_day: 0,
        usd_nanos_per_month: 0,
        slot,
        now_ms,
        lease_until_ms: now_ms + 60_000,
    }
}

fn settlement(tokens: u64, now_ms: u64) -> Settlement<'static> {
    Settlement {
        quota_tokens: tokens,
        quota_nanos: 0,
        usage: None,
        slot: None,
        now_ms,
        retention: Duration::from_secs(86_400 * 30),
    }
}

fn charge(tokens: u64, now_ms: u64) -> Charges {
    Charges::of(&settlement(tokens, now_ms))
}

async fn budgets_refuse_once_spent_until_the_window_ends<S: Store>(store: Arc<S>) {
    let now = at_second_45();
    let check = |now: u64| {
        let store = store.clone();
        async move {
            store
                .check_quota("app", &ask("s", now, 100, 150, 0))
                .await
                .unwrap()
        }
    };
    assert_eq!(check(now).await, QuotaDecision::Allowed);
    store.settle("app", &charge(60, now)).await.unwrap();
    assert_eq!(check(now).await, QuotaDecision::Allowed, "60 of 100 spent");
    store.settle("app", &charge(50, now)).await.unwrap();
    assert_eq!(
        check(now).await,
        QuotaDecision::OverBudget {
            per: BudgetPeriod::Minute,
            retry_after: Duration::from_secs(15)
        }
    );
    // Another client has its own budget.
    assert_eq!(
        store
            .check_quota("other", &ask("s", now, 100, 150, 0))
            .await,
        Ok(QuotaDecision::Allowed)
    );
    // The next minute has a fresh minute budget, but the day's 150 is spent after 50 more.
    let next_minute = now + 20_000;
    assert_eq!(check(next_minute).await, QuotaDecision::Allowed);
    store.settle("app", &charge(50, next_minute)).await.unwrap();
    let (_, day_left) = day_of(next_minute);
    assert_eq!(
        check(next_minute).await,
        QuotaDecision::OverBudget {
            per: BudgetPeriod::Day,
            retry_after: day_left
        }
    );
}

const DAY_MS: u64 = 86_400_000;
const USD: u64 = 1_000_000_000;

/// Charges `nanos` to the dollar budgets of `client` at `now_ms`.
async fn spend<S: Store>(store: &S, client: &str, nanos: u64, now_ms: u64) {
    let charge = Charges::of(&Settlement {
        quota_nanos: nanos,
        ..settlement(0, now_ms)
    });
    store.settle(client, &charge).await.unwrap();
}

async fn dollar_budgets_refuse_once_spent_until_the_day_or_month_ends<S: Store>(store: Arc<S>) {
    // Noon UTC on 2026-11-10 and the day after: one month, two days.
    let noon = days_of("2026-11-10").unwrap() * DAY_MS + DAY_MS / 2;
    let next_noon = noon + DAY_MS;
    let dollars = |slot, now, max_concurrent| QuotaAsk {
        usd_nanos_per_day: USD,
        usd_nanos_per_month: 3 * USD / 2,
        ..ask(slot, now, 0, 0, max_concurrent)
    };
    let check = |now: u64| {
        let store = store.clone();
        async move {
            store
                .check_quota("app", &dollars("s", now, 0))
                .await
                .unwrap()
        }
    };
    assert_eq!(check(noon).await, QuotaDecision::Allowed);
    spend(&*store, "app", 600_000_000, noon).await;
    assert_eq!(check(noon).await, QuotaDecision::Allowed, "$0.60 of $1");
    spend(&*store, "app", 500_000_000, noon).await;
    assert_eq!(
        check(noon).await,
        QuotaDecision::OverBudget {
            per: BudgetPeriod::UsdDay,
            retry_after: Duration::from_millis(DAY_MS / 2)
        }
    );
    // A refused request takes no concurrency slot.
    assert_eq!(
        store.check_quota("app", &dollars("refused", noon, 1)).await,
        Ok(QuotaDecision::OverBudget {
            per: BudgetPeriod::UsdDay,
            retry_after: Duration::from_millis(DAY_MS / 2)
        })
    );
    assert_eq!(
        store.check_quota("app", &ask("free", noon, 0, 0, 1)).await,
        Ok(QuotaDecision::Allowed)
    );
    // Dollars are not tokens: the token budget of the day is untouched.
    assert_eq!(
        store.check_quota("app", &ask("t", noon, 0, 1, 0)).await,
        Ok(QuotaDecision::Allowed)
    );
    // Another client has its own budget.
    assert_eq!(
        store.check_quota("other", &dollars("s", noon, 0)).await,
        Ok(QuotaDecision::Allowed)
    );
    // The next day has a fresh day budget; the month's $1.50 is spent
    // after $0.40 more ($1.10 + $0.40), until December.
    assert_eq!(check(next_noon).await, QuotaDecision::Allowed);
    spend(&*store, "app", 399_999_999, next_noon).await;
    assert_eq!(
        check(next_noon).await,
        QuotaDecision::Allowed,
        "a nano-dollar short"
    );
    spend(&*store, "app", 1, next_noon).await;
    let december = days_of("2026-12-01").unwrap() * DAY_MS;
    assert_eq!(
        check(next_noon).await,
        QuotaDecision::OverBudget {
            per: BudgetPeriod::UsdMonth,
            retry_after: Duration::from_millis(december - next_noon)
        }
    );
    // December starts afresh.
    assert_eq!(check(december).await, QuotaDecision::Allowed);
}

async fn concurrency_cap_holds_and_slots_come_back<S: Store + 'static>(store: Arc<S>) {
    let now = unix_ms();
    let asks = (0..20).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let slot = format!("slot-{i}");
            let decision = store.check_quota("busy", &ask(&slot, now, 0, 0, 5)).await;
            (slot, decision.unwrap())
        })
    });
    let results: Vec<(String, QuotaDecision)> = join_all(asks)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let allowed: Vec<&String> = results
        .iter()
        .filter(|(_, d)| *d == QuotaDecision::Allowed)
        .map(|(s, _)| s)
        .collect();
    assert_eq!(allowed.len(), 5, "{results:?}");
    assert!(
        results
            .iter()
            .all(|(_, d)| matches!(d, QuotaDecision::Allowed | QuotaDecision::OverConcurrency))
    );
    // Releasing one slot lets exactly one more in.
    let release = Charges::of(&Settlement {
        slot: Some(allowed[0].as_str()),
        ..settlement(0, now)
    });
    store.settle("busy", &release).await.unwrap();
    assert_eq!(
        store
            .check_quota("busy", &ask("late-1", now, 0, 0, 5))
            .await,
        Ok(QuotaDecision::Allowed)
    );
    assert_eq!(
        store
            .check_quota("busy", &ask("late-2", now, 0, 0, 5))
            .await,
        Ok(QuotaDecision::OverConcurrency)
    );
}

async fn a_released_slot_is_free_at_once<S: Store>(store: Arc<S>) {
    let now = unix_ms();
    let take = |slot| ask(slot, now, 0, 0, 1);
    assert_eq!(
        store.check_quota("one", &take("first")).await,
        Ok(QuotaDecision::Allowed)
    );
    assert_eq!(
        store.check_quota("one", &take("second")).await,
        Ok(QuotaDecision::OverConcurrency)
    );
    store.release_slot("one", "first").await.unwrap();
    assert_eq!(
        store.check_quota("one", &take("third")).await,
        Ok(QuotaDecision::Allowed)
    );
    // Releasing twice, or a slot never held, changes nothing.
    store.release_slot("one", "first").await.unwrap();
    store.release_slot("nobody", "never").await.unwrap();
    assert_eq!(
        store.check_quota("one", &take("fourth")).await,
        Ok(QuotaDecision::OverConcurrency)
    );
}

async fn slot_leases_lapse_unless_renewed<S: Store>(store: Arc<S>) {
    let now = unix_ms();
    let short = |slot, now: u64| QuotaAsk {
        lease_until_ms: now + 300,
        ..ask(slot, now, 0, 0, 1)
    };
    assert_eq!(
        store.check_quota("lease", &short("crashed", now)).await,
        Ok(QuotaDecision::Allowed)
    );
    assert_eq!(
        store
            .check_quota("lease", &short("second", now + 100))
            .await,
        Ok(QuotaDecision::OverConcurrency)
    );
    // The holder never released it (its replica died): the lease lapses.
    assert_eq!(
        store.check_quota("lease", &short("third", now + 400)).await,
        Ok(QuotaDecision::Allowed)
    );
    // A renewed lease holds.
    store
        .renew_slots("lease", &["third".to_string()], now + 60_000)
        .await
        .unwrap();
    assert_eq!(
        store
            .check_quota("lease", &short("fourth", now + 1_000))
            .await,
        Ok(QuotaDecision::OverConcurrency)
    );
}

async fn usage_adds_up_per_client_per_day<S: Store>(store: Arc<S>) {
    let now = unix_ms();
    let (today, _) = day_of(now);
    let usage = |i, o, c, r| Usage {
        input_tokens: i,
        output_tokens: o,
        cache_creation_input_tokens: c,
        cache_read_input_tokens: r,
        cache_creation_1h_input_tokens: 0,
    };
    // Requests settle one by one, or several in one batch, alike.
    let mut batch = Charges::default();
    for (client, model, u) in [
        ("app", "claude-a", usage(10, 20, 3, 4)),
        ("app", "claude-b", usage(1, 2, 0, 0)),
        ("app", "claude-a", usage(100, 200, 0, 40)),
        ("other", "claude-a", usage(7, 7, 7, 7)),
    ] {
        let one = Settlement {
            usage: Some((model, u, u.input_tokens * 3_000)),
            ..settlement(0, now)
        };
        if client == "app" && model == "claude-a" {
            batch.add(&one);
        } else {
            store.settle(client, &Charges::of(&one)).await.unwrap();
        }
    }
    store.settle("app", &batch).await.unwrap();
    let mut counters = store.usage("app", &today).await.unwrap();
    counters.sort();
    let get = |name: &str| {
        counters
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {name} in {counters:?}"))
    };
    assert_eq!(get("requests"), 3);
    assert_eq!(get("input_tokens"), 111);
    assert_eq!(get("output_tokens"), 222);
    assert_eq!(get("cache_creation_input_tokens"), 3);
    assert_eq!(get("cache_read_input_tokens"), 44);
    assert_eq!(get("claude-a/requests"), 2);
    assert_eq!(get("claude-a/input_tokens"), 110);
    assert_eq!(get("claude-b/output_tokens"), 2);
    // The cost, in nano-dollars, adds up like the tokens.
    assert_eq!(get("cost_nanousd"), 111 * 3_000);
    assert_eq!(get("claude-a/cost_nanousd"), 110 * 3_000);
    assert_eq!(store.usage("app", "2001-01-01").await.unwrap(), vec![]);
    let other = store.usage("other", &today).await.unwrap();
    assert!(
        other.contains(&("input_tokens".to_string(), 7)),
        "{other:?}"
    );
}

/// Instantiates each property as a test for the memory store and for Redis.
macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    super::$property(std::sync::Arc::new(super::MemoryStore::new(10_000))).await;
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $property() {
                    let server = super::RedisServer::start().unwrap();
                    let store = super::redis_store(&server).await;
                    super::$property(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

conformance!(
    nonce_is_accepted_once,
    concurrent_claims_have_exactly_one_winner,
    a_crowd_of_claims_has_one_winner_per_client_and_nonce,
    nonce_is_forgotten_after_its_ttl,
    rate_limit_window_and_retry_after,
    rate_limit_holds_under_concurrency,
    budgets_refuse_once_spent_until_the_window_ends,
    dollar_budgets_refuse_once_spent_until_the_day_or_month_ends,
    concurrency_cap_holds_and_slots_come_back,
    a_released_slot_is_free_at_once,
    slot_leases_lapse_unless_renewed,
    usage_adds_up_per_client_per_day,
);

// Level 2 of the response cache lives in Redis only (level 1 is the
// process's own memory), so these run against Redis alone.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_entries_live_for_their_ttl_and_purge_by_scope() {
    let server = RedisServer::start().unwrap();
    let store = redis_store(&server).await;
    let key = |scope: &str, n: u8| format!("claude-relay:test/relay:cache:{scope}:{n:064x}");
    let body = bytes::Bytes::from_static(b"{\"type\":\"message\"}");
    store
        .cache_put(
            &key("client:app", 1),
            body.clone(),
            Duration::from_millis(400),
        )
        .await
        .unwrap();
    store
        .cache_put(&key("client:app", 2), body.clone(), TTL)
        .await
        .unwrap();
    store
        .cache_put(&key("client:other", 1), body.clone(), TTL)
        .await
        .unwrap();
    store
        .cache_put(&key("shared", 1), body.clone(), TTL)
        .await
        .unwrap();
    assert_eq!(
        store.cache_get(&key("client:app", 1)).await,
        Ok(Some(body.clone()))
    );
    assert_eq!(store.cache_get(&key("client:app", 9)).await, Ok(None));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        store.cache_get(&key("client:app", 1)).await,
        Ok(None),
        "past its TTL"
    );
    assert_eq!(store.cache_purge(Some("client:app")).await, Ok(1));
    assert_eq!(store.cache_get(&key("client:app", 2)).await, Ok(None));
    assert_eq!(
        store.cache_get(&key("client:other", 1)).await,
        Ok(Some(body.clone()))
    );
    assert_eq!(store.cache_purge(None).await, Ok(2));
    assert_eq!(store.cache_get(&key("shared", 1)).await, Ok(None));
    // Other keys of the relay are not cache entries.
    assert!(store.hit_rate_limit("app", 5, TTL).await.unwrap().allowed);
    assert_eq!(store.cache_purge(None).await, Ok(0));
    assert_eq!(
        store.hit_rate_limit("app", 5, TTL).await.unwrap().remaining,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_budgets_slots_and_usage() {
    let server = RedisServer::start().unwrap();
    let a = redis_store(&server).await;
    let b = redis_store(&server).await;
    let now = at_second_45();
    a.settle("app", &charge(80, now)).await.unwrap();
    b.settle("app", &charge(30, now)).await.unwrap();
    assert!(matches!(
        a.check_quota("app", &ask("x", now, 100, 0, 0)).await,
        Ok(QuotaDecision::OverBudget {
            per: BudgetPeriod::Minute,
            ..
        })
    ));
    assert_eq!(
        a.check_quota("app", &ask("s1", now, 0, 0, 2)).await,
        Ok(QuotaDecision::Allowed)
    );
    assert_eq!(
        b.check_quota("app", &ask("s2", now, 0, 0, 2)).await,
        Ok(QuotaDecision::Allowed)
    );
    assert_eq!(
        a.check_quota("app", &ask("s3", now, 0, 0, 2)).await,
        Ok(QuotaDecision::OverConcurrency)
    );
    // One admission script carries nonce, rate and quota together.
    let admission = b
        .admit(
            "app",
            Some(("quota-nonce-0000001", TTL)),
            Some((10, TTL)),
            Some(&ask("s4", now, 0, 0, 2)),
        )
        .await
        .unwrap();
    assert_eq!(admission.nonce_fresh, Some(true));
    assert_eq!(admission.rate.map(|r| r.allowed), Some(true));
    assert_eq!(admission.quota, Some(QuotaDecision::OverConcurrency));
    let replay = a
        .admit(
            "app",
            Some(("quota-nonce-0000001", TTL)),
            Some((10, TTL)),
            Some(&ask("s5", now, 0, 0, 2)),
        )
        .await
        .unwrap();
    assert_eq!((replay.nonce_fresh, replay.quota), (Some(false), None));
}

/// Waits until the store answers again after Redis came back.
async fn until_it_works(store: &RedisStore, nonce: &str) -> Duration {
    let start = Instant::now();
    loop {
        match store.claim_nonce("app", nonce, TTL).await {
            Ok(fresh) => {
                assert!(fresh);
                return start.elapsed();
            }
            Err(e) => {
                assert!(e.transient, "{e}");
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "still failing: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_fast_and_recovers_without_a_new_store() {
    let mut server = RedisServer::start().unwrap();
    let store = redis_store(&server).await;
    assert_eq!(
        store.claim_nonce("app", "before-outage-00001", TTL).await,
        Ok(true)
    );
    assert!(store.hit_rate_limit("app", 5, TTL).await.unwrap().allowed);

    server.stop().unwrap();
    for i in 0..5 {
        let start = Instant::now();
        let err = store
            .claim_nonce("app", &format!("during-outage-{i:04}"), TTL)
            .await
            .unwrap_err();
        assert!(err.transient, "{err}");
        assert!(
            start.elapsed() < Duration::from_millis(500),
            "took {:?}",
            start.elapsed()
        );
        let err = store.hit_rate_limit("app", 5, TTL).await.unwrap_err();
        assert!(err.transient, "{err}");
    }

    server.restart().unwrap();
    until_it_works(&store, "after-outage-000001").await;
    assert!(store.is_connected());
    // The restarted Redis has an empty script cache: the rate-limit script
    // must load itself again.
    let decision = store.hit_rate_limit("app", 5, TTL).await.unwrap();
    assert_eq!(decision.remaining, 4);
    assert_eq!(
        store.claim_nonce("app", "after-outage-000001", TTL).await,
        Ok(false)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_created_while_redis_is_down_connects_later() {
    let mut server = RedisServer::start().unwrap();
    server.stop().unwrap();
    let start = Instant::now();
    let store = RedisStore::connect(&redis_config(&server.url()), "test/relay")
        .await
        .expect("an unreachable Redis is not a config error");
    assert!(start.elapsed() < Duration::from_secs(3));
    assert!(!store.is_connected());
    let err = store
        .claim_nonce("app", "early-nonce-000001", TTL)
        .await
        .unwrap_err();
    assert!(err.transient, "{err}");

    server.restart().unwrap();
    until_it_works(&store, "late-nonce-0000001").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_share_nonces_and_limits() {
    let server = RedisServer::start().unwrap();
    let a = Arc::new(redis_store(&server).await);
    let b = Arc::new(redis_store(&server).await);
    for round in 0..20 {
        let nonce = format!("shared-{round:016}");
        let (x, y) = tokio::join!(
            a.claim_nonce("app", &nonce, TTL),
            b.claim_nonce("app", &nonce, TTL)
        );
        assert!(
            x.unwrap() ^ y.unwrap(),
            "round {round}: not exactly one winner"
        );
    }
    let mut allowed = 0;
    for i in 0..10 {
        let store = if i % 2 == 0 { &a } else { &b };
        allowed += usize::from(store.hit_rate_limit("app", 4, TTL).await.unwrap().allowed);
    }
    assert_eq!(allowed, 4);

    // Another relay name is another key space.
    let other = RedisStore::connect(&redis_config(&server.url()), "other/relay")
        .await
        .unwrap();
    assert_eq!(
        other
            .claim_nonce("app", "shared-0000000000000000", TTL)
            .await,
        Ok(true)
    );
}
