//! How ferryd and ferryctl reach etcd: plain `http://`, or `https://` with
//! a CA for etcd's server certificate and a client certificate for etcd's
//! `--client-cert-auth`; and etcd's own users (a name and a password file).
//!
//! - [`EtcdAccess::check`] is pure: which flags go together, run when the
//!   command line is resolved, before anything is read or touched.
//! - [`Conn::open`] reads and checks the files (a key that does not belong
//!   to its certificate is refused here, not at the first handshake), makes
//!   one TLS handshake of its own per endpoint ([`probe`]), then starts the
//!   gRPC client and logs in. The probe is there because tonic's balanced
//!   channel drops an endpoint whose handshake fails and leaves the request
//!   waiting: an unknown issuer, a wrong name or a client certificate etcd
//!   rejects would otherwise all read as "timed out".
//! - [`Conn`] logs in again when etcd no longer knows its token (a restarted
//!   etcd forgets simple tokens; JWT tokens expire): etcd-client logs in
//!   only once, at connect.
//! - [`describe`] turns etcd's errors into a sentence naming the flag to fix.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{AlertDescription, CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{StoreError, StoreResult};

pub const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP connect and TLS handshake of the probe, each.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The etcd flags of `ferryd run`, `ferryd leave` and `ferryctl`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// `--etcd-ca-file`: the CA that signed etcd's server certificate.
    pub ca_file: Option<PathBuf>,
    /// `--etcd-cert-file` + `--etcd-key-file`: this client's certificate.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// `--etcd-username` + `--etcd-password-file`.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
}

impl EtcdAccess {
    fn tls_flag(&self) -> Option<&'static str> {
        [
            (self.ca_file.is_some(), "--etcd-ca-file"),
            (self.cert_file.is_some(), "--etcd-cert-file"),
            (self.key_file.is_some(), "--etcd-key-file"),
        ]
        .into_iter()
        .find_map(|(given, flag)| given.then_some(flag))
    }

    fn any_flag(&self) -> Option<&'static str> {
        self.tls_flag().or_else(|| {
            [
                (self.username.is_some(), "--etcd-username"),
                (self.password_file.is_some(), "--etcd-password-file"),
            ]
            .into_iter()
            .find_map(|(given, flag)| given.then_some(flag))
        })
    }

    /// Checks the flags against the store's endpoints (`None`: the store is
    /// not etcd). Pure.
    pub fn check(&self, urls: Option<&[String]>) -> Result<(), String> {
        let Some(urls) = urls else {
            return match self.any_flag() {
                Some(f) => Err(format!("{f} is only for an etcd store (--store etcd:URL)")),
                None => Ok(()),
            };
        };
        let https = urls.iter().filter(|u| u.starts_with("https://")).count();
        if https != 0 && https != urls.len() {
            return Err(format!(
                "etcd endpoints {}: either all http:// or all https://",
                urls.join(",")
            ));
        }
        if https == 0 {
            if let Some(f) = self.tls_flag() {
                return Err(format!(
                    "{f} is given but etcd endpoint {} is plain http://: write https:// \
                     (ferry never falls back to plain text when TLS was asked for)",
                    urls[0]
                ));
            }
        }
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => {
                return Err("--etcd-cert-file needs --etcd-key-file (its private key)".into())
            }
            (None, Some(_)) => {
                return Err("--etcd-key-file needs --etcd-cert-file (its certificate)".into())
            }
            _ => {}
        }
        match (&self.username, &self.password_file) {
            (Some(_), None) => Err(
                "--etcd-username needs --etcd-password-file (a file holding the password)".into(),
            ),
            (None, Some(_)) => Err("--etcd-password-file needs --etcd-username".into()),
            (Some(u), Some(_)) if u.is_empty() || u.chars().any(char::is_control) => Err(format!(
                "--etcd-username {u:?}: must be a non-empty name without control characters"
            )),
            _ => Ok(()),
        }
    }

    /// Reads and checks the files the flags name.
    fn load(&self, urls: &[String]) -> Result<Credentials, String> {
        let tls = if urls.iter().all(|u| u.starts_with("https://")) {
            Some(self.load_tls()?)
        } else {
            None
        };
        let user = match (&self.username, &self.password_file) {
            (Some(name), Some(file)) => {
                if tls.is_none() {
                    tracing::warn!("etcd: the password goes over plain http://");
                }
                Some((name.clone(), file.clone()))
            }
            _ => None,
        };
        Ok(Credentials { tls, user })
    }

    fn load_tls(&self) -> Result<(TlsOptions, Arc<ClientConfig>), String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut options = TlsOptions::new();
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let pem = read("--etcd-ca-file", path)?;
                for cert in certificates("--etcd-ca-file", path, &pem)? {
                    roots.add(cert).map_err(|e| {
                        format!("--etcd-ca-file {}: not a usable CA: {e}", path.display())
                    })?;
                }
                options = options.ca_certificate(Certificate::from_pem(pem));
            }
            None => {
                let native = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(native.certs);
                if roots.is_empty() {
                    return Err(
                        "https:// etcd without --etcd-ca-file, and this system trusts \
                                no CA: give the CA that signed etcd's certificate"
                            .into(),
                    );
                }
                options = options.with_native_roots();
            }
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&self.cert_file, &self.key_file) {
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read("--etcd-cert-file", cert_path)?;
                let key_pem = read("--etcd-key-file", key_path)?;
                let chain = certificates("--etcd-cert-file", cert_path, &cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    format!(
                        "--etcd-key-file {}: no PEM private key in it ({e})",
                        key_path.display()
                    )
                })?;
                let mismatch = || {
                    format!(
                        "--etcd-key-file {} is not the key of the certificate in --etcd-cert-file {}",
                        key_path.display(),
                        cert_path.display()
                    )
                };
                match rustls::sign::CertifiedKey::from_der(
                    chain.clone(),
                    key.clone_key(),
                    &provider,
                ) {
                    Ok(_) => {}
                    Err(rustls::Error::InconsistentKeys(_)) => return Err(mismatch()),
                    Err(e) => return Err(format!("{}: {e}", mismatch())),
                }
                options = options.identity(Identity::from_pem(cert_pem, key_pem));
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("--etcd-cert-file {}: {e}", cert_path.display()))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((options, Arc::new(config)))
    }
}

fn read(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: cannot read it: {e}", path.display()))
}

fn certificates(
    flag: &str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{flag} {}: not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{flag} {}: no certificate in it (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

/// The password, from its file: one line, its newline dropped.
fn password(path: &Path) -> Result<String, String> {
    let bytes = read("--etcd-password-file", path)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("--etcd-password-file {}: not UTF-8", path.display()))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.is_empty() {
        return Err(format!("--etcd-password-file {}: empty", path.display()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), "etcd password file is readable by others (chmod 600)");
            }
        }
    }
    Ok(line.to_string())
}

struct Credentials {
    tls: Option<(TlsOptions, Arc<ClientConfig>)>,
    /// The name, and the file its password is read from at every login.
    user: Option<(String, PathBuf)>,
}

/// One TLS handshake with each endpoint until one succeeds; the error
/// names every endpoint's cause.
pub async fn probe(
    urls: &[String],
    config: &Arc<ClientConfig>,
    access: &EtcdAccess,
) -> Result<(), String> {
    let mut failed = Vec::new();
    for url in urls {
        match probe_one(url, config.clone(), access).await {
            Ok(()) => {
                for f in &failed {
                    tracing::warn!("etcd {f}");
                }
                return Ok(());
            }
            Err(e) => failed.push(format!("{url}: {e}")),
        }
    }
    Err(format!("etcd {}", failed.join("; ")))
}

/// The client preface and an empty SETTINGS frame of HTTP/2: etcd answers
/// with its own SETTINGS, or with an alert if it rejects the client.
const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

async fn probe_one(
    url: &str,
    config: Arc<ClientConfig>,
    access: &EtcdAccess,
) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    let host = uri
        .host()
        .ok_or("no host in the URL")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri.port_u16().unwrap_or(2379);
    let name = ServerName::try_from(host.clone())
        .map_err(|e| format!("{host:?} is not a host name or address: {e}"))?;
    let tcp = tokio::time::timeout(
        PROBE_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| format!("no TCP connection after {}s", PROBE_TIMEOUT.as_secs()))?
    .map_err(|e| format!("cannot connect: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let mut tls = tokio::time::timeout(PROBE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| format!("no TLS handshake after {}s", PROBE_TIMEOUT.as_secs()))?
        .map_err(|e| explain_tls(&e, access, true))?;
    // In TLS 1.3 the server judges the client's certificate after the
    // client has finished: the verdict comes with the first bytes it sends.
    tls.write_all(H2_HELLO)
        .await
        .map_err(|e| explain_tls(&e, access, false))?;
    let mut first = [0u8; 9];
    match tokio::time::timeout(PROBE_TIMEOUT, tls.read(&mut first)).await {
        Ok(Ok(0)) => Err(format!(
            "etcd closed the connection right after the TLS handshake{}",
            client_cert_hint(access)
        )),
        Ok(Ok(_)) | Err(_) => Ok(()),
        Ok(Err(e)) => Err(explain_tls(&e, access, false)),
    }
}

fn client_cert_hint(access: &EtcdAccess) -> &'static str {
    if access.cert_file.is_some() {
        ": etcd rejected the client certificate in --etcd-cert-file (not signed by a CA \
         in etcd's --trusted-ca-file, or expired)"
    } else {
        ": etcd wants a client certificate: give --etcd-cert-file and --etcd-key-file"
    }
}

const NOT_TLS: &str =
    "the endpoint does not speak TLS (is etcd serving https, with --cert-file, on it?)";

/// What a failed handshake (or first read after it) means, in words, with
/// the error itself.
fn explain_tls(e: &std::io::Error, access: &EtcdAccess, handshake: bool) -> String {
    let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let hint = match tls {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::UnknownIssuer if access.ca_file.is_some() => {
                "etcd's server certificate is not signed by the CA in --etcd-ca-file"
            }
            CertificateError::UnknownIssuer => {
                "etcd's server certificate is not signed by a CA this system trusts: \
                 give its CA with --etcd-ca-file"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "etcd's server certificate is not valid for the host in the URL"
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "etcd's server certificate has expired"
            }
            _ => "etcd's server certificate was refused",
        },
        Some(rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateRequired
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::HandshakeFailure
            | AlertDescription::AccessDenied,
        )) => &client_cert_hint(access)[2..],
        Some(rustls::Error::AlertReceived(_)) => "etcd refused the TLS connection",
        Some(rustls::Error::InvalidMessage(_)) => NOT_TLS,
        // A plain-text etcd hangs up on a TLS hello.
        None if handshake && e.kind() == std::io::ErrorKind::UnexpectedEof => NOT_TLS,
        _ if handshake => "TLS handshake failed",
        _ => "etcd refused the TLS connection",
    };
    format!("{hint} ({e})")
}

/// The etcd client and what it takes to log in again.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
}

struct Inner {
    urls: Vec<String>,
    /// `urls` joined, for messages.
    endpoints: String,
    /// Without the user: it is added at every login.
    options: ConnectOptions,
    user: Option<(String, PathBuf)>,
    client: std::sync::Mutex<Client>,
    /// Logins so far: a caller that saw a rejected token logs in again only
    /// if nobody has since it started its request.
    logins: AtomicU64,
    login_lock: tokio::sync::Mutex<()>,
}

impl Conn {
    /// Checks files and endpoints, connects, logs in; `base`: timeouts and
    /// keep-alive.
    pub async fn open(
        urls: &[String],
        access: &EtcdAccess,
        base: ConnectOptions,
    ) -> StoreResult<Conn> {
        let endpoints = urls.join(",");
        access.check(Some(urls)).map_err(StoreError::EtcdAccess)?;
        let creds = access.load(urls).map_err(StoreError::EtcdAccess)?;
        let mut options = base;
        if let Some((tls, config)) = creds.tls {
            probe(urls, &config, access)
                .await
                .map_err(StoreError::EtcdAccess)?;
            options = options.with_tls(tls);
        }
        let client = login(urls, &endpoints, &options, creds.user.as_ref()).await?;
        Ok(Conn {
            inner: Arc::new(Inner {
                urls: urls.to_vec(),
                endpoints,
                options,
                user: creds.user,
                client: std::sync::Mutex::new(client),
                logins: AtomicU64::new(1),
                login_lock: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// A handle on the current client (cheap: clients share one channel).
    pub fn client(&self) -> Client {
        self.inner.client.lock().expect("not poisoned").clone()
    }

    /// The endpoints, comma-separated, for messages.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// Runs one request with the operation timeout; when etcd says it no
    /// longer knows our token, logs in again for the next request (callers
    /// retry as they do after any etcd error).
    pub async fn timed<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> StoreResult<T> {
        let logins = self.inner.logins.load(Ordering::Acquire);
        let r = timed(&self.inner.endpoints, what, f).await;
        if let Err(StoreError::Etcd { source, .. }) = &r {
            self.after_error(source, logins).await;
        }
        r
    }

    /// Logs in again if `e` is etcd rejecting our token and nobody has
    /// since `logins` was read.
    pub async fn after_error(&self, e: &etcd_client::Error, logins: u64) {
        if token_rejected(e) {
            self.relogin(logins).await;
        }
    }

    /// Logs in again unless somebody has since `logins` was read.
    pub async fn relogin(&self, logins: u64) {
        if self.inner.user.is_none() {
            return;
        }
        let _one = self.inner.login_lock.lock().await;
        if self.inner.logins.load(Ordering::Acquire) != logins {
            return;
        }
        let i = &self.inner;
        match login(&i.urls, &i.endpoints, &i.options, i.user.as_ref()).await {
            Ok(c) => {
                *i.client.lock().expect("not poisoned") = c;
                i.logins.fetch_add(1, Ordering::AcqRel);
                tracing::info!("etcd: logged in again (the old token was rejected)");
            }
            Err(e) => tracing::warn!("etcd: cannot log in again: {e}"),
        }
    }

    /// Logins so far (see [`Conn::after_error`]).
    pub fn logins(&self) -> u64 {
        self.inner.logins.load(Ordering::Acquire)
    }
}

async fn login(
    urls: &[String],
    endpoints: &str,
    options: &ConnectOptions,
    user: Option<&(String, PathBuf)>,
) -> StoreResult<Client> {
    let mut options = options.clone();
    if let Some((name, file)) = user {
        // Read at every login: a rotated password is picked up.
        let pw = password(file).map_err(StoreError::EtcdAccess)?;
        options = options.with_user(name.clone(), pw);
    }
    let what = if user.is_some() { "log in" } else { "connect" };
    timed(endpoints, what, Client::connect(urls, Some(options))).await
}

/// One request with the operation timeout, errors named after `what`.
pub async fn timed<T>(
    endpoints: &str,
    what: &str,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> StoreResult<T> {
    match tokio::time::timeout(OP_TIMEOUT, f).await {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(source)) => Err(StoreError::Etcd {
            endpoints: endpoints.to_string(),
            what: what.to_string(),
            source,
        }),
        Err(_) => Err(StoreError::EtcdTimeout {
            endpoints: endpoints.to_string(),
            what: what.to_string(),
            secs: OP_TIMEOUT.as_secs(),
        }),
    }
}

/// etcd's answer to a token it does not know (any more).
pub fn token_rejected(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if rejects_token(s.message()))
}

pub fn rejects_token(said: &str) -> bool {
    said.contains("invalid auth token")
}

/// The flag to fix, for what etcd said.
fn hint(said: &str) -> Option<&'static str> {
    [
        (
            "invalid user ID or password",
            "check --etcd-username and the password in --etcd-password-file",
        ),
        (
            "permission denied",
            "the etcd user's role may not read and write ferry's keys: \
             grant it readwrite on the --etcd-prefix with --prefix=true",
        ),
        (
            "user name is empty",
            "etcd has authentication enabled: give --etcd-username and --etcd-password-file",
        ),
        (
            "authentication is not enabled",
            "etcd has no authentication enabled: drop --etcd-username",
        ),
    ]
    .into_iter()
    .find_map(|(text, hint)| said.contains(text).then_some(hint))
}

/// An etcd error as a sentence: what etcd said, and the flag to fix; for
/// other errors the whole chain of causes (tonic's own text is only
/// "transport error").
pub fn describe(e: &etcd_client::Error) -> String {
    if let etcd_client::Error::GRpcStatus(s) = e {
        let said = s.message();
        return match hint(said) {
            Some(h) => format!("etcd said {said:?}: {h}"),
            None => format!("etcd said {said:?} ({:?})", s.code()),
        };
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text = format!("{text}: {s_text}");
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| s.to_string()).collect()
    }

    fn tls() -> EtcdAccess {
        EtcdAccess {
            ca_file: Some("/ca.pem".into()),
            ..Default::default()
        }
    }

    #[test]
    fn tls_flags_with_plain_http_are_refused() {
        let e = tls().check(Some(&urls(&["http://h:2379"]))).unwrap_err();
        assert!(
            e.contains("--etcd-ca-file") && e.contains("plain http://"),
            "{e}"
        );
        let key_only = EtcdAccess {
            cert_file: Some("/c".into()),
            key_file: Some("/k".into()),
            ..Default::default()
        };
        let e = key_only.check(Some(&urls(&["http://h:2379"]))).unwrap_err();
        assert!(e.contains("--etcd-cert-file"), "{e}");
        assert_eq!(tls().check(Some(&urls(&["https://h:2379"]))), Ok(()));
    }

    #[test]
    fn schemes_are_not_mixed() {
        let e = EtcdAccess::default()
            .check(Some(&urls(&["https://a:1", "http://b:1"])))
            .unwrap_err();
        assert!(e.contains("all http:// or all https://"), "{e}");
    }

    #[test]
    fn halves_of_a_pair_are_refused() {
        let u = urls(&["https://h:1"]);
        let p = |s: &str| Some(std::path::PathBuf::from(s));
        for (half, want) in [
            (
                EtcdAccess {
                    cert_file: p("/c"),
                    ..Default::default()
                },
                "needs --etcd-key-file",
            ),
            (
                EtcdAccess {
                    key_file: p("/k"),
                    ..Default::default()
                },
                "needs --etcd-cert-file",
            ),
            (
                EtcdAccess {
                    username: Some("ferry".into()),
                    ..Default::default()
                },
                "needs --etcd-password-file",
            ),
            (
                EtcdAccess {
                    password_file: p("/p"),
                    ..Default::default()
                },
                "needs --etcd-username",
            ),
        ] {
            let e = half.check(Some(&u)).unwrap_err();
            assert!(e.contains(want), "{half:?}: {e}");
        }
        let both = EtcdAccess {
            username: Some("ferry".into()),
            password_file: Some("/p".into()),
            ..Default::default()
        };
        // etcd's users work over plain http too (a warning says so).
        assert_eq!(both.check(Some(&urls(&["http://h:1"]))), Ok(()));
    }

    #[test]
    fn etcd_flags_need_an_etcd_store() {
        assert_eq!(EtcdAccess::default().check(None), Ok(()));
        let e = tls().check(None).unwrap_err();
        assert!(e.contains("only for an etcd store"), "{e}");
    }

    #[test]
    fn password_file_is_one_line() {
        let dir = std::env::temp_dir().join(format!("ferry-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(password(&f).unwrap(), "s3cret");
        std::fs::write(&f, "s3cret\r\n").unwrap();
        assert_eq!(password(&f).unwrap(), "s3cret");
        std::fs::write(&f, "\n").unwrap();
        assert!(password(&f).unwrap_err().contains("empty"));
        let e = password(&dir.join("missing")).unwrap_err();
        assert!(
            e.contains("--etcd-password-file") && e.contains("cannot read"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let dir = std::env::temp_dir().join(format!("ferry-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("ca.pem");
        std::fs::write(&f, "hello\n").unwrap();
        let access = EtcdAccess {
            ca_file: Some(f.clone()),
            ..Default::default()
        };
        let e = access.load(&urls(&["https://h:1"])).err().unwrap();
        assert!(
            e.contains("--etcd-ca-file") && e.contains("no certificate"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn etcd_errors_name_the_flag() {
        let h = |m: &str| hint(m).unwrap_or_default();
        assert!(
            h("etcdserver: authentication failed, invalid user ID or password")
                .contains("--etcd-password-file")
        );
        assert!(h("etcdserver: permission denied").contains("--etcd-prefix"));
        assert!(h("etcdserver: user name is empty").contains("--etcd-username"));
        assert_eq!(hint("etcdserver: key not found"), None);
        assert!(rejects_token("etcdserver: invalid auth token"));
        assert!(!rejects_token("etcdserver: permission denied"));
    }
}
