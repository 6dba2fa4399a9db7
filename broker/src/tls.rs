//! The TLS options of a `rediss://` or `amqps://` URL, spelled as redis-py and kombu spell them:
//!
//! - `ssl_ca_certs=/path/ca.pem`: the CA (PEM, one or more certificates) the server's certificate
//!   must chain to. For `rediss://` it replaces the system's roots; for `amqps://` it is added to
//!   them (lapin always loads the system roots).
//! - `ssl_certfile=/path/client.pem` and `ssl_keyfile=/path/client.key`: a client certificate (PEM)
//!   and its unencrypted private key (PEM, PKCS#8, PKCS#1 or SEC1), for servers that require one.
//!   Without `ssl_keyfile` the key is read from `ssl_certfile` (one PEM file holding both, as
//!   Python's `ssl` allows).
//! - `ssl_cert_reqs=required|optional|none` (also `CERT_REQUIRED`, `CERT_OPTIONAL`, `CERT_NONE`, as
//!   Celery's Redis backend spells them; case does not matter). `required`, the default, verifies
//!   the server's certificate and host name; `optional` does the same (a TLS server always sends a
//!   certificate, so Python's `CERT_OPTIONAL` verifies it on a client); `none` turns verification
//!   off — anyone on the path can then read and change the traffic, so it is logged as a warning,
//!   and only `rediss://` accepts it.
//!
//! The files are read when the URL is opened, so a missing or unreadable file is an
//! [`BrokerError::InvalidUrl`] naming the option and the path, never a failed handshake later. No
//! error and no `Debug` output shows what a file holds. Giving these options on a plain `redis://`
//! or `amqp://` URL is an error: TLS would silently not happen.

use std::path::Path;

use crate::error::{BrokerError, Result};
use crate::url::BrokerUrl;

/// The TLS query options, for the transports' lists of known options.
pub const OPTIONS: &[&str] = &[
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
];

/// Whether the server's certificate is verified (`ssl_cert_reqs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertReqs {
    /// Verify the certificate chain and the host name (the default).
    Required,
    /// As `Required`: a server always presents a certificate.
    Optional,
    /// No verification at all.
    None,
}

/// The TLS material a URL names, read from its files.
#[derive(Clone)]
pub struct TlsOptions {
    /// PEM certificates to trust (`ssl_ca_certs`).
    pub ca_certs: Option<Vec<u8>>,
    /// PEM client certificate chain and private key (`ssl_certfile`, `ssl_keyfile`).
    pub client: Option<ClientIdentity>,
    pub cert_reqs: CertReqs,
}

/// A client certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field("ca_certs", &self.ca_certs.as_ref().map(|_| "<pem>"))
            .field("client", &self.client.as_ref().map(|_| "<pem, key hidden>"))
            .field("cert_reqs", &self.cert_reqs)
            .finish()
    }
}

impl TlsOptions {
    /// Reads the TLS options of `url`: `None` for a plain (non-TLS) URL without any of them, an
    /// error for a plain URL with one of them, or for a file that cannot be read or holds no PEM of
    /// the right kind.
    pub fn from_url(url: &BrokerUrl) -> Result<Option<TlsOptions>> {
        let invalid = |reason: String| BrokerError::InvalidUrl {
            url: url.redacted(),
            reason,
        };
        let mut given = Vec::new();
        for name in OPTIONS {
            if let Some(v) = url.option::<String>(name)? {
                given.push((*name, v));
            }
        }
        let get = |name: &str| {
            given
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.as_str())
        };
        if !url.tls {
            return match given.first() {
                None => Ok(None),
                Some((name, _)) => Err(invalid(format!(
                    "option `{name}` needs a TLS URL (rediss:// or amqps://)"
                ))),
            };
        }
        let cert_reqs = match get("ssl_cert_reqs") {
            None => CertReqs::Required,
            Some(v) => parse_cert_reqs(v).ok_or_else(|| {
                invalid(format!(
                    "option `ssl_cert_reqs={v}`: expected required, optional or none"
                ))
            })?,
        };
        let ca_certs = match get("ssl_ca_certs") {
            None => None,
            Some(path) => {
                Some(read_pem("ssl_ca_certs", path, "CERTIFICATE-----").map_err(invalid)?)
            }
        };
        let client = match (get("ssl_certfile"), get("ssl_keyfile")) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(invalid(
                    "option `ssl_keyfile` without `ssl_certfile`: give the client certificate too"
                        .into(),
                ))
            }
            (Some(cert), key) => Some(ClientIdentity {
                cert_pem: read_pem("ssl_certfile", cert, "CERTIFICATE-----").map_err(invalid)?,
                key_pem: match key {
                    Some(key) => read_pem("ssl_keyfile", key, "PRIVATE KEY-----"),
                    None => read_pem("ssl_certfile", cert, "PRIVATE KEY-----")
                        .map_err(|e| format!("{e} (give the key file as `ssl_keyfile`)")),
                }
                .map_err(invalid)?,
            }),
        };
        Ok(Some(TlsOptions {
            ca_certs,
            client,
            cert_reqs,
        }))
    }

    /// True if the server's certificate is not verified (`ssl_cert_reqs=none`).
    pub fn insecure(&self) -> bool {
        self.cert_reqs == CertReqs::None
    }
}

/// The redis crate's client for `url`, whose `target` is the URL as the redis crate spells it (no
/// query string): the CA and client certificate of the URL's TLS options go in, and
/// `ssl_cert_reqs=none` becomes the crate's `#insecure` (with a warning).
#[cfg(feature = "redis")]
pub(crate) fn redis_client(url: &BrokerUrl, target: &str) -> Result<redis::Client> {
    let invalid = |reason: String| BrokerError::InvalidUrl {
        url: url.redacted(),
        reason,
    };
    let Some(tls) = TlsOptions::from_url(url)? else {
        return redis::Client::open(target).map_err(|e| invalid(e.to_string()));
    };
    let mut target = target.to_owned();
    if tls.insecure() {
        tracing::warn!(
            url = %url.redacted(),
            "ssl_cert_reqs=none: the Redis server's certificate is NOT verified; anyone on the \
             network path can read and change this connection"
        );
        if let Some(hash) = target.find('#') {
            target.truncate(hash);
        }
        target.push_str("#insecure");
    }
    if tls.ca_certs.is_none() && tls.client.is_none() {
        return redis::Client::open(target.as_str()).map_err(|e| invalid(e.to_string()));
    }
    let certificates = redis::TlsCertificates {
        client_tls: tls.client.map(|c| redis::ClientTlsConfig {
            client_cert: c.cert_pem,
            client_key: c.key_pem,
        }),
        root_cert: tls.ca_certs,
    };
    redis::Client::build_with_tls(target.as_str(), certificates)
        .map_err(|e| invalid(format!("TLS options: {e}")))
}

/// lapin's TLS settings for `tls` (`None`: a plain URL): the CA (added to the system roots) and the
/// client certificate. `ssl_cert_reqs=none` is an error: lapin always verifies.
#[cfg(feature = "amqp")]
pub(crate) fn lapin_config(
    tls: Option<&TlsOptions>,
) -> std::result::Result<lapin::tcp::OwnedTLSConfig, String> {
    let Some(tls) = tls else {
        return Ok(lapin::tcp::OwnedTLSConfig::default());
    };
    if tls.insecure() {
        return Err(
            "option `ssl_cert_reqs=none`: amqps:// always verifies the server's \
                    certificate (give its CA as `ssl_ca_certs`)"
                .into(),
        );
    }
    let cert_chain = match &tls.ca_certs {
        None => None,
        Some(pem) => Some(
            String::from_utf8(pem.clone())
                .map_err(|_| "option `ssl_ca_certs`: the file is not UTF-8 PEM".to_owned())?,
        ),
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity: tls
            .client
            .as_ref()
            .map(|c| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: c.cert_pem.clone(),
                key: c.key_pem.clone(),
            }),
        cert_chain,
    })
}

fn parse_cert_reqs(v: &str) -> Option<CertReqs> {
    let v = v.to_ascii_lowercase();
    match v.strip_prefix("cert_").unwrap_or(&v) {
        "required" => Some(CertReqs::Required),
        "optional" => Some(CertReqs::Optional),
        "none" => Some(CertReqs::None),
        _ => None,
    }
}

/// Reads a PEM file and checks that it holds a block whose label ends in `label_end`
/// (`CERTIFICATE-----`, `PRIVATE KEY-----`). The error names the option and the path only.
fn read_pem(option: &str, path: &str, label_end: &str) -> std::result::Result<Vec<u8>, String> {
    let bytes = std::fs::read(Path::new(path))
        .map_err(|e| format!("option `{option}`: cannot read `{path}`: {e}"))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text
        .lines()
        .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(label_end));
    if !found {
        let what = if label_end.starts_with("CERT") {
            "a PEM certificate"
        } else {
            "a PEM private key (an encrypted key is not supported)"
        };
        return Err(format!("option `{option}`: `{path}` holds no {what}"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(raw: &str) -> Result<Option<TlsOptions>> {
        TlsOptions::from_url(&BrokerUrl::parse(raw)?)
    }

    /// A temporary directory with a fake CA file, a client cert, a key and a combined file.
    struct Files(std::path::PathBuf);
    impl Files {
        fn new(tag: &str) -> Files {
            let dir = std::env::temp_dir()
                .join(format!("celerity-tls-unit-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let cert = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
            let key = "-----BEGIN PRIVATE KEY-----\nSECRETKEYBYTES\n-----END PRIVATE KEY-----\n";
            std::fs::write(dir.join("ca.pem"), cert).unwrap();
            std::fs::write(dir.join("key.pem"), key).unwrap();
            std::fs::write(dir.join("both.pem"), format!("{cert}{key}")).unwrap();
            Files(dir)
        }
        fn path(&self, name: &str) -> String {
            self.0.join(name).display().to_string()
        }
    }
    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn plain_urls_have_none_and_refuse_tls_options() {
        assert!(opts("redis://h/0").unwrap().is_none());
        assert!(opts("amqp://h//").unwrap().is_none());
        let e = opts("redis://h/0?ssl_cert_reqs=required").unwrap_err();
        assert!(e.to_string().contains("needs a TLS URL"), "{e}");
        assert!(opts("amqp://h//?ssl_ca_certs=/x").is_err());
    }

    #[test]
    fn cert_reqs_spellings() {
        for (v, want) in [
            ("required", CertReqs::Required),
            ("CERT_REQUIRED", CertReqs::Required),
            ("optional", CertReqs::Optional),
            ("CERT_OPTIONAL", CertReqs::Optional),
            ("none", CertReqs::None),
            ("CERT_NONE", CertReqs::None),
        ] {
            let o = opts(&format!("rediss://h/0?ssl_cert_reqs={v}"))
                .unwrap()
                .unwrap();
            assert_eq!(o.cert_reqs, want, "{v}");
        }
        assert!(opts("rediss://h/0?ssl_cert_reqs=maybe").is_err());
        let o = opts("rediss://h/0").unwrap().unwrap();
        assert_eq!(o.cert_reqs, CertReqs::Required);
        assert!(o.ca_certs.is_none() && o.client.is_none());
    }

    #[test]
    fn files_are_read_and_checked_without_showing_their_content() {
        let f = Files::new("read");
        let o = opts(&format!(
            "rediss://h/0?ssl_ca_certs={}&ssl_certfile={}&ssl_keyfile={}",
            f.path("ca.pem"),
            f.path("ca.pem"),
            f.path("key.pem")
        ))
        .unwrap()
        .unwrap();
        assert!(o.ca_certs.is_some() && o.client.is_some());
        assert!(!format!("{o:?}").contains("SECRETKEYBYTES"));
        // One file holding certificate and key.
        let o = opts(&format!("amqps://h//?ssl_certfile={}", f.path("both.pem")))
            .unwrap()
            .unwrap();
        assert!(o.client.is_some());
        for bad in [
            // A key where a certificate belongs, and the other way round: the error names the
            // option and the path, never the bytes.
            format!("rediss://h/0?ssl_ca_certs={}", f.path("key.pem")),
            format!(
                "rediss://h/0?ssl_certfile={}&ssl_keyfile={}",
                f.path("ca.pem"),
                f.path("ca.pem")
            ),
            format!("rediss://h/0?ssl_certfile={}", f.path("ca.pem")),
            format!("rediss://h/0?ssl_keyfile={}", f.path("key.pem")),
            format!("rediss://h/0?ssl_ca_certs={}", f.path("missing.pem")),
        ] {
            let e = opts(&bad).unwrap_err().to_string();
            assert!(e.contains("ssl_"), "{bad}: {e}");
            assert!(!e.contains("SECRETKEYBYTES"), "{bad}: {e}");
        }
    }
}
