//! The request path of the API listener, in order:
//!
//! 1. **record** — a request id and an [`Exchange`] (in-flight gauge, access
//!    log and request metrics, written when the response body ends).
//! 2. **snapshot** — the config in force is loaded once; the request keeps it.
//! 3. **authenticate** — a signed request (`x-relay-*` headers) names its
//!    client by key id; otherwise a relay key (`x-api-key` or
//!    `Authorization: Bearer`) finds it → client id on the exchange. The
//!    method must be allowed for the client. The relay's own HTTP/1 loop
//!    asks this of the head before it reads a body it does not hold yet
//!    ([`refuse_before_body`]): a refused client is answered 401 and its
//!    connection closed, its body never read.
//! 4. **route** — `x-relay-region` pins a region by name (unknown: 400);
//!    otherwise the region with the lowest priority.
//! 5. **body** — read whole, up to `server.max_body_bytes` (413 past it),
//!    within `server.body_read_timeout` and `server.min_body_rate` (408,
//!    [`crate::http::body_deadline`]).
//! 6. **verify** — a signed request's HMAC over method, path with query,
//!    timestamp (within `replay.window`), nonce and body hash (401 naming
//!    the failed check), all over the bytes as sent. Then a JSON body must
//!    parse (400), so garbage never spends an upstream call; a compressed
//!    one (`Content-Encoding: gzip` or `deflate`) is decoded for this check
//!    and the cache key only, within `server.max_body_bytes` decoded (413),
//!    ([`crate::http::request_encoding`]; other codings 415, corrupt ones 400).
//! 7. **admit** — one store round trip, only when there is something to ask:
//!    the nonce claimed once across replicas (401 on replay), the client's
//!    rate window (429 with retry-after) and its quota: token budgets of the
//!    minute and the day, dollar budgets of the day and the calendar month
//!    (429 with retry-after at the window's end) and a concurrency slot (429). Store down: signed requests 503 (unless
//!    `replay.fail_open`), rate limits fail open, quotas fail open for
//!    `quota.fail_open_grace`, then this replica's own budgets decide.
//!    A request the response cache takes ([`crate::accounting::cache`]) looks in level 1
//!    first (no round trip); a hit there asks only for the nonce and rate.
//!    On a level-1 miss the admission and the level-2 read go to the store
//!    together, one round trip in time; a hit costs no quota (a slot the
//!    store gave goes back) and no upstream call.
//!    → [`crate::accounting::usage::Meter`] on the exchange (client, quota,
//!    prices, slot, cache fill).
//! 8. **forward** — the region's next upstream key replaces the client's
//!    credentials; hop-by-hop headers dropped, everything else passes; a slot
//!    under the region's `max_in_flight`; response headers awaited within
//!    `timeouts.response_headers` (504), connect failures (the region's
//!    egress proxy refusing the tunnel among them) 502. A key's 429 rests
//!    the key and the request goes on with the next free key, then region
//!    (within `routing.max_attempts`); when the route's keys all rest, the
//!    relay's own 429 with `retry-after` at the first key's return.
//! 9. **respond** — status, headers (hop-by-hop dropped) and body passed
//!    through frame by frame ([`RelayBody`]), with the relay's request id
//!    added and `X-Accel-Buffering: no` on event streams. A 2xx Messages
//!    answer gets a [`crate::accounting::usage::UsageTap`] that reads its usage as it
//!    passes (a compressed one decoded on the side, [`crate::http::encoding`]; the
//!    client gets the bytes and `Content-Encoding` as sent); the
//!    concurrency slot goes back before the client sees the end
//!    ([`RelayBody`] waits for the store's answer); when the exchange ends
//!    the meter settles in the background (metrics, budgets, usage
//!    counters, cache fill).
//!
//! Every error becomes a response in the Claude API envelope here, at the
//! edge ([`RelayError::into_response`]); the service never fails.
//!
//! The folders follow these layers, each using only those before it (no
//! import cycles: `scripts/check-module-cycles.sh` checks it in CI):
//! `base` (metrics, secrets, workers) → `store` (shared state) → `http`
//! (HTTP/1 client, headers, codings, bodies, errors) → `upstream` (routing,
//! breakers, key pools, connection pools) → `accounting` (usage, quotas,
//! prices, cache, access record, trace spans) → `admission` (relay keys, signatures) → `control`
//! (config snapshot, reloads, TLS certificates, admin) → this module → `serve`
//! (listeners and the HTTP/1 server, which call [`handle`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::accounting::access::Exchange;
use crate::accounting::cache::{Fill, RELAY_CACHE};
use crate::accounting::usage::{Meter, Quota, SlotHeld, Unchecked, UsageTap};
use crate::admission::auth::Client;
use crate::admission::signing::{self, SignatureHeaders};
use crate::base::metrics::Name;
use crate::base::metrics::QuotaLabels;
use crate::base::metrics::{ClientLabels, ResultLabels, UpstreamErrorLabels, UpstreamLabels};
use crate::control::runtime::{App, Region, Snapshot};
use crate::http::body::RelayBody;
use crate::http::body_deadline::{BodyLate, RequestBody};
use crate::http::encoding::Encoded;
use crate::http::error::{RelayError, SignatureError};
use crate::http::headers::{self, RELAY_REGION, RELAY_REQUEST_ID, X_ACCEL_BUFFERING};
use crate::http::request_encoding::Coding;
use crate::store::{BudgetPeriod, QuotaDecision};
use crate::upstream::breaker::{FailureKind, Outcome, retry_after};
use crate::upstream::keypool::{KeyLease, NoKeyReason};
use crate::upstream::pool::{Outgoing, SendFailure, UpstreamBody, classify};

/// The route label of a path: a fixed set, so metrics stay low-cardinality.
pub fn route_of(path: &str) -> &'static str {
    match path {
        "/v1/messages" => "messages",
        "/v1/messages/count_tokens" => "count_tokens",
        p if p.starts_with("/v1/messages/batches") => "batches",
        p if p.starts_with("/v1/models") => "models",
        p if p.starts_with("/v1/files") => "files",
        _ => "other",
    }
}

pub async fn handle(
    app: Arc<App>,
    request: Request<RequestBody>,
    peer: SocketAddr,
) -> Response<RelayBody> {
    let request_id = app.ids.next();
    let route = route_of(request.uri().path());
    // Boxed: it rides in the response body, which is moved several times.
    let mut exchange = Box::new(Exchange::start(
        app.metrics.clone(),
        request_id.clone(),
        route,
        request.method().clone(),
    ));
    let snapshot = app.snapshot.load_full();
    if let Some(settings) = &snapshot.trace {
        exchange.trace = app.services.tracer.start(
            settings,
            request.headers(),
            request.method(),
            request.uri().path(),
            route,
        );
    }
    // hyper's HTTP/1 server closes a connection whose request body was left
    // unread; the answer says so, so that the client does not reuse it.
    let hyper_http1 = matches!(request.body(), http_body_util::Either::Right(_))
        && request.version() < http::Version::HTTP_2;
    let response = match relay(&app, &snapshot, request, peer, &mut exchange).await {
        Ok(response) => response,
        Err(error) => {
            let body_left_unread = matches!(
                error,
                RelayError::RequestTimeout(_) | RelayError::Unauthenticated(_)
            );
            let mut response = refusal(&app, error, &request_id);
            if hyper_http1 && body_left_unread {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            response
        }
    };
    exchange.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, body.with_exchange(exchange))
}

/// For a server holding a request's head and not yet its body: the answer
/// to a request refused before its body is read (the relay key or the
/// signing key id fails), so that no memory goes to the body of a client
/// that may not send one. `None`: read the body and [`handle`] it; a
/// signature is checked after the body, over it.
pub fn refuse_before_body(
    app: &App,
    method: &Method,
    path: &str,
    headers: &http::HeaderMap,
) -> Option<Response<RelayBody>> {
    let snapshot = app.snapshot.load();
    let controls = headers::has_relay_controls(headers);
    let error = identify(&snapshot, headers, controls).err()?;
    Some(refuse_traced(app, method, path, error, Some(headers)))
}

/// The answer to a request the server refuses itself (too slow, refused
/// before its body), recorded like any other.
pub fn refuse(app: &App, method: &Method, path: &str, error: RelayError) -> Response<RelayBody> {
    refuse_traced(app, method, path, error, None)
}

/// [`refuse`], with a span when the request's head is at hand and traced.
fn refuse_traced(
    app: &App,
    method: &Method,
    path: &str,
    error: RelayError,
    headers: Option<&http::HeaderMap>,
) -> Response<RelayBody> {
    let request_id = app.ids.next();
    let route = route_of(path);
    let mut exchange = Box::new(Exchange::start(
        app.metrics.clone(),
        request_id.clone(),
        route,
        method.clone(),
    ));
    if let (Some(settings), Some(headers)) = (&app.snapshot.load().trace, headers) {
        exchange.trace = app
            .services
            .tracer
            .start(settings, headers, method, path, route);
    }
    let response = refusal(app, error, &request_id);
    exchange.status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, body.with_exchange(exchange))
}

fn refusal(app: &App, error: RelayError, request_id: &str) -> Response<RelayBody> {
    let auth_failure = match &error {
        RelayError::Unauthenticated(reason) => Some(reason_label(reason)),
        RelayError::Signature(error) => Some(error.label()),
        _ => None,
    };
    if let Some(result) = auth_failure {
        app.metrics
            .auth_failures
            .get_or_create(&ResultLabels { result })
            .inc();
    }
    error.into_response(request_id)
}

/// Who sends the request, from its head: the client a signed request names
/// (its signature is verified later, over the body), or the one whose relay
/// key it carries.
fn identify<'a>(
    snapshot: &'a Snapshot,
    headers: &'a http::HeaderMap,
    controls: bool,
) -> Result<(&'a Client, Option<SignatureHeaders<'a>>), RelayError> {
    let signed = if controls {
        SignatureHeaders::from_headers(headers)?
    } else {
        None
    };
    let client = match &signed {
        Some(signature) => snapshot.clients.for_signature(signature.stamp.key_id)?,
        None => snapshot.clients.authenticate(headers)?,
    };
    Ok((client, signed))
}

fn reason_label(reason: &str) -> &'static str {
    if reason.starts_with("no relay key") {
        "missing_key"
    } else if reason.starts_with("this client must sign") {
        "relay_key_not_allowed"
    } else {
        "invalid_key"
    }
}

async fn relay(
    app: &App,
    snapshot: &Snapshot,
    request: Request<RequestBody>,
    peer: SocketAddr,
    exchange: &mut Exchange,
) -> Result<Response<RelayBody>, RelayError> {
    let (parts, body) = request.into_parts();

    // The relay's own headers (`x-relay-*`) are rare: one pass over the
    // names says whether to look for them, instead of a hashed lookup each.
    let controls = headers::has_relay_controls(&parts.headers);
    let (client, signed) = identify(snapshot, &parts.headers, controls)?;
    client
        .requests
        .get_or_init(|| {
            app.metrics
                .client_requests
                .get_or_create(&ClientLabels {
                    client: client.id.clone(),
                })
                .clone()
        })
        .inc();
    exchange.client = Some(client.id.clone());

    let route = choose_route(snapshot, &parts.headers, peer, controls)?;

    let body = read_body(body, &parts.headers, snapshot.config.server.max_body_bytes).await?;
    let replay = &snapshot.config.replay;
    if let Some(signature) = &signed {
        // The body is hashed as received; nothing has gone upstream yet.
        let request = signing::Request {
            method: parts.method.as_str(),
            path_and_query: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            body: &body,
        };
        signing::verify(
            signature,
            &request,
            &client.signing_secrets,
            signing::unix_now(),
            *replay.window,
        )?;
    }
    let must_be_json =
        parts.method == Method::POST && !body.is_empty() && looks_like_json(&parts.headers);
    let cache_wanted = snapshot.cache.wanted(
        client.cache_enabled,
        &parts.method,
        parts.uri.path(),
        controls
            .then(|| parts.headers.get(crate::accounting::cache::RELAY_CACHE))
            .flatten(),
    )?;
    // The readers of the body see it decoded (`Content-Encoding: gzip`);
    // upstream gets the bytes as sent.
    let (decoded, cache_wanted) = if must_be_json || cache_wanted.is_some() {
        match decoded_for_readers(&body, &parts.headers, snapshot.config.server.max_body_bytes)
            .await
        {
            Ok(decoded) => (decoded, cache_wanted),
            Err(error) if must_be_json => return Err(error),
            // Not JSON by its type: it is not cached, nor refused.
            Err(_) => (Bytes::new(), None),
        }
    } else {
        (Bytes::new(), None)
    };
    // The body is parsed once: into a value when the cache keys it, else
    // only checked.
    let cache_plan = match cache_wanted {
        Some(asked) => match serde_json::from_slice::<serde_json::Value>(&decoded) {
            Ok(serde_json::Value::Object(request)) => snapshot.cache.plan_parsed(
                &client.id.0,
                client.cache_enabled,
                asked,
                &parts.headers,
                &request,
            ),
            Ok(_) => None,
            Err(error) if must_be_json => return Err(not_json(&error)),
            Err(_) => None,
        },
        None => {
            if must_be_json {
                check_json(&decoded)?;
            }
            None
        }
    };
    if let Some(span) = &mut exchange.trace {
        span.read_request(&decoded);
    }
    // Up to `max_body_bytes` of decoded JSON need not wait for the upstream.
    drop(decoded);
    let nonce = signed
        .as_ref()
        .map(|s| (s.stamp.nonce, signing::nonce_ttl(*replay.window)));
    let first_asks = nonce.is_some() || client.rate_limit.is_some();
    let slot = match &cache_plan {
        Some(plan) => {
            let cache = &app.services.cache;
            if let Some(hit) = cache.lookup_local(plan) {
                // Replays and rate limits first: a cached answer is not for them.
                if first_asks {
                    Box::pin(admit(
                        app,
                        snapshot,
                        client,
                        nonce,
                        client.rate_limit,
                        None,
                        exchange,
                    ))
                    .await?;
                }
                return Ok(cache_hit(app, hit, exchange));
            }
            // Level 1 missed: the admission and the level-2 read go together,
            // one round trip in time.
            let ask = client.quota.map(|q| q.ask(&exchange.request_id));
            let (answer, level2) = Box::pin(snapshot.store.admit_and_get(
                &client.id.0,
                nonce,
                client.rate_limit,
                ask.as_ref(),
                cache.level2_key(plan, &snapshot.store).as_deref(),
            ))
            .await;
            let asked = Asked {
                nonce,
                rate: client.rate_limit,
                quota: client.quota,
            };
            if let Some(hit) = cache.level2_answer(plan, level2) {
                // A hit costs no quota: only the nonce and the rate decide,
                // and a concurrency slot the store gave goes back.
                let slot_taken = matches!(
                    &answer,
                    Ok(admission) if admission.quota == Some(QuotaDecision::Allowed)
                ) && client.quota.is_some_and(|q| q.max_concurrent > 0);
                let answer = answer.map(|admission| crate::store::Admission {
                    quota: None,
                    ..admission
                });
                let without_quota = Asked {
                    quota: None,
                    ..asked
                };
                judge(app, snapshot, client, without_quota, None, answer, exchange).await?;
                if slot_taken {
                    exchange.meter = Some(meter(
                        app,
                        snapshot,
                        client,
                        exchange,
                        Some(SlotHeld::Store),
                        None,
                    ));
                }
                return Ok(cache_hit(app, hit, exchange));
            }
            exchange.cache = Some("miss");
            judge(app, snapshot, client, asked, ask.as_ref(), answer, exchange).await?
        }
        // The store calls are boxed: a round trip to the store dwarfs an
        // allocation, and unboxed their state (KBs) would ride in, and be
        // copied with, the future of every request, the unsigned included.
        None if first_asks || client.quota.is_some() => {
            Box::pin(admit(
                app,
                snapshot,
                client,
                nonce,
                client.rate_limit,
                client.quota,
                exchange,
            ))
            .await?
        }
        None => None,
    };
    let fill = cache_plan.map(|plan| Fill {
        cache: app.services.cache.clone(),
        plan,
    });
    exchange.meter = Some(meter(app, snapshot, client, exchange, slot, fill));

    forward(app, snapshot, route, parts, body, exchange).await
}

/// What the request settles when it ends: usage, budgets, its slot, the
/// cache fill.
fn meter(
    app: &App,
    snapshot: &Snapshot,
    client: &Client,
    exchange: &Exchange,
    slot: Option<SlotHeld>,
    cache_fill: Option<Fill>,
) -> Meter {
    Meter {
        accounting: app.services.accounting.clone(),
        store: snapshot.store.clone(),
        client: client.id.clone(),
        quota: client.quota,
        pricing: snapshot.pricing.clone(),
        slot: slot.map(|held| (exchange.request_id.clone(), held)),
        retention: *snapshot.config.usage.retention,
        usage_enabled: snapshot.config.usage.enabled,
        tap: None,
        cache_fill,
    }
}

fn cache_hit(
    app: &App,
    hit: crate::accounting::cache::Hit,
    exchange: &mut Exchange,
) -> Response<RelayBody> {
    app.services.cache.served(&hit);
    exchange.cache = Some(if hit.level == "l1" {
        "hit_l1"
    } else {
        "hit_l2"
    });
    hit.into_response(&exchange.request_id)
}

/// Asks the store, in one round trip, whether a signed request's nonce is
/// fresh, whether the client is within its rate limit and within its quota
/// (taking a concurrency slot). A store that cannot answer fails a signed
/// request closed (503) unless `replay.fail_open`; a rate limit fails open;
/// a quota fails open for `quota.fail_open_grace`, then this replica's own
/// budgets decide. Where the slot is held, if one was taken.
async fn admit(
    app: &App,
    snapshot: &Snapshot,
    client: &Client,
    nonce: Option<(&str, Duration)>,
    rate: Option<(u32, Duration)>,
    quota: Option<Quota>,
    exchange: &Exchange,
) -> Result<Option<SlotHeld>, RelayError> {
    let ask = quota.map(|q| q.ask(&exchange.request_id));
    let answer = snapshot
        .store
        .admit(&client.id.0, nonce, rate, ask.as_ref())
        .await;
    let asked = Asked { nonce, rate, quota };
    judge(app, snapshot, client, asked, ask.as_ref(), answer, exchange).await
}

/// What a request asked the store at admission.
#[derive(Clone, Copy)]
struct Asked<'a> {
    nonce: Option<(&'a str, Duration)>,
    rate: Option<(u32, Duration)>,
    quota: Option<Quota>,
}

/// The store's answer to an admission, as the client sees it: on (with
/// the concurrency slot, if one was taken) or refused.
async fn judge(
    app: &App,
    snapshot: &Snapshot,
    client: &Client,
    asked: Asked<'_>,
    ask: Option<&crate::store::QuotaAsk<'_>>,
    answer: Result<crate::store::Admission, crate::store::StoreError>,
    exchange: &Exchange,
) -> Result<Option<SlotHeld>, RelayError> {
    let Asked { nonce, rate, quota } = asked;
    let accounting = &app.services.accounting;
    match answer {
        Ok(admission) => {
            if admission.nonce_fresh == Some(false) {
                return Err(SignatureError::ReplayedNonce.into());
            }
            match admission.rate {
                Some(decision) if !decision.allowed => {
                    app.metrics
                        .rate_limited
                        .get_or_create(&ClientLabels {
                            client: client.id.clone(),
                        })
                        .inc();
                    let (limit, window) = client.rate_limit.unwrap_or_default();
                    return Err(RelayError::RateLimited {
                        message: format!(
                            "rate limit of {limit} requests per {window:?} reached for this client"
                        ),
                        retry_after: decision.retry_after.unwrap_or(window),
                    });
                }
                _ => {}
            }
            match (quota, admission.quota) {
                (Some(quota), Some(decision)) => {
                    accounting.store_ok();
                    decide_quota(
                        app,
                        snapshot,
                        client,
                        quota,
                        decision,
                        SlotHeld::Store,
                        exchange,
                    )
                }
                _ => Ok(None),
            }
        }
        Err(error) => {
            app.metrics
                .store_errors
                .get_or_create(&ResultLabels {
                    result: error.label(),
                })
                .inc();
            if nonce.is_some() {
                if !snapshot.config.replay.fail_open {
                    return Err(RelayError::Unavailable(
                        "replay protection is unavailable (the shared store cannot be reached); signed requests are refused until it is back, retry shortly".into(),
                    ));
                }
                app.metrics.replay_unprotected.inc();
                tracing::error!(
                    request_id = %exchange.request_id,
                    client = &*client.id.0,
                    %error,
                    "REPLAY PROTECTION OFF: signed request let through without its nonce check (replay.fail_open)"
                );
            } else if rate.is_some() {
                tracing::warn!(request_id = %exchange.request_id, %error, "rate limit not checked: the store is unavailable");
            }
            let (Some(quota), Some(ask)) = (quota, ask) else {
                return Ok(None);
            };
            let grace = *snapshot.config.quota.fail_open_grace;
            match accounting.unchecked(&client.id.0, ask, grace).await {
                Unchecked::FailOpen => {
                    tracing::warn!(request_id = %exchange.request_id, client = &*client.id.0, %error, "quota not checked: the store is unavailable (within quota.fail_open_grace)");
                    Ok(None)
                }
                Unchecked::Local(decision) => decide_quota(
                    app,
                    snapshot,
                    client,
                    quota,
                    decision,
                    SlotHeld::Local,
                    exchange,
                ),
            }
        }
    }
}

/// A quota decision as the client sees it: on, or a 429 saying when to retry.
fn decide_quota(
    app: &App,
    snapshot: &Snapshot,
    client: &Client,
    quota: Quota,
    decision: QuotaDecision,
    held: SlotHeld,
    exchange: &Exchange,
) -> Result<Option<SlotHeld>, RelayError> {
    let refuse = |reason: &'static str, message: String, retry_after: Duration| {
        app.metrics
            .quota_rejected
            .get_or_create(&QuotaLabels {
                client: client.id.clone(),
                reason,
            })
            .inc();
        Err(RelayError::RateLimited {
            message,
            retry_after,
        })
    };
    match decision {
        QuotaDecision::Allowed if quota.max_concurrent > 0 => {
            app.services.accounting.hold_slot(
                exchange.request_id.clone(),
                client.id.clone(),
                (held == SlotHeld::Store).then(|| snapshot.store.clone()),
            );
            Ok(Some(held))
        }
        QuotaDecision::Allowed => Ok(None),
        QuotaDecision::OverBudget { per, retry_after } => {
            let message = match per {
                BudgetPeriod::Minute => format!(
                    "token quota of {} tokens per minute used up for this client",
                    quota.tokens_per_minute
                ),
                BudgetPeriod::Day => format!(
                    "token quota of {} tokens per day (UTC) used up for this client",
                    quota.tokens_per_day
                ),
                BudgetPeriod::UsdDay => format!(
                    "spending budget of ${} per day (UTC) used up for this client",
                    crate::accounting::pricing::usd(quota.usd_nanos_per_day)
                ),
                BudgetPeriod::UsdMonth => format!(
                    "spending budget of ${} per calendar month (UTC) used up for this client",
                    crate::accounting::pricing::usd(quota.usd_nanos_per_month)
                ),
            };
            refuse(per.label(), message, retry_after)
        }
        QuotaDecision::OverConcurrency => refuse(
            "max_concurrent",
            format!(
                "quota of {} concurrent requests reached for this client",
                quota.max_concurrent
            ),
            Duration::from_secs(1),
        ),
    }
}

/// The regions to try, in order: the one `x-relay-region` pins (unknown:
/// 400), or the route of the client's address (GeoIP rules, default).
fn choose_route<'s>(
    snapshot: &'s Snapshot,
    headers: &http::HeaderMap,
    peer: SocketAddr,
    controls: bool,
) -> Result<&'s [usize], RelayError> {
    if let Some(pinned) = controls.then(|| headers.get(&RELAY_REGION)).flatten() {
        let name = pinned.to_str().unwrap_or_default();
        return match snapshot.regions.iter().position(|r| &*r.name.0 == name) {
            Some(i) => Ok(&snapshot.region_indices[i..=i]),
            None => {
                let known: Vec<&str> = snapshot.regions.iter().map(|r| &*r.name.0).collect();
                Err(RelayError::InvalidRequest(format!(
                    "unknown region {name:?} in {RELAY_REGION}; this relay has: {}",
                    known.join(", ")
                )))
            }
        };
    }
    let ip = snapshot.router.client_ip(peer.ip(), headers);
    Ok(snapshot.router.route(ip).regions)
}

/// How much of a too-large chunked body is read and thrown away before the
/// 413 goes out, so that a client still sending sees the answer instead of
/// a broken pipe (what nginx's lingering close does).
const DRAIN_CAP: u64 = 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(2);

async fn read_body(
    mut body: RequestBody,
    headers: &http::HeaderMap,
    limit: u64,
) -> Result<Bytes, RelayError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        // Refuse before reading a byte of it.
        return Err(RelayError::BodyTooLarge { limit });
    }
    let mut first: Option<Bytes> = None;
    let mut buffer: Vec<u8> = Vec::new();
    let mut seen: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            BodyLate::in_error(&*error).unwrap_or_else(|| {
                RelayError::InvalidRequest(format!("could not read the request body: {error}"))
            })
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen > limit {
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while seen <= limit + DRAIN_CAP {
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
                        }
                        _ => break,
                    }
                }
            })
            .await;
            return Err(RelayError::BodyTooLarge { limit });
        }
        // One chunk (the usual case with Content-Length) needs no copy.
        match first.take() {
            None if buffer.is_empty() => first = Some(data),
            Some(previous) => {
                buffer.extend_from_slice(&previous);
                buffer.extend_from_slice(&data);
            }
            None => buffer.extend_from_slice(&data),
        }
    }
    Ok(first.unwrap_or_else(|| Bytes::from(buffer)))
}

/// The body as the relay's readers see it: decoded when it came compressed,
/// within `limit` bytes decoded (413), refused when it cannot be decoded.
async fn decoded_for_readers(
    body: &Bytes,
    headers: &http::HeaderMap,
    limit: u64,
) -> Result<Bytes, RelayError> {
    match Coding::of(headers)? {
        Coding::Identity => Ok(body.clone()),
        coding => crate::http::request_encoding::decode_aside(body.clone(), coding, limit).await,
    }
}

fn looks_like_json(headers: &http::HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_none_or(|ct| {
        let ct = ct.as_bytes();
        // The usual value without building a substring searcher.
        ct == b"application/json" || ct.windows(4).any(|w| w == b"json")
    })
}

fn check_json(body: &[u8]) -> Result<(), RelayError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| not_json(&e))
}

fn not_json(error: &serde_json::Error) -> RelayError {
    // serde_json's syntax errors give a position, never the input.
    RelayError::InvalidRequest(format!("request body is not valid JSON: {error}"))
}

/// Sends to the route's regions in turn. A region whose breaker is open or
/// whose keys all rest is skipped; an attempt that fails before the
/// response headers (connect error, timeout, 5xx, 529) moves on to the next
/// region. A key's 429 rests that key and moves on to the region's next
/// free key, then to the next region: it is the key's limit, not the
/// region's failure, so the breaker does not hear of it. Every attempt
/// counts toward `routing.max_attempts`. Nothing has reached the client
/// before a response is returned, so no generation is duplicated.
async fn forward(
    app: &App,
    snapshot: &Snapshot,
    route: &[usize],
    parts: http::request::Parts,
    body: Bytes,
    exchange: &mut Exchange,
) -> Result<Response<RelayBody>, RelayError> {
    let max_attempts = snapshot.router.max_attempts();
    let mut attempts = 0;
    let mut last_error: Option<RelayError> = None;
    // A failed upstream answer, passed through if no other region answers.
    let mut fallback: Option<Attempt> = None;
    let mut soonest: Option<Duration> = None;
    let mut wait_at_least = |d: Duration| soonest = Some(soonest.map_or(d, |s| s.min(d)));
    // Whether keys' rate limits stood in the way, and nothing else did
    // (an open breaker, disabled or busy keys): then the client's answer
    // is a 429, not a 503.
    let mut keys_limited = false;
    let mut only_keys_limited = true;

    'route: for &index in route {
        if attempts >= max_attempts {
            break;
        }
        let region = &snapshot.regions[index];
        // One ticket for the region, whichever of its keys answers: a 429
        // tells the breaker nothing, so the ticket waits for the next key.
        let ticket = match region.breaker.admit().await {
            Ok(ticket) => ticket,
            Err(denied) => {
                wait_at_least(denied.retry_after);
                only_keys_limited = false;
                continue;
            }
        };
        // Keys of this region that answered this request with 429.
        let mut limited: Vec<usize> = Vec::new();
        loop {
            if attempts >= max_attempts {
                break 'route;
            }
            let lease = match region.keys.pick_except(&limited) {
                Ok(lease) => lease,
                Err(no_key) => {
                    if no_key.reason == NoKeyReason::CoolingDown {
                        keys_limited = true;
                    } else {
                        only_keys_limited = false;
                    }
                    if let Some(after) = no_key.retry_after {
                        wait_at_least(after);
                    }
                    continue 'route;
                }
            };
            attempts += 1;
            if !limited.is_empty() {
                app.metrics
                    .key_retries
                    .get_or_create(&UpstreamLabels {
                        upstream: region.name.clone(),
                    })
                    .inc();
            } else if attempts > 1 {
                app.metrics
                    .failovers
                    .get_or_create(&UpstreamLabels {
                        upstream: region.name.clone(),
                    })
                    .inc();
            }
            let traceparent = exchange
                .trace
                .as_mut()
                .map(|span| span.attempt_started(&region.name, lease.index()));
            let sent = attempt(
                app,
                region,
                &parts,
                body.clone(),
                (lease.header(), traceparent.as_ref()),
                exchange,
            )
            .await;
            if let Some(span) = &mut exchange.trace {
                match &sent {
                    Ok(answer) => span.attempt_answered(answer.response.status().as_u16()),
                    Err((error, _)) => span.attempt_failed(error),
                }
            }
            match sent {
                Ok(mut answer) => {
                    let status = answer.response.status();
                    lease.record(status, answer.response.headers());
                    if status == http::StatusCode::TOO_MANY_REQUESTS {
                        // The key rests (`record`); its answer is dropped unread.
                        tracing::debug!(request_id = %exchange.request_id, region = &*region.name.0, key_id = lease.id(), "upstream key answered 429; trying the next key");
                        keys_limited = true;
                        limited.push(lease.index());
                        continue;
                    }
                    let after =
                        retry_after(answer.response.headers(), std::time::SystemTime::now());
                    let outcome = Outcome::of_status(status, after);
                    ticket.record(outcome);
                    answer.lease = Some(lease);
                    if outcome.is_failure() {
                        tracing::warn!(request_id = %exchange.request_id, region = &*region.name.0, %status, "upstream failed before the body; trying the next region");
                        fallback = Some(answer);
                        continue 'route;
                    }
                    return Ok(respond(answer, exchange));
                }
                Err((error, kind)) => {
                    ticket.record(Outcome::Failure {
                        kind,
                        retry_after: None,
                    });
                    tracing::warn!(request_id = %exchange.request_id, region = &*region.name.0, %error, "upstream attempt failed");
                    last_error = Some(error);
                    continue 'route;
                }
            }
        }
    }
    if let Some(answer) = fallback {
        return Ok(respond(answer, exchange));
    }
    if let Some(error) = last_error {
        return Err(error);
    }
    if keys_limited && only_keys_limited {
        return Err(keys_rate_limited(snapshot, route, attempts));
    }
    Err(RelayError::Overloaded {
        message: "no upstream region can take the request now (circuit breakers open or upstream keys cooling down)".into(),
        retry_after: Some(soonest.unwrap_or(Duration::from_secs(1))),
    })
}

/// The relay's 429 when the route's upstream keys are rate limited: every
/// one rests, or the attempts ran out on keys answering 429. `retry-after`
/// is when the first key of the route is free again.
fn keys_rate_limited(snapshot: &Snapshot, route: &[usize], attempts: usize) -> RelayError {
    let free_in = route
        .iter()
        .filter_map(|&i| snapshot.regions[i].keys.rest_left())
        .min()
        .unwrap_or(Duration::from_secs(1));
    let message = if free_in.is_zero() {
        // Out of attempts (or the keys' rest is already over): one is free.
        format!(
            "the upstream keys tried were rate limited (429 on {attempts} attempts, routing.max_attempts {}); retry shortly",
            snapshot.router.max_attempts()
        )
    } else {
        "every upstream key of the route is rate limited (429) and resting; retry after the time given".to_string()
    };
    RelayError::RateLimited {
        message,
        retry_after: free_in,
    }
}

/// One region's answer, not yet passed to the client.
struct Attempt {
    response: Response<UpstreamBody>,
    region: Name,
    permit: OwnedSemaphorePermit,
    idle: Duration,
    deadline: Instant,
    lease: Option<KeyLease>,
}

async fn attempt(
    app: &App,
    region: &Region,
    parts: &http::request::Parts,
    body: Bytes,
    (key, traceparent): (&HeaderValue, Option<&HeaderValue>),
    exchange: &mut Exchange,
) -> Result<Attempt, (RelayError, FailureKind)> {
    let transport = &region.transport;
    let upstream_request = Outgoing {
        method: &parts.method,
        path_and_query: parts.uri.path_and_query(),
        client_headers: &parts.headers,
        api_key: key,
        body,
        traceparent,
    };

    let started = Instant::now();
    let timeouts = &region.timeouts;
    let deadline = started + *timeouts.total;
    let permit = transport.acquire().await;
    let headers_by = (Instant::now() + *timeouts.response_headers).min(deadline);
    exchange.upstream = Some(region.name.clone());
    let sent = tokio::time::timeout_at(headers_by, transport.send(&upstream_request)).await;
    let response = match sent {
        Ok(Ok(sent)) => sent,
        Ok(Err(error)) => {
            let region_name = region.name.0.to_string();
            let (label, kind, failure) = match classify(&error) {
                SendFailure::ConnectTimeout => (
                    "connect_timeout",
                    FailureKind::Timeout,
                    RelayError::UpstreamTimeout {
                        region: region_name,
                        after: *timeouts.connect,
                    },
                ),
                SendFailure::Connect(reason) => (
                    "connect",
                    FailureKind::Connect,
                    RelayError::UpstreamConnect {
                        region: region_name,
                        reason,
                    },
                ),
                SendFailure::EgressProxy(reason) => (
                    "egress_proxy",
                    FailureKind::Connect,
                    RelayError::UpstreamConnect {
                        region: region_name,
                        reason,
                    },
                ),
                SendFailure::Other(reason) => (
                    "exchange",
                    FailureKind::Connect,
                    RelayError::UpstreamConnect {
                        region: region_name,
                        reason,
                    },
                ),
            };
            count_error(app, region, label);
            return Err((failure, kind));
        }
        Err(_) => {
            count_error(app, region, "timeout");
            return Err((
                RelayError::UpstreamTimeout {
                    region: region.name.0.to_string(),
                    after: headers_by.duration_since(started),
                },
                FailureKind::Timeout,
            ));
        }
    };
    let ttfb = started.elapsed();
    exchange.upstream_ttfb = Some(ttfb);
    region
        .ttfb
        .get_or_init(|| {
            app.metrics
                .upstream_ttfb
                .get_or_create(&UpstreamLabels {
                    upstream: region.name.clone(),
                })
                .clone()
        })
        .observe(ttfb.as_secs_f64());
    Ok(Attempt {
        response,
        region: region.name.clone(),
        permit,
        idle: *timeouts.idle,
        deadline,
        lease: None,
    })
}

/// Passes an upstream answer to the client, frame by frame.
fn respond(answer: Attempt, exchange: &mut Exchange) -> Response<RelayBody> {
    exchange.upstream = Some(answer.region);
    exchange.permit = Some(answer.permit);
    exchange.key_lease = answer.lease;
    let (mut parts, body) = answer.response.into_parts();
    headers::downstream_response_headers(&mut parts.headers);
    if let Ok(id) = HeaderValue::from_str(&exchange.request_id) {
        parts.headers.insert(RELAY_REQUEST_ID, id);
    }
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if sse {
        parts
            .headers
            .insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    }
    if let Some(meter) = &mut exchange.meter {
        if meter.cache_fill.is_some() {
            parts
                .headers
                .insert(RELAY_CACHE, HeaderValue::from_static("miss"));
            // Only a complete 200 JSON answer is stored.
            if parts.status != http::StatusCode::OK || sse {
                meter.cache_fill = None;
            }
        }
        // The tap also keeps the JSON body a cache fill stores; a
        // compressed answer is decoded on the side, the client's bytes
        // untouched.
        let wanted = meter.usage_enabled || meter.cache_fill.is_some();
        if wanted && exchange.route == "messages" && parts.status.is_success() {
            meter.tap = Some(UsageTap::for_answer(
                sse,
                parts.headers.get(header::CONTENT_ENCODING),
            ));
        }
    }
    // NB: a relay error event can only be appended to a stream in plain
    // text: inside a compressed one it would break the client's decoding.
    let plain = Encoded::of(parts.headers.get(header::CONTENT_ENCODING)) == Encoded::Identity;
    let body = RelayBody::upstream(body, answer.idle, answer.deadline, sse && plain);
    Response::from_parts(parts, body)
}

fn count_error(app: &App, region: &Region, kind: &'static str) {
    app.metrics
        .upstream_errors
        .get_or_create(&UpstreamErrorLabels {
            upstream: region.name.clone(),
            kind,
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_a_fixed_set() {
        assert_eq!(route_of("/v1/messages"), "messages");
        assert_eq!(route_of("/v1/messages/count_tokens"), "count_tokens");
        assert_eq!(
            route_of("/v1/messages/batches/msgbatch_1/results"),
            "batches"
        );
        assert_eq!(route_of("/v1/models/claude-x"), "models");
        assert_eq!(route_of("/v2/whatever/123"), "other");
    }

    #[test]
    fn json_check_reports_position_only() {
        let err = check_json(b"{\"secret\": sk-ant-123}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
        assert!(!err.contains("sk-ant"), "{err}");
        assert!(check_json(b"{\"a\":[1,2,{}]}").is_ok());
    }
}
