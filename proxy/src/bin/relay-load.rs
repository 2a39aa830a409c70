//! A closed-loop HTTP/1.1 load generator for the benchmark that can sign
//! every request with a fresh nonce (docs/signing.md), which wrk cannot.
//!
//! relay-load --url http://127.0.0.1:8080/v1/messages --connections 64 --seconds 10 \
//!     --mode signed --key-id bench-signer --secret-file secret
//!
//! `--header NAME:VALUE` (repeatable) and `--body JSON` change the request;
//! `--first-byte` times each request to the first chunk of its response
//! body (the first event of a stream) instead of to its end.
//!
//! Prints one line: `requests=N seconds=S rps=R p50_us=A p99_us=B errors=E`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use claude_relay_proxy::admission::signing::{self, SigningSecret, Stamp};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// `x-api-key` with a relay key.
    RelayKey,
    /// HMAC-signed, a fresh nonce per request.
    Signed,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, value_enum, default_value_t = Mode::RelayKey)]
    mode: Mode,
    /// The relay key (relay-key mode).
    #[arg(long, default_value = "")]
    relay_key: String,
    /// The client id (signed mode).
    #[arg(long, default_value = "")]
    key_id: String,
    /// The signing secret's file (signed mode).
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// More request headers, `NAME:VALUE`.
    #[arg(long = "header")]
    headers: Vec<String>,
    /// The request body (JSON).
    #[arg(long, default_value = BODY)]
    body: String,
    /// Time to the first body chunk instead of to the end of the response.
    #[arg(long)]
    first_byte: bool,
}

const BODY: &str = r#"{"model":"claude-bench","max_tokens":256,"messages":[{"role":"user","content":"Say hello"}]}"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = match (&args.secret_file, args.mode) {
        (Some(file), _) => Some(
            SigningSecret::new(std::fs::read_to_string(file)?.trim().as_bytes())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        (None, Mode::Signed) => anyhow::bail!("--mode signed needs --secret-file"),
        (None, Mode::RelayKey) => None,
    };
    let uri: http::Uri = args.url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().unwrap_or("127.0.0.1"),
        uri.port_u16().unwrap_or(80)
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let shared = Arc::new((args, secret, uri, addr));
    let (latencies, errors, elapsed) = runtime.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(shared.0.seconds);
        let started = Instant::now();
        let tasks: Vec<_> = (0..shared.0.connections)
            .map(|_| tokio::spawn(connection(shared.clone(), deadline)))
            .collect();
        let mut latencies = Vec::new();
        let mut errors = 0u64;
        for task in tasks {
            let (l, e) = task.await.unwrap_or_default();
            latencies.extend(l);
            errors += e;
        }
        (latencies, errors, started.elapsed())
    });
    let mut latencies = latencies;
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "requests={} seconds={:.2} rps={:.0} p50_us={} p99_us={} errors={}",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        at(0.50),
        at(0.99),
        errors
    );
    Ok(())
}

type Shared = Arc<(Args, Option<SigningSecret>, http::Uri, String)>;

/// One keep-alive connection sending requests back to back until `deadline`.
async fn connection(shared: Shared, deadline: Instant) -> (Vec<u64>, u64) {
    let (args, secret, uri, addr) = &*shared;
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let path = uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    let nonce_prefix = signing::generate_nonce().expect("random nonce prefix")[..16].to_string();
    let body = Bytes::from(args.body.clone());
    let extra: Vec<(&str, &str)> = args
        .headers
        .iter()
        .filter_map(|h| h.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let mut sent_count = 0u64;
    while Instant::now() < deadline {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            errors += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await
        else {
            errors += 1;
            continue;
        };
        tokio::spawn(conn);
        while Instant::now() < deadline {
            // Origin form (`POST /v1/messages`), as the SDKs, curl, wrk and
            // oha send it: an absolute URI takes the relay's rarer path.
            let mut request = http::Request::post(path.as_str())
                .header("host", addr.as_str())
                .header("content-type", "application/json")
                .header("anthropic-version", "2023-06-01");
            for (name, value) in &extra {
                request = request.header(*name, *value);
            }
            match args.mode {
                Mode::RelayKey => request = request.header("x-api-key", &args.relay_key),
                Mode::Signed => {
                    // Unique, not secret: a random prefix per connection and a
                    // counter, so the generator spends no syscall per nonce.
                    sent_count += 1;
                    let nonce = format!("{nonce_prefix}{sent_count:016x}");
                    let stamp = Stamp {
                        key_id: &args.key_id,
                        timestamp: signing::unix_now(),
                        nonce: &nonce,
                    };
                    let to_sign = signing::Request {
                        method: "POST",
                        path_and_query: &path,
                        body: &body,
                    };
                    let secret = secret.as_ref().expect("checked in main");
                    for (name, value) in signing::signature_headers(secret, &stamp, &to_sign) {
                        request = request.header(name, value);
                    }
                }
            }
            let request = request
                .body(Full::new(body.clone()))
                .expect("valid request");
            let sent = Instant::now();
            if sender.ready().await.is_err() {
                errors += 1;
                break;
            }
            match sender.send_request(request).await {
                Ok(response) => {
                    let ok = response.status().is_success();
                    let mut answer = response.into_body();
                    let mut first = None;
                    let mut failed = false;
                    while let Some(frame) = answer.frame().await {
                        match frame {
                            Ok(frame) if frame.is_data() => {
                                first.get_or_insert_with(|| sent.elapsed());
                            }
                            Ok(_) => {}
                            Err(_) => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    let took = if args.first_byte {
                        first.unwrap_or_else(|| sent.elapsed())
                    } else {
                        sent.elapsed()
                    };
                    if ok && !failed {
                        latencies.push(took.as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                Err(_) => {
                    errors += 1;
                    break;
                }
            }
        }
    }
    (latencies, errors)
}
