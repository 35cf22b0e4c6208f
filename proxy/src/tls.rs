//! TLS termination settings: rustls with the aws-lc-rs provider, certificates chosen by SNI
//! (exact and one-label wildcard names, then the default), ALPN h2 and http/1.1, TLS 1.3 and
//! 1.2 (1.3 only when asked; never older), stateless tickets and a stateful session cache.
//! PEM files are read here, at start and on every reload; a bad file is an error naming it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use fluxgate_conf::{Config, Tls, TlsVersion};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;

/// Picks the certificate for a handshake by its server name.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`: matches exactly one more label.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(Arc::clone(&self.default));
        };
        let name = name.to_ascii_lowercase();
        let found = self.exact.get(&name).or_else(|| {
            name.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        });
        Some(Arc::clone(found.unwrap_or(&self.default)))
    }
}

fn load_key(
    provider: &rustls::crypto::CryptoProvider,
    cert: &Path,
    key: &Path,
) -> Result<Arc<CertifiedKey>, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            key.display(),
            cert.display()
        )
    })?;
    Ok(Arc::new(certified))
}

/// The rustls server config for one listener's `[listener.tls]`.
pub(crate) fn server_config(t: &Tls) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut default = None;
    for c in &t.certificates {
        let key = load_key(&provider, &c.cert, &c.key)?;
        default.get_or_insert_with(|| Arc::clone(&key));
        for n in &c.names {
            match n.strip_prefix("*.") {
                Some(parent) => wildcard.insert(parent.to_owned(), Arc::clone(&key)),
                None => exact.insert(n.clone(), Arc::clone(&key)),
            };
        }
    }
    let resolver = SniResolver {
        exact,
        wildcard,
        default: default.ok_or("no certificate configured")?,
    };
    let versions: &[&'static rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    cfg.session_storage = if t.session_cache > 0 {
        ServerSessionMemoryCache::new(t.session_cache)
    } else {
        Arc::new(NoServerSessionStorage {})
    };
    if t.session_tickets {
        cfg.ticketer = aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
    }
    Ok(Arc::new(cfg))
}

/// TLS settings of every listener of `config` (None for cleartext ones).
pub(crate) fn listener_configs(
    config: &Config,
) -> Result<Vec<Option<Arc<rustls::ServerConfig>>>, String> {
    config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.tls
                .as_ref()
                .map(|t| server_config(t).map_err(|e| format!("listener[{i}].tls: {e}")))
                .transpose()
        })
        .collect()
}

/// Loads every certificate and key `config` names, as `fluxgate check` and reloads do.
pub fn validate(config: &Config) -> Result<(), String> {
    listener_configs(config).map(|_| ())
}
