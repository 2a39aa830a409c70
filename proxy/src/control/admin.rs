//! The admin listener, on its own port: `/healthz` (the process serves),
//! `/readyz` (config loaded, listener up, not shutting down), `/metrics`,
//! `GET /usage` (token usage and cost per client per day, from the store) and
//! `POST /cache/purge` (response cache entries of one client, or all).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};

use crate::base::metrics::UpstreamLabels;
use crate::control::runtime::App;
use crate::http::body::RelayBody;
use crate::http::error::error_response;
use crate::store::{COST_FIELD, Store, civil_date, day_of, days_of, unix_ms};

/// The longest period `/usage` answers for, in days.
const MAX_USAGE_DAYS: u64 = 366;

pub async fn handle<B>(app: &Arc<App>, request: &Request<B>) -> Response<RelayBody> {
    let query = request.uri().query().unwrap_or("");
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/usage") => return usage(app, query).await,
        (&Method::POST, "/cache/purge") => return purge(app, query).await,
        (_, "/usage" | "/cache/purge") => {
            return admin_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "use GET /usage or POST /cache/purge",
            );
        }
        _ => {}
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if app.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        "/metrics" => {
            refresh_pool_figures(app);
            let mut response = Response::new(RelayBody::full(Bytes::from(app.metrics.encode())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz, /metrics, /usage or POST /cache/purge\n",
        ),
    }
}

/// `name=value` pairs of a query; names and values used here need no decoding.
fn param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn admin_error(status: StatusCode, kind: &str, message: &str) -> Response<RelayBody> {
    error_response(status, kind, message, "admin", None)
}

fn json_response(value: &Value) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::full(Bytes::from(value.to_string())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// `GET /usage?from=YYYY-MM-DD&to=YYYY-MM-DD&client=ID`: each client's usage
/// over the period (UTC days, both ends included; default today), in
/// total, per model and per day, as the store holds it for every replica;
/// `cost_usd` is what the answers cost at the prices of `pricing`.
async fn usage(app: &Arc<App>, query: &str) -> Response<RelayBody> {
    let snapshot = app.snapshot.load_full();
    let (today, _) = day_of(unix_ms());
    let day = |name: &str| match param(query, name) {
        None => days_of(&today).ok_or_else(|| "the clock is before 1970".to_string()),
        Some(text) => {
            days_of(text).ok_or_else(|| format!("{name}={text:?} is not a date (YYYY-MM-DD)"))
        }
    };
    let (from, to) = match (day("from"), day("to")) {
        (Ok(from), Ok(to)) if from <= to && to - from < MAX_USAGE_DAYS => (from, to),
        (Ok(_), Ok(_)) => {
            return admin_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("from must not be after to, and the period at most {MAX_USAGE_DAYS} days"),
            );
        }
        (Err(e), _) | (_, Err(e)) => {
            return admin_error(StatusCode::BAD_REQUEST, "invalid_request_error", &e);
        }
    };
    let clients: Vec<&str> = match param(query, "client") {
        Some(id) => match snapshot.config.clients.iter().find(|c| c.id == id) {
            Some(c) => vec![c.id.as_str()],
            None => {
                return admin_error(
                    StatusCode::NOT_FOUND,
                    "not_found_error",
                    &format!("no client {id:?} in this relay's config"),
                );
            }
        },
        None => snapshot
            .config
            .clients
            .iter()
            .map(|c| c.id.as_str())
            .collect(),
    };
    let mut out = Vec::with_capacity(clients.len());
    for client in clients {
        let dates: Vec<String> = (from..=to).map(civil_date).collect();
        // Concurrent reads: fred pipelines them on its connections.
        let reads = dates.iter().map(|d| snapshot.store.usage(client, d));
        let results = futures_util::future::join_all(reads).await;
        let mut total: BTreeMap<String, u64> = BTreeMap::new();
        let mut models: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut days = Vec::new();
        for (date, result) in dates.iter().zip(results) {
            let counters = match result {
                Ok(c) => c,
                Err(error) => {
                    return admin_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded_error",
                        &format!("usage cannot be read from the store: {error}"),
                    );
                }
            };
            if counters.is_empty() {
                continue;
            }
            let mut day_totals: BTreeMap<String, u64> = BTreeMap::new();
            for (field, count) in counters {
                match field.rsplit_once('/') {
                    Some((model, kind)) => {
                        *models
                            .entry(model.to_owned())
                            .or_default()
                            .entry(kind.to_owned())
                            .or_default() += count;
                    }
                    None => {
                        *total.entry(field.clone()).or_default() += count;
                        day_totals.insert(field, count);
                    }
                }
            }
            let mut day = counters_json(day_totals);
            day["date"] = date.as_str().into();
            days.push(day);
        }
        out.push(json!({
            "client": client,
            "total": counters_json(with_zeros(total)),
            "models": models.into_iter().map(|(m, c)| (m, counters_json(with_zeros(c)))).collect::<BTreeMap<_, _>>(),
            "days": days,
        }));
    }
    json_response(&json!({
        "from": civil_date(from),
        "to": civil_date(to),
        "clients": out,
    }))
}

/// Every counter, zero when nothing was recorded.
fn with_zeros(mut counters: BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    for kind in ["requests", COST_FIELD]
        .iter()
        .chain(crate::store::Usage::KINDS.iter())
    {
        counters.entry((*kind).to_owned()).or_insert(0);
    }
    counters
}

/// Counters as JSON: the cost, kept in nano-dollars, as `cost_usd`.
fn counters_json(counters: BTreeMap<String, u64>) -> Value {
    let mut out = serde_json::Map::with_capacity(counters.len());
    for (field, n) in counters {
        if field == COST_FIELD {
            out.insert("cost_usd".into(), crate::accounting::pricing::usd(n).into());
        } else {
            out.insert(field, n.into());
        }
    }
    Value::Object(out)
}

/// `POST /cache/purge?client=ID` (that client's entries) or `POST
/// /cache/purge` (every entry): deleted here and in Redis; the other
/// replicas drop their level-1 copies within a second.
async fn purge(app: &Arc<App>, query: &str) -> Response<RelayBody> {
    let snapshot = app.snapshot.load_full();
    let client = param(query, "client");
    if let Some(id) = client
        && !snapshot.config.clients.iter().any(|c| c.id == id)
    {
        return admin_error(
            StatusCode::NOT_FOUND,
            "not_found_error",
            &format!("no client {id:?} in this relay's config"),
        );
    }
    match app.services.cache.purge(client, &snapshot.store).await {
        Ok((memory, redis)) => json_response(&json!({
            "client": client,
            "purged_memory_entries": memory,
            "purged_redis_entries": redis,
        })),
        Err(error) => admin_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded_error",
            &format!("the Redis entries could not be purged (this replica's were): {error}"),
        ),
    }
}

/// Pool gauges are read from the transports at scrape time, not kept up to
/// date on the hot path.
fn refresh_pool_figures(app: &App) {
    let snapshot = app.snapshot.load();
    let m = &app.metrics;
    for region in &snapshot.regions {
        let figures = region.transport.figures();
        let labels = UpstreamLabels {
            upstream: region.name.clone(),
        };
        m.pool_open.get_or_create(&labels).set(figures.open);
        m.pool_in_use.get_or_create(&labels).set(figures.in_flight);
        m.pool_waiting.get_or_create(&labels).set(figures.waiting);
        // HTTP/1 view: a connection carries one request at a time.
        m.pool_idle
            .get_or_create(&labels)
            .set((figures.open - figures.in_flight).max(0));
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<RelayBody> {
    let mut response = Response::new(RelayBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}
