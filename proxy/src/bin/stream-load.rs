//! The streams benchmark's client (bench/streams.sh): holds many open SSE
//! streams, or many idle keep-alive connections, which wrk cannot measure.
//!
//! stream-load --url http://127.0.0.1:8080/v1/messages --connections 10000 --seconds 20
//!
//! `--mode stream` (the default) opens every stream, reads every event
//! until the deadline and times each event's arrival against the send time
//! the upstream wrote into it (`"t":<unix seconds, ms>`, nginx's `$msec`).
//! A stream that goes `--stall-ms` without an event is stalled; one that
//! ends before the deadline is cut; one that never answered 200 failed.
//! Prints `streams=N events=E p50_us=A p99_us=B p999_us=C max_us=D
//! stalled=S cut=X failed=F`.
//!
//! `--mode idle` sends one request on every connection, reads its answer
//! and holds the connection idle until the deadline, then counts those the
//! server closed meanwhile: `connections=N held=H closed=C failed=F`.
//!
//! Raw sockets and one small buffer per connection, so the client holds
//! tens of thousands of connections in little memory.

use std::io::ErrorKind;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Stream,
    Idle,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// How long every connection is held, from the start.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, value_enum, default_value_t = Mode::Stream)]
    mode: Mode,
    /// Connections being opened at once (a backlog is not overrun).
    #[arg(long, default_value_t = 256)]
    opening: usize,
    /// Streams are opened evenly over this time, so that their events do
    /// not all fall due at the same instant (a burst, not a stream load).
    #[arg(long, default_value_t = 3000)]
    ramp_ms: u64,
    /// Events arriving in the first seconds of every stream are not timed
    /// (the upstream's and the relay's first allocations).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    #[arg(long, default_value_t = 1000)]
    stall_ms: u64,
    #[arg(long = "header")]
    headers: Vec<String>,
    #[arg(long, default_value = BODY)]
    body: String,
}

const BODY: &str = r#"{"model":"claude-bench","max_tokens":256,"stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

#[derive(Default)]
struct Tally {
    stalled: AtomicU64,
    cut: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let uri: http::Uri = args.url.parse()?;
    let addr = format!(
        "{}:{}",
        uri.host().unwrap_or("127.0.0.1"),
        uri.port_u16().unwrap_or(80)
    );
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\nanthropic-version: 2023-06-01\r\ncontent-length: {}\r\n",
        args.body.len()
    );
    for header in &args.headers {
        if let Some((name, value)) = header.split_once(':') {
            request.push_str(&format!("{}: {}\r\n", name.trim(), value.trim()));
        }
    }
    request.push_str("\r\n");
    request.push_str(&args.body);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let tally = Arc::new(Tally::default());
    let opening = Arc::new(Semaphore::new(args.opening));
    let request: Arc<[u8]> = Arc::from(request.into_bytes());
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let args = Arc::new(args);
    let delays = runtime.block_on(async {
        let tasks: Vec<_> = (0..args.connections)
            .map(|i| {
                let due = started
                    + Duration::from_millis(args.ramp_ms) * i as u32 / args.connections as u32;
                let (args, tally, opening, request, addr) = (
                    args.clone(),
                    tally.clone(),
                    opening.clone(),
                    request.clone(),
                    addr.clone(),
                );
                tokio::spawn(async move {
                    tokio::time::sleep_until(due.into()).await;
                    let permit = opening.acquire_owned().await.expect("never closed");
                    match args.mode {
                        Mode::Stream => {
                            stream(&args, &addr, &request, deadline, permit, &tally).await
                        }
                        Mode::Idle => {
                            idle(&addr, &request, deadline, permit, &tally).await;
                            Vec::new()
                        }
                    }
                })
            })
            .collect();
        let mut delays = Vec::new();
        for task in tasks {
            delays.extend(task.await.unwrap_or_default());
        }
        delays
    });
    let failed = tally.failed.load(Ordering::Relaxed);
    match args.mode {
        Mode::Stream => {
            let mut delays = delays;
            delays.sort_unstable();
            let at = |q: f64| {
                delays
                    .get(((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0)
            };
            println!(
                "streams={} events={} p50_us={} p99_us={} p999_us={} max_us={} stalled={} cut={} failed={}",
                args.connections as u64 - failed,
                delays.len(),
                at(0.50),
                at(0.99),
                at(0.999),
                delays.last().copied().unwrap_or(0),
                tally.stalled.load(Ordering::Relaxed),
                tally.cut.load(Ordering::Relaxed),
                failed
            );
        }
        Mode::Idle => {
            let closed = tally.closed.load(Ordering::Relaxed);
            println!(
                "connections={} held={} closed={} failed={}",
                args.connections,
                args.connections as u64 - failed - closed,
                closed,
                failed
            );
        }
    }
    Ok(())
}

/// Connects and sends the request; the socket once a 200's head is read
/// (into `buf`, with whatever followed it).
async fn open(addr: &str, request: &[u8], buf: &mut Vec<u8>) -> Option<TcpStream> {
    let mut socket = TcpStream::connect(addr).await.ok()?;
    let _ = socket.set_nodelay(true);
    socket.write_all(request).await.ok()?;
    // Read until the head is complete.
    loop {
        if memchr::memmem::find(buf, b"\r\n\r\n").is_some() {
            return buf.starts_with(b"HTTP/1.1 200").then_some(socket);
        }
        let mut chunk = [0u8; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// One stream: every event's delay (µs) from the send time written in it.
async fn stream(
    args: &Args,
    addr: &str,
    request: &[u8],
    deadline: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
    tally: &Tally,
) -> Vec<u32> {
    let mut buf = Vec::with_capacity(1024);
    let Some(mut socket) = open(addr, request, &mut buf).await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return Vec::new();
    };
    drop(permit);
    let opened = Instant::now();
    let timed_from = opened + Duration::from_secs(args.warmup);
    let stall = Duration::from_millis(args.stall_ms);
    let mut delays = Vec::new();
    let mut last_event = opened;
    let mut stalled = false;
    let mut chunk = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let read = tokio::time::timeout_at(deadline.into(), socket.read(&mut chunk)).await;
        let n = match read {
            Err(_) => break,
            Ok(Ok(0) | Err(_)) => {
                tally.cut.fetch_add(1, Ordering::Relaxed);
                break;
            }
            Ok(Ok(n)) => n,
        };
        let arrived = unix_micros();
        let now = Instant::now();
        buf.extend_from_slice(&chunk[..n]);
        let mut events = 0;
        // Every complete `"t":<seconds>.<ms>}` read so far.
        while let Some(at) = memchr::memmem::find(&buf, b"\"t\":") {
            let Some(end) = memchr::memchr(b'}', &buf[at..]) else {
                break;
            };
            let sent = std::str::from_utf8(&buf[at + 4..at + end])
                .ok()
                .and_then(|t| t.parse::<f64>().ok());
            buf.drain(..at + end + 1);
            events += 1;
            if let (Some(sent), true) = (sent, now >= timed_from) {
                let sent_us = (sent * 1e6).round() as u64;
                delays.push(arrived.saturating_sub(sent_us).min(u32::MAX as u64) as u32);
            }
        }
        if memchr::memmem::find(&buf, b"\"t\":").is_none() && buf.len() > 64 {
            // No event begun in what is kept: only its last bytes may start one.
            buf.drain(..buf.len() - 8);
        }
        if events > 0 {
            if now - last_event > stall && !stalled {
                stalled = true;
                tally.stalled.fetch_add(1, Ordering::Relaxed);
            }
            last_event = now;
        }
    }
    if !stalled && deadline.saturating_duration_since(last_event) > stall {
        tally.stalled.fetch_add(1, Ordering::Relaxed);
    }
    delays
}

/// One keep-alive connection: a request answered, then held idle.
async fn idle(
    addr: &str,
    request: &[u8],
    deadline: Instant,
    permit: tokio::sync::OwnedSemaphorePermit,
    tally: &Tally,
) {
    let mut buf = Vec::with_capacity(512);
    // A connection the server never accepts (held in its listen backlog)
    // fails at the deadline.
    let opened = tokio::time::timeout_at(deadline.into(), open_any(addr, request, &mut buf));
    let Ok(Some(socket)) = opened.await else {
        tally.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    drop(permit);
    tokio::time::sleep_until(deadline.into()).await;
    // Still open: nothing to read and no end of stream.
    let mut probe = [0u8; 1];
    if !matches!(socket.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock) {
        tally.closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connects, sends the request and reads its whole answer (any status,
/// framed by its length).
async fn open_any(addr: &str, request: &[u8], buf: &mut Vec<u8>) -> Option<TcpStream> {
    let mut socket = TcpStream::connect(addr).await.ok()?;
    let _ = socket.set_nodelay(true);
    socket.write_all(request).await.ok()?;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())?;
            if buf.len() >= end + 4 + length {
                return Some(socket);
            }
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}
