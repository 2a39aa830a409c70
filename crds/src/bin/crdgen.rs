//! Prints or writes the CRD YAML generated from the Rust types.
//!
//! `cargo run -p claude-relay-crds --bin crdgen` writes `crds/yaml/*.yaml`;
//! with `--stdout` it prints them as one multi-document stream instead.

use std::path::Path;

use claude_relay_crds::resources::crd_documents;

fn main() -> std::io::Result<()> {
    let docs = crd_documents();
    if std::env::args().any(|a| a == "--stdout") {
        for (_, yaml) in &docs {
            print!("---\n{yaml}");
        }
        return Ok(());
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("yaml");
    std::fs::create_dir_all(&dir)?;
    for (file, yaml) in &docs {
        std::fs::write(dir.join(file), yaml)?;
        eprintln!("wrote {}", dir.join(file).display());
    }
    Ok(())
}
