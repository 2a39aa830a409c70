//! The test vectors of docs/signing.md, checked against the code, so the
//! document cannot drift from what the relay does.

use std::collections::HashMap;
use std::time::Duration;

use claude_relay_proxy::admission::signing::{
    self, Request, SignatureHeaders, SigningSecret, Stamp, canonical_string,
};
use sha2::{Digest, Sha256};

struct Vector {
    fields: HashMap<String, String>,
    canonical: String,
}

impl Vector {
    fn get(&self, name: &str) -> &str {
        self.fields
            .get(name)
            .unwrap_or_else(|| panic!("vector lacks {name:?}"))
    }
}

/// Each ```vector block (`name: value` lines) with the ```canonical block after it.
fn vectors(doc: &str) -> Vec<Vector> {
    let mut out = Vec::new();
    let mut lines = doc.lines();
    let mut pending: Option<HashMap<String, String>> = None;
    while let Some(line) = lines.next() {
        match line.trim_end() {
            "```vector" => {
                assert!(pending.is_none(), "a vector without its canonical block");
                let mut fields = HashMap::new();
                for line in lines.by_ref().take_while(|l| !l.starts_with("```")) {
                    let (name, value) = line.split_once(':').expect("name: value");
                    // One space separates name and value; the rest is the value.
                    let value = value.strip_prefix(' ').unwrap_or(value);
                    fields.insert(name.to_owned(), value.to_owned());
                }
                pending = Some(fields);
            }
            "```canonical" => {
                let fields = pending.take().expect("a canonical block without a vector");
                let canonical: Vec<&str> = lines
                    .by_ref()
                    .take_while(|l| !l.starts_with("```"))
                    .collect();
                out.push(Vector {
                    fields,
                    canonical: canonical.join("\n"),
                });
            }
            _ => {}
        }
    }
    assert!(pending.is_none(), "a vector without its canonical block");
    out
}

#[test]
fn documented_vectors_match_the_code() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/signing.md");
    let doc = std::fs::read_to_string(path).expect("docs/signing.md");
    let vectors = vectors(&doc);
    assert!(vectors.len() >= 2, "the doc promises at least two vectors");

    for v in &vectors {
        let secret = SigningSecret::new(v.get("secret").as_bytes()).unwrap();
        let timestamp: u64 = v.get("timestamp").parse().unwrap();
        let stamp = Stamp {
            key_id: v.get("key_id"),
            timestamp,
            nonce: v.get("nonce"),
        };
        let request = Request {
            method: v.get("method"),
            path_and_query: v.get("path"),
            body: v.get("body").as_bytes(),
        };
        let name = v.get("key_id");
        assert_eq!(
            hex::encode(Sha256::digest(request.body)),
            v.get("body_sha256"),
            "{name}: body hash"
        );
        assert_eq!(
            canonical_string(&stamp, &request),
            v.canonical,
            "{name}: canonical string"
        );
        assert_eq!(
            signing::sign(&secret, &stamp, &request),
            v.get("signature"),
            "{name}: signature"
        );

        // And the relay's side accepts it, from the documented header values.
        let timestamp_text = timestamp.to_string();
        let headers = SignatureHeaders::parse(
            stamp.key_id,
            &timestamp_text,
            stamp.nonce,
            v.get("signature"),
        )
        .unwrap();
        let verified = signing::verify(
            &headers,
            &request,
            &[secret],
            timestamp,
            Duration::from_secs(300),
        );
        assert!(verified.is_ok(), "{name}: {verified:?}");
    }
}

#[test]
fn the_parser_notices_a_wrong_vector() {
    // Guards the guard: a doc with a wrong signature must not pass silently.
    let doc = "```vector\nsecret: s\nbody:\n```\ntext\n```canonical\na\nb\n```\n";
    let parsed = vectors(doc);
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].get("body"), "");
    assert_eq!(parsed[0].canonical, "a\nb");
}

/// What the header table and the canonical string's description say of
/// letter case: the signature header is accepted in either case (signers in
/// Java or .NET often write uppercase hex); the body hash inside the signed
/// string must be lowercase, so a signer that hashed it in uppercase gets
/// `bad signature`.
#[test]
fn the_signature_is_read_in_either_case_but_the_signed_body_hash_is_lowercase() {
    use hmac::{Hmac, KeyInit, Mac};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/signing.md");
    let doc = std::fs::read_to_string(path).expect("docs/signing.md");
    let row = doc
        .lines()
        .find(|l| l.starts_with("| `x-relay-signature` |"))
        .expect("the header table names x-relay-signature");
    assert!(
        row.contains("uppercase") && row.contains("accepted"),
        "{row}"
    );

    for v in vectors(&doc) {
        let secret = SigningSecret::new(v.get("secret").as_bytes()).unwrap();
        let timestamp: u64 = v.get("timestamp").parse().unwrap();
        let timestamp_text = timestamp.to_string();
        let request = Request {
            method: v.get("method"),
            path_and_query: v.get("path"),
            body: v.get("body").as_bytes(),
        };
        let verify = |signature: &str| {
            let headers = SignatureHeaders::parse(
                v.get("key_id"),
                &timestamp_text,
                v.get("nonce"),
                signature,
            )
            .map_err(|e| e.to_string())?;
            signing::verify(
                &headers,
                &request,
                std::slice::from_ref(&secret),
                timestamp,
                Duration::from_secs(300),
            )
            .map(drop)
            .map_err(|e| e.to_string())
        };
        let documented = v.get("signature");
        let upper = format!("v1={}", documented["v1=".len()..].to_uppercase());
        assert_eq!(verify(&upper), Ok(()), "{}: uppercase hex", v.get("key_id"));

        let upper_hash = v
            .canonical
            .replace(v.get("body_sha256"), &v.get("body_sha256").to_uppercase());
        let mut mac = Hmac::<Sha256>::new_from_slice(v.get("secret").as_bytes()).unwrap();
        mac.update(upper_hash.as_bytes());
        let wrong = format!("v1={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(verify(&wrong), Err("bad signature".to_owned()));
    }
}
