//! TLS termination settings: rustls with the aws-lc-rs provider, certificates chosen by SNI
//! (exact and one-label wildcard names, then the default), ALPN h2 and http/1.1, TLS 1.3 and
//! 1.2 (1.3 only when asked; never older), stateless tickets and a stateful session cache.
//! PEM files are read here, at start and on every reload; a bad file is an error naming it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fluxgate_conf::{Config, Http3, Tls, TlsVersion, UpstreamTls};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;

/// Values by TLS server name: exact names, and `*.example.com` matching exactly one more
/// label; the first entry for a name wins.
#[derive(Debug)]
pub(crate) struct SniMap<T> {
    exact: HashMap<String, T>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, T>,
}

impl<T> SniMap<T> {
    pub(crate) fn new() -> SniMap<T> {
        SniMap {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    pub(crate) fn insert(&mut self, name: &str, v: T) {
        let name = name.to_ascii_lowercase();
        let map = match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.entry(parent.to_owned()),
            None => self.exact.entry(name),
        };
        map.or_insert(v);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }

    /// The value for `name` (compared without case).
    pub(crate) fn get(&self, name: &str) -> Option<&T> {
        let name = name.to_ascii_lowercase();
        self.exact.get(&name).or_else(|| {
            name.split_once('.')
                .and_then(|(_, parent)| self.wildcard.get(parent))
        })
    }
}

/// Picks the certificate for a handshake by its server name.
#[derive(Debug)]
struct SniResolver {
    names: SniMap<Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let found = hello.server_name().and_then(|n| self.names.get(n));
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

/// The common name of the certificate a client presented (rustls verified it against the
/// listener's `client_ca` during the handshake): the client's identity.
pub(crate) fn client_identity(stream: &fluxgate_http::conn::ClientStream) -> Option<Box<str>> {
    let fluxgate_http::stream::MaybeTls::Tls(s) = stream else {
        return None;
    };
    let cert = s.get_ref().1.peer_certificates()?.first()?;
    fluxgate_wire::tls::subject_common_name(cert).map(Into::into)
}

/// The rustls server config for one listener's `[listener.tls]` over TCP.
pub(crate) fn server_config(t: &Tls) -> Result<Arc<rustls::ServerConfig>, String> {
    let versions: &[&'static rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let mut cfg = rustls_server(t, versions, true)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // 0-RTT: rustls takes early data only on stateful resumption (the config guarantees
    // tickets are off then). The data is handed to HTTP only once the handshake completes,
    // so a replayed first flight, which cannot complete it, is never acted on (RFC 8470 3).
    cfg.max_early_data_size = t.early_data as u32;
    Ok(Arc::new(cfg))
}

/// The QUIC server config for one listener's HTTP/3: the same certificates, names, session
/// cache and ticket keys as its TCP side, TLS 1.3 and ALPN h3 only, with `[http3]`'s
/// transport limits. With `early_data`, sessions resume from the cache only (rustls takes
/// 0-RTT data only on stateful resumption, so no tickets are issued).
pub(crate) fn quic_config(
    t: &Tls,
    h3: &Http3,
    resumed: &Arc<AtomicU64>,
) -> Result<quinn::ServerConfig, String> {
    let mut cfg = rustls_server(t, &[&rustls::version::TLS13], !h3.early_data)?;
    cfg.alpn_protocols = vec![b"h3".to_vec()];
    // quinn does not tell whether a handshake resumed: what resumes sessions counts it.
    cfg.session_storage = Arc::new(Counting {
        inner: Arc::clone(&cfg.session_storage),
        hits: Arc::clone(resumed),
    });
    if cfg.ticketer.enabled() {
        cfg.ticketer = Arc::new(Counting {
            inner: Arc::clone(&cfg.ticketer),
            hits: Arc::clone(resumed),
        });
    }
    if h3.early_data {
        if t.session_cache == 0 {
            return Err("http3.early_data needs a session cache (session_cache > 0)".into());
        }
        // QUIC takes no less: early data is bounded by its flow control instead.
        cfg.max_early_data_size = u32::MAX;
    } else {
        cfg.max_early_data_size = 0;
    }
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(cfg))
        .map_err(|e| format!("QUIC: {e}"))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(h3.max_streams.into());
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(h3.idle_timeout)
            .map_err(|_| "http3.idle_timeout out of range")?,
    ));
    transport.keep_alive_interval(Some(h3.keepalive_interval));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// A session cache or ticketer that counts the sessions it gives back (resumptions).
#[derive(Debug)]
struct Counting<T: ?Sized> {
    inner: Arc<T>,
    hits: Arc<AtomicU64>,
}

impl<T: ?Sized> Counting<T> {
    fn hit<V>(&self, v: Option<V>) -> Option<V> {
        if v.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        v
    }
}

impl rustls::server::StoresServerSessions for Counting<dyn rustls::server::StoresServerSessions> {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, value)
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.hit(self.inner.get(key))
    }
    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.hit(self.inner.take(key))
    }
    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

impl rustls::server::ProducesTickets for Counting<dyn rustls::server::ProducesTickets> {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }
    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }
    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.hit(self.inner.decrypt(cipher))
    }
}

/// What the TCP and QUIC configs of a listener share: certificates by SNI, the session
/// cache and (`tickets`) the ticketer.
fn rustls_server(
    t: &Tls,
    versions: &[&'static rustls::SupportedProtocolVersion],
    tickets: bool,
) -> Result<rustls::ServerConfig, String> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut names = SniMap::new();
    let mut default = None;
    for c in &t.certificates {
        let key = load_key(&provider, &c.cert, &c.key)?;
        default.get_or_insert_with(|| Arc::clone(&key));
        for n in &c.names {
            names.insert(n, Arc::clone(&key));
        }
    }
    let resolver = SniResolver {
        names,
        default: default.ok_or("no certificate configured")?,
    };
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?;
    let builder = match &t.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let mut roots = rustls::RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(certs(&auth.ca)?);
            if added == 0 {
                return Err(format!("{}: no usable CA certificate", auth.ca.display()));
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = match auth.required {
                true => verifier,
                false => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("{}: {e}", auth.ca.display()))?,
            )
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(resolver));
    cfg.session_storage = if t.session_cache > 0 {
        ServerSessionMemoryCache::new(t.session_cache)
    } else {
        Arc::new(NoServerSessionStorage {})
    };
    // Without `tickets`, rustls's default stays: none are issued.
    match &t.ticket_keys {
        Some(path) if tickets => {
            cfg.ticketer = Arc::new(crate::io::tickets::FileTicketer::load(path)?);
        }
        None if tickets && t.session_tickets => {
            cfg.ticketer = aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
        }
        _ => {}
    }
    Ok(cfg)
}

/// PEM certificates from a file.
fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The system's trust store: `SSL_CERT_FILE`, else the first bundle found at the usual places.
fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let bundles = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ];
    let path = from_env
        .into_iter()
        .chain(bundles.iter().map(Into::into))
        .find(|p| p.exists())
        .ok_or("no system CA bundle found (set `ca` or SSL_CERT_FILE)")?;
    certs(&path)
}

/// The rustls client config for one upstream's `tls`: roots (given or the system's), an
/// optional client certificate, ALPN for the upstream protocol, session resumption (rustls'
/// in-memory cache, on by default).
pub(crate) fn upstream_config(
    t: &UpstreamTls,
    protocol: fluxgate_conf::UpstreamProtocol,
) -> Result<Arc<rustls::ClientConfig>, String> {
    use fluxgate_conf::UpstreamProtocol;
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let anchors = match &t.ca {
        Some(ca) => certs(ca)?,
        None => system_roots()?,
    };
    let (added, _) = roots.add_parsable_certificates(anchors);
    if added == 0 {
        return Err(match &t.ca {
            Some(ca) => format!("{}: no usable CA certificate", ca.display()),
            None => "no usable system CA certificate".into(),
        });
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match protocol {
        // QUIC carries TLS 1.3 only.
        UpstreamProtocol::H3 => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(versions)
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let mut cfg = match &t.client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certs(cert)?;
            let der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, der)
                .map_err(|e| format!("{} / {}: {e}", cert.display(), key.display()))?
        }
    };
    cfg.alpn_protocols = vec![match protocol {
        UpstreamProtocol::Http1 => b"http/1.1".to_vec(),
        UpstreamProtocol::H2c => b"h2".to_vec(),
        UpstreamProtocol::H3 => b"h3".to_vec(),
    }];
    Ok(Arc::new(cfg))
}

/// TLS client settings of every upstream of `config` (None for cleartext ones).
pub(crate) fn upstream_configs(
    config: &Config,
) -> Result<Vec<Option<Arc<rustls::ClientConfig>>>, String> {
    config
        .upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| {
            u.tls
                .as_ref()
                .map(|t| {
                    upstream_config(t, u.protocol).map_err(|e| format!("upstream[{i}].tls: {e}"))
                })
                .transpose()
        })
        .collect()
}

/// Whether the first bytes of a connection hold a TLS ClientHello with the early_data
/// extension. Anything short or malformed reads as "no".
pub(crate) fn offers_early_data(b: &[u8]) -> bool {
    use fluxgate_wire::tls::{client_hello_extensions, EARLY_DATA};
    let mut offered = false;
    client_hello_extensions(b, |kind, _| offered |= kind == EARLY_DATA);
    offered
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

/// QUIC settings of every listener of `config` that serves HTTP/3 (None for the others);
/// `resumed[i]` counts listener i's resumed handshakes.
pub(crate) fn quic_configs(
    config: &Config,
    resumed: &[Arc<AtomicU64>],
) -> Result<Vec<Option<quinn::ServerConfig>>, String> {
    config
        .listeners
        .iter()
        .enumerate()
        .map(|(i, l)| match (&l.tls, l.http3) {
            (Some(t), true) => quic_config(t, &config.http3, &resumed[i])
                .map(Some)
                .map_err(|e| format!("listener[{i}].tls: {e}")),
            _ => Ok(None),
        })
        .collect()
}

/// Loads every certificate and key `config` names, as `fluxgate check` and reloads do.
pub fn validate(config: &Config) -> Result<(), String> {
    listener_configs(config)?;
    let counters: Vec<_> = config.listeners.iter().map(|_| Arc::default()).collect();
    quic_configs(config, &counters)?;
    upstream_configs(config).map(|_| ())
}
