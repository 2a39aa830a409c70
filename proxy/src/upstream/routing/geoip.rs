//! Country and continent of a client address, from a MaxMind DB file
//! (GeoIP2/GeoLite2 Country or City; both carry `country.iso_code` and
//! `continent.code`).
//!
//! The file is read whole into memory when opened. [`GeoIp::reopen`] reuses
//! the loaded database while the file's size and modification time stay the
//! same, so a config reload (the config watcher already watches the file,
//! see `referenced_files`) re-reads the database only when it changed.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use maxminddb::Reader;

/// Where a client address is, as far as the database knows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Location {
    /// ISO 3166-1 alpha-2, such as `DE`.
    pub country: Option<String>,
    /// `AF`, `AN`, `AS`, `EU`, `NA`, `OC` or `SA`.
    pub continent: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("geoip database {}: {message}", path.display())]
pub struct GeoIpError {
    pub path: PathBuf,
    pub message: String,
}

/// One loaded database.
pub struct GeoIp {
    path: PathBuf,
    /// (length, modification time) when read.
    stamp: (u64, Option<SystemTime>),
    reader: Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("path", &self.path)
            .field("database_type", &self.reader.metadata().database_type)
            .finish_non_exhaustive()
    }
}

fn stamp_of(path: &Path) -> Result<(u64, Option<SystemTime>), GeoIpError> {
    let meta = std::fs::metadata(path).map_err(|e| GeoIpError {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok((meta.len(), meta.modified().ok()))
}

impl GeoIp {
    /// Reads and checks the database. A missing, unreadable or corrupt file
    /// is an error naming the path; the caller routes by the default then.
    pub fn open(path: &Path) -> Result<Self, GeoIpError> {
        let bad = |message: String| GeoIpError {
            path: path.to_owned(),
            message,
        };
        let stamp = stamp_of(path)?;
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let reader =
            Reader::from_source(bytes).map_err(|e| bad(format!("not a MaxMind DB: {e}")))?;
        let kind = reader.metadata().database_type.clone();
        if !(kind.contains("Country") || kind.contains("City")) {
            tracing::warn!(path = %path.display(), database_type = %kind, "geoip database is neither a Country nor a City database; lookups may find nothing");
        }
        Ok(Self {
            path: path.to_owned(),
            stamp,
            reader,
        })
    }

    /// `previous` when it was read from the same, unchanged file; else a fresh read.
    pub fn reopen(previous: Option<&Arc<GeoIp>>, path: &Path) -> Result<Arc<Self>, GeoIpError> {
        if let Some(previous) = previous
            && previous.path == path
            && stamp_of(path)? == previous.stamp
        {
            return Ok(previous.clone());
        }
        Self::open(path).map(Arc::new)
    }

    /// The location of `ip`; empty when the database has no record. Lookup
    /// errors (a damaged record) are treated as no record.
    pub fn lookup(&self, ip: IpAddr) -> Location {
        let record = self
            .reader
            .lookup(ip.to_canonical())
            .and_then(|found| found.decode::<maxminddb::geoip2::Country<'_>>());
        match record {
            Ok(Some(c)) => Location {
                // Anycast and satellite ranges may lack `country`; the
                // registered country is the next best guess.
                country: c
                    .country
                    .iso_code
                    .or(c.registered_country.iso_code)
                    .map(str::to_owned),
                continent: c.continent.code.map(str::to_owned),
            },
            Ok(None) => Location::default(),
            Err(e) => {
                tracing::debug!(%ip, error = %e, "geoip lookup failed");
                Location::default()
            }
        }
    }
}
