//! The Claude API double as a process, for benchmarks and manual tries:
//! `mock-upstream --listen 127.0.0.1:18080`.

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:18080")]
    listen: std::net::SocketAddr,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        eprintln!("mock upstream listening on {}", listener.local_addr()?);
        claude_relay_testkit::upstream::serve_forever(listener).await;
        Ok(())
    })
}
