//! The in-process store: the semantics of the Redis store for one replica.
//!
//! Memory is bounded: nonces expire (a min-heap of expiry times drops them
//! in order), and at most `max_entries` are held. When full, a claim fails
//! with a transient error instead of forgetting a live nonce early, which
//! would let a replay through.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use super::{
    BudgetPeriod, Charges, QuotaAsk, QuotaDecision, RateDecision, Store, StoreError, day_of,
    minute_of, month_of,
};

/// Independent locks, so concurrent requests rarely wait on each other.
const SHARDS: usize = 16;
/// Rate windows kept before ended ones are swept (client ids come from the
/// config, so this is only reached after many config changes).
const MAX_RATE_WINDOWS: usize = 10_000;

pub struct MemoryStore {
    shards: Box<[Mutex<NonceShard>]>,
    max_per_shard: usize,
    hasher: RandomState,
    rates: Mutex<HashMap<String, RateWindow>>,
    budgets: Mutex<HashMap<String, Budget>>,
    /// (client, day) → counter → count.
    usage: Mutex<HashMap<(String, String), HashMap<String, u64>>>,
}

/// A client's spending in the current minute and day (tokens), day and
/// month (nano-dollars; days since the epoch, `month_index`), and its slots.
#[derive(Default)]
struct Budget {
    minute: (u64, u64),
    day: (String, u64),
    usd_day: (u64, u64),
    usd_month: (u64, u64),
    /// Slot → unix ms when its lease lapses.
    slots: HashMap<String, u64>,
}

#[derive(Default)]
struct NonceShard {
    expires: HashMap<String, Instant>,
    by_expiry: BinaryHeap<Reverse<(Instant, String)>>,
}

struct RateWindow {
    count: u32,
    ends: Instant,
}

impl MemoryStore {
    /// A store holding at most about `max_entries` nonces at once.
    pub fn new(max_entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            max_per_shard: max_entries.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
            rates: Mutex::default(),
            budgets: Mutex::default(),
            usage: Mutex::default(),
        }
    }

    fn quota(&self, client: &str, ask: &QuotaAsk<'_>) -> QuotaDecision {
        let (minute, minute_left) = minute_of(ask.now_ms);
        let (day, day_left) = day_of(ask.now_ms);
        let mut budgets = lock(&self.budgets);
        let budget = budgets.entry(client.to_owned()).or_default();
        let spent_minute = if budget.minute.0 == minute {
            budget.minute.1
        } else {
            0
        };
        let spent_day = if budget.day.0 == day { budget.day.1 } else { 0 };
        if ask.tokens_per_minute > 0 && spent_minute >= ask.tokens_per_minute {
            return QuotaDecision::OverBudget {
                per: BudgetPeriod::Minute,
                retry_after: minute_left,
            };
        }
        if ask.tokens_per_day > 0 && spent_day >= ask.tokens_per_day {
            return QuotaDecision::OverBudget {
                per: BudgetPeriod::Day,
                retry_after: day_left,
            };
        }
        let today = ask.now_ms / 86_400_000;
        let (month, month_left) = month_of(ask.now_ms);
        let spent = |(at, n): (u64, u64), now| if at == now { n } else { 0 };
        if ask.usd_nanos_per_day > 0 && spent(budget.usd_day, today) >= ask.usd_nanos_per_day {
            return QuotaDecision::OverBudget {
                per: BudgetPeriod::UsdDay,
                retry_after: day_left,
            };
        }
        if ask.usd_nanos_per_month > 0 && spent(budget.usd_month, month) >= ask.usd_nanos_per_month
        {
            return QuotaDecision::OverBudget {
                per: BudgetPeriod::UsdMonth,
                retry_after: month_left,
            };
        }
        if ask.max_concurrent > 0 {
            budget.slots.retain(|_, until| *until > ask.now_ms);
            if budget.slots.len() >= ask.max_concurrent as usize {
                return QuotaDecision::OverConcurrency;
            }
            budget.slots.insert(ask.slot.to_owned(), ask.lease_until_ms);
        }
        QuotaDecision::Allowed
    }

    /// Releases a slot at once (see [`Store::release_slot`]).
    pub fn release(&self, client: &str, slot: &str) {
        if let Some(budget) = lock(&self.budgets).get_mut(client) {
            budget.slots.remove(slot);
        }
    }

    /// Settles at once (the store is in this process).
    pub fn apply(&self, client: &str, charges: &Charges) {
        {
            let mut budgets = lock(&self.budgets);
            let budget = budgets.entry(client.to_owned()).or_default();
            for slot in &charges.release {
                budget.slots.remove(slot);
            }
            // Only the current minute and day are kept: older charges are moot.
            for (&minute, &tokens) in &charges.minutes {
                if budget.minute.0 < minute {
                    budget.minute = (minute, 0);
                }
                if budget.minute.0 == minute {
                    budget.minute.1 = budget.minute.1.saturating_add(tokens);
                }
            }
            for (&day, &tokens) in &charges.days {
                let day = super::civil_date(day);
                if budget.day.0 < day {
                    budget.day = (day.clone(), 0);
                }
                if budget.day.0 == day {
                    budget.day.1 = budget.day.1.saturating_add(tokens);
                }
            }
            for (kept, charged) in [
                (&mut budget.usd_day, &charges.usd_days),
                (&mut budget.usd_month, &charges.usd_months),
            ] {
                for (&at, &nanos) in charged {
                    if kept.0 < at {
                        *kept = (at, 0);
                    }
                    if kept.0 == at {
                        kept.1 = kept.1.saturating_add(nanos);
                    }
                }
            }
        }
        if charges.usage.is_empty() {
            return;
        }
        let mut all = lock(&self.usage);
        let retention_days = charges.retention.as_secs().div_ceil(86_400);
        let today = super::unix_ms() / 86_400_000;
        for (day, models) in &charges.usage {
            let key = (client.to_owned(), super::civil_date(*day));
            if !all.contains_key(&key) {
                // A new day: forget the days past retention.
                all.retain(|(_, d), _| {
                    super::days_of(d).is_some_and(|d| d + retention_days > today)
                });
            }
            let mine = all.entry(key).or_default();
            for (field, n) in Charges::usage_fields(models) {
                *mine.entry(field).or_default() += n;
            }
        }
    }

    /// Nonces currently remembered, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).expires.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn claim(&self, client: &str, nonce: &str, ttl: Duration) -> Result<bool, StoreError> {
        // The length prefix keeps ("ab", "c") and ("a", "bc") apart.
        let key = format!("{}:{client}{nonce}", client.len());
        let shard = &self.shards[self.hasher.hash_one(&key) as usize % SHARDS];
        let mut shard = lock(shard);
        let now = Instant::now();
        shard.sweep(now);
        let full = shard.expires.len() >= self.max_per_shard;
        let expiry = now + ttl;
        match shard.expires.entry(key) {
            // Swept above, so an entry still here is live.
            Entry::Occupied(_) => Ok(false),
            Entry::Vacant(_) if full => Err(StoreError::transient(
                "the in-memory nonce store is full; raise store.memory.max_entries",
            )),
            Entry::Vacant(vacant) => {
                let key = vacant.key().clone();
                vacant.insert(expiry);
                shard.by_expiry.push(Reverse((expiry, key)));
                Ok(true)
            }
        }
    }

    fn hit(&self, client: &str, limit: u32, window: Duration) -> RateDecision {
        let now = Instant::now();
        let mut rates = lock(&self.rates);
        if rates.len() >= MAX_RATE_WINDOWS && !rates.contains_key(client) {
            rates.retain(|_, w| w.ends > now);
        }
        let entry = rates.entry(client.to_owned()).or_insert(RateWindow {
            count: 0,
            ends: now + window,
        });
        if entry.ends <= now {
            *entry = RateWindow {
                count: 0,
                ends: now + window,
            };
        }
        entry.count = entry.count.saturating_add(1);
        let allowed = entry.count <= limit;
        RateDecision {
            allowed,
            remaining: limit.saturating_sub(entry.count),
            retry_after: (!allowed).then(|| entry.ends - now),
        }
    }
}

impl NonceShard {
    /// Drops every nonce whose time is up, oldest first.
    fn sweep(&mut self, now: Instant) {
        while let Some(Reverse((expiry, _))) = self.by_expiry.peek() {
            if *expiry > now {
                break;
            }
            let Some(Reverse((expiry, key))) = self.by_expiry.pop() else {
                break;
            };
            // Only if not claimed again since, with a later expiry.
            if self.expires.get(&key) == Some(&expiry) {
                self.expires.remove(&key);
            }
        }
    }
}

/// A panic while holding the lock leaves the maps consistent (every update
/// is a single insert or remove), so poisoning is ignored.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("max_entries", &(self.max_per_shard * SHARDS))
            .finish_non_exhaustive()
    }
}

impl Store for MemoryStore {
    async fn claim_nonce(
        &self,
        client: &str,
        nonce: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        self.claim(client, nonce, ttl)
    }

    async fn hit_rate_limit(
        &self,
        client: &str,
        limit: u32,
        window: Duration,
    ) -> Result<RateDecision, StoreError> {
        Ok(self.hit(client, limit, window))
    }

    async fn check_quota(
        &self,
        client: &str,
        ask: &QuotaAsk<'_>,
    ) -> Result<QuotaDecision, StoreError> {
        Ok(self.quota(client, ask))
    }

    async fn settle(&self, client: &str, charges: &Charges) -> Result<(), StoreError> {
        self.apply(client, charges);
        Ok(())
    }

    async fn release_slot(&self, client: &str, slot: &str) -> Result<(), StoreError> {
        self.release(client, slot);
        Ok(())
    }

    async fn renew_slots(
        &self,
        client: &str,
        slots: &[String],
        until_ms: u64,
    ) -> Result<(), StoreError> {
        if let Some(budget) = lock(&self.budgets).get_mut(client) {
            for slot in slots {
                if let Some(until) = budget.slots.get_mut(slot) {
                    *until = until_ms;
                }
            }
        }
        Ok(())
    }

    async fn usage(&self, client: &str, day: &str) -> Result<Vec<(String, u64)>, StoreError> {
        Ok(lock(&self.usage)
            .get(&(client.to_owned(), day.to_owned()))
            .map(|c| c.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(600);

    #[tokio::test(start_paused = true)]
    async fn expired_nonces_free_their_memory() {
        let store = MemoryStore::new(1000);
        for i in 0..100 {
            assert_eq!(store.claim("app", &format!("nonce-{i:016}"), TTL), Ok(true));
        }
        assert_eq!(store.len(), 100);
        tokio::time::advance(TTL + Duration::from_millis(1)).await;
        // Each shard sweeps on its next claim; claim in every shard.
        for i in 100..400 {
            store.claim("app", &format!("nonce-{i:016}"), TTL).unwrap();
        }
        assert_eq!(store.len(), 300, "the first 100 should be gone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_store_refuses_rather_than_forgets() {
        let store = MemoryStore::new(SHARDS); // one nonce per shard
        let mut claimed = Vec::new();
        let mut refused = 0;
        // Enough nonces that every shard surely fills up.
        for i in 0..SHARDS * 32 {
            let nonce = format!("nonce-{i:016}");
            match store.claim("app", &nonce, TTL) {
                Ok(fresh) => {
                    assert!(fresh);
                    claimed.push(nonce);
                }
                Err(e) => {
                    assert!(e.transient, "{e}");
                    refused += 1;
                }
            }
        }
        assert!(refused > 0);
        assert_eq!(claimed.len(), SHARDS);
        assert_eq!(store.len(), SHARDS);
        // Every nonce it holds is still refused as a replay.
        for nonce in &claimed {
            assert_eq!(store.claim("app", nonce, TTL), Ok(false));
        }
        // After expiry there is room again.
        tokio::time::advance(TTL).await;
        assert_eq!(store.claim("app", &claimed[0], TTL), Ok(true));
    }

    #[tokio::test(start_paused = true)]
    async fn clients_do_not_share_nonces() {
        let store = MemoryStore::new(100);
        assert_eq!(store.claim("ab", "c-0123456789abcdef", TTL), Ok(true));
        assert_eq!(store.claim("a", "bc-0123456789abcdef", TTL), Ok(true));
        assert_eq!(store.claim("other", "c-0123456789abcdef", TTL), Ok(true));
        assert_eq!(store.claim("ab", "c-0123456789abcdef", TTL), Ok(false));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_window_restarts_after_it_ends() {
        let store = MemoryStore::new(100);
        let window = Duration::from_secs(60);
        assert_eq!(store.hit("app", 2, window).remaining, 1);
        assert!(store.hit("app", 2, window).allowed);
        tokio::time::advance(Duration::from_secs(15)).await;
        let refused = store.hit("app", 2, window);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after, Some(Duration::from_secs(45)));
        tokio::time::advance(Duration::from_secs(45)).await;
        let again = store.hit("app", 2, window);
        assert!(again.allowed);
        assert_eq!(again.remaining, 1);
    }
}
