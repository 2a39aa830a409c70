//! `claude-relay-proxy sign`: signs one request the way a client must
//! (docs/signing.md) and prints the headers, or a ready curl command. For
//! client authors checking their own code, and for our tests.

use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::admission::signing::{self, Request, SigningSecret, Stamp};
use crate::base::secrets;

/// Where `--curl` sends the request when `--url` is not given.
const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8080";
/// The Claude API requires this header; curl output sets it so it works as printed.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Sign a request for a relay client (prints the four x-relay-* headers).
#[derive(Clone, Debug, clap::Args)]
pub struct SignArgs {
    /// The client id (x-relay-key-id).
    #[arg(long)]
    pub key_id: String,
    /// File holding the client's signing secret (surrounding white space is ignored).
    #[arg(long)]
    pub secret_file: PathBuf,
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Path with query, exactly as it will be sent: /v1/messages?beta=true
    #[arg(long)]
    pub path: String,
    /// File holding the exact body bytes; none means an empty body.
    #[arg(long)]
    pub body_file: Option<PathBuf>,
    /// Base URL of the relay for --curl.
    #[arg(long)]
    pub url: Option<String>,
    /// Print a curl command instead of the headers.
    #[arg(long)]
    pub curl: bool,
    /// Unix seconds to sign with instead of now (to reproduce a signature).
    #[arg(long)]
    pub timestamp: Option<u64>,
    /// Nonce to sign with instead of a fresh random one (to reproduce a signature).
    #[arg(long)]
    pub nonce: Option<String>,
}

pub fn run(args: SignArgs) -> anyhow::Result<()> {
    print!("{}", render(&args)?);
    Ok(())
}

/// What `run` prints.
pub fn render(args: &SignArgs) -> anyhow::Result<String> {
    signing::check_key_id(&args.key_id).context("--key-id")?;
    if !args.path.starts_with('/') {
        bail!("--path must start with / (the path and query as on the request line)");
    }
    let nonce = match &args.nonce {
        Some(nonce) => nonce.clone(),
        None => signing::generate_nonce().context("generating a nonce")?,
    };
    signing::check_nonce(&nonce).context("--nonce")?;
    let secret = secrets::read_file(&args.secret_file).map_err(anyhow::Error::msg)?;
    let secret = SigningSecret::new(secret.expose().as_bytes())
        .with_context(|| format!("--secret-file {}", args.secret_file.display()))?;
    let body = match &args.body_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("reading --body-file {}", path.display()))?,
        None => Vec::new(),
    };
    let stamp = Stamp {
        key_id: &args.key_id,
        timestamp: args.timestamp.unwrap_or_else(signing::unix_now),
        nonce: &nonce,
    };
    let request = Request {
        method: &args.method,
        path_and_query: &args.path,
        body: &body,
    };
    let headers = signing::signature_headers(&secret, &stamp, &request);

    if !args.curl {
        return Ok(headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\n"))
            .collect());
    }
    let base = args.url.as_deref().unwrap_or(DEFAULT_BASE_URL);
    let url = format!("{}{}", base.trim_end_matches('/'), args.path);
    let mut lines = vec![format!(
        "curl -sS -X {} {}",
        quote(&args.method),
        quote(&url)
    )];
    for (name, value) in &headers {
        lines.push(format!("-H {}", quote(&format!("{name}: {value}"))));
    }
    lines.push(format!(
        "-H {}",
        quote(&format!("anthropic-version: {ANTHROPIC_VERSION}"))
    ));
    if let Some(path) = &args.body_file {
        lines.push(format!("-H {}", quote("content-type: application/json")));
        // --data-binary sends the file's bytes unchanged, so they match the signed hash.
        lines.push(format!(
            "--data-binary @{}",
            quote(&path.display().to_string())
        ));
    }
    Ok(lines.join(" \\\n  ") + "\n")
}

/// Single-quotes a word for a POSIX shell.
fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SECRET: &str = "cli-test-secret-0123456789abcdefghijklmn";

    fn args(dir: &tempfile::TempDir) -> SignArgs {
        let secret_file = dir.path().join("secret");
        std::fs::write(&secret_file, format!("  {SECRET}\n")).unwrap();
        let body_file = dir.path().join("it's a body.json");
        std::fs::write(&body_file, br#"{"max_tokens":1}"#).unwrap();
        SignArgs {
            key_id: "app".into(),
            secret_file,
            method: "POST".into(),
            path: "/v1/messages?beta=true".into(),
            body_file: Some(body_file),
            url: Some("https://relay.example/".into()),
            curl: false,
            timestamp: Some(1_764_136_800),
            nonce: Some("cli-nonce-0123456789".into()),
        }
    }

    #[test]
    fn printed_headers_verify() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(&dir);
        let out = render(&args).unwrap();
        let values: Vec<&str> = out
            .lines()
            .map(|line| line.split_once(": ").unwrap().1)
            .collect();
        assert_eq!(out.lines().count(), 4);
        assert!(out.starts_with("x-relay-key-id: app\nx-relay-timestamp: 1764136800\n"));
        let headers =
            signing::SignatureHeaders::parse(values[0], values[1], values[2], values[3]).unwrap();
        let request = Request {
            method: "POST",
            path_and_query: "/v1/messages?beta=true",
            body: br#"{"max_tokens":1}"#,
        };
        // The secret file's surrounding white space is not part of the secret.
        let secret = SigningSecret::new(SECRET.as_bytes()).unwrap();
        let verified = signing::verify(
            &headers,
            &request,
            &[secret],
            1_764_136_800,
            Duration::from_secs(300),
        );
        assert!(verified.is_ok(), "{verified:?}");
    }

    #[test]
    fn curl_command_is_complete_and_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = args(&dir);
        args.curl = true;
        let out = render(&args).unwrap();
        assert!(
            out.starts_with(
                "curl -sS -X 'POST' 'https://relay.example/v1/messages?beta=true' \\\n"
            ),
            "{out}"
        );
        assert!(
            out.contains("-H 'x-relay-nonce: cli-nonce-0123456789'"),
            "{out}"
        );
        assert!(out.contains("-H 'x-relay-signature: v1="), "{out}");
        assert!(out.contains("-H 'anthropic-version: 2023-06-01'"), "{out}");
        assert!(out.contains(r"it'\''s a body.json'"), "{out}");
        assert!(!out.contains(SECRET));
    }

    #[test]
    fn fresh_nonce_and_time_by_default() {
        let dir = tempfile::tempdir().unwrap();
        let mut args = args(&dir);
        args.nonce = None;
        args.timestamp = None;
        let a = render(&args).unwrap();
        let b = render(&args).unwrap();
        assert_ne!(a, b, "two runs must not share a nonce");
        let ts: u64 = a.lines().nth(1).unwrap()["x-relay-timestamp: ".len()..]
            .parse()
            .unwrap();
        assert!(ts.abs_diff(signing::unix_now()) < 5);
    }

    #[test]
    fn bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut bad_nonce = args(&dir);
        bad_nonce.nonce = Some("short".into());
        assert!(format!("{:#}", render(&bad_nonce).unwrap_err()).contains("x-relay-nonce"));
        let mut bad_path = args(&dir);
        bad_path.path = "v1/messages".into();
        assert!(render(&bad_path).is_err());
        let mut short_secret = args(&dir);
        std::fs::write(&short_secret.secret_file, "short").unwrap();
        let err = format!("{:#}", render(&short_secret).unwrap_err());
        assert!(
            err.contains("at least 32 bytes") && !err.contains("short\n"),
            "{err}"
        );
        short_secret.secret_file = dir.path().join("missing");
        assert!(render(&short_secret).is_err());
    }
}
