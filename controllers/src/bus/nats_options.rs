//! How berth authenticates to NATS and secures the connection: the one place that turns berth's
//! NATS settings (`--nats URL` and the `--nats-*` options of every command that talks to NATS)
//! into `async_nats::ConnectOptions`.
//!
//! Credentials come from one source each: `user:password@` or `token@` in the URL, a `.creds`
//! file (`--nats-creds`), an NKey seed file (`--nats-nkey`), or user/password/token given
//! separately (the secret parts only through the environment, never argv, where `ps` shows them).
//! async-nats ignores a URL's userinfo, so berth takes it out of the URL itself and passes it as
//! options; the URL berth shows in logs and errors has it masked.
//!
//! Everything that can be checked before connecting is checked here, so a mistyped path or a
//! malformed file stops startup with an error naming the flag and the file, instead of surfacing
//! later as an opaque TLS or authentication failure.

use std::fmt;
use std::path::{Path, PathBuf};

use super::BusError;

/// berth's NATS settings. Build with [`NatsSettings::new`] and set the fields that were given.
#[derive(Clone, Default)]
pub struct NatsSettings {
    /// One or more server URLs (comma-separated), `nats://` or `tls://`, possibly carrying
    /// `user:password@` or `token@`.
    pub url: String,
    /// A NATS credentials file (JWT and NKey seed, as `nsc` writes them).
    pub creds: Option<PathBuf>,
    /// A file holding an NKey user seed (`SU...`).
    pub nkey: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// Root certificate(s) (PEM) that the server's certificate must chain to.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Never prints a secret: the URL is masked and passwords/tokens are only said to be present.
impl fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &redact_url(&self.url))
            .field("creds", &self.creds)
            .field("nkey", &self.nkey)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("ca", &self.ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .finish()
    }
}

/// The credentials the settings resolve to: at most one method, since NATS accepts one.
#[derive(Debug, PartialEq, Eq)]
enum Credentials {
    None,
    UserPassword(String, String),
    Token(String),
    Nkey(PathBuf),
    Creds(PathBuf),
}

impl NatsSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Default::default()
        }
    }

    /// The URL(s) with any credentials masked: what logs and errors show.
    pub fn shown_url(&self) -> String {
        redact_url(&self.url)
    }

    /// The connect options and the URL(s) to connect to (credentials taken out). Reads and checks
    /// every file named, so errors name the flag and the file.
    pub(super) async fn connect_options(
        &self,
    ) -> Result<(async_nats::ConnectOptions, String), BusError> {
        let (url, from_url) = split_userinfo(&self.url)?;
        let mut options = async_nats::ConnectOptions::new();
        options = match self.credentials(from_url)? {
            Credentials::None => options,
            Credentials::UserPassword(user, password) => options.user_and_password(user, password),
            Credentials::Token(token) => options.token(token),
            Credentials::Nkey(path) => options.nkey(read_nkey_seed(&path)?),
            Credentials::Creds(path) => {
                options
                    .credentials_file(&path)
                    .await
                    .map_err(|err| BusError::Settings {
                        option: "--nats-creds",
                        path: path.display().to_string(),
                        reason: format!("not a usable NATS credentials file: {err}"),
                    })?
            }
        };
        if let Some(ca) = &self.ca {
            check_pem_certificates("--nats-ca", ca)?;
            // A CA means the operator wants TLS: never fall back to plain text, where a password
            // or token would cross the network in the clear.
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => {
                check_pem_certificates("--nats-tls-cert", cert)?;
                check_readable("--nats-tls-key", key)?;
                options = options
                    .add_client_certificate(cert.clone(), key.clone())
                    .require_tls(true);
            }
            (None, None) => {}
            (Some(_), None) => return Err(missing_pair("--nats-tls-cert", "--nats-tls-key")),
            (None, Some(_)) => return Err(missing_pair("--nats-tls-key", "--nats-tls-cert")),
        }
        Ok((options, url))
    }

    /// Resolves the one credential method in use; two at once is an error rather than a guess,
    /// because the server would silently use only one of them.
    fn credentials(&self, from_url: Option<Credentials>) -> Result<Credentials, BusError> {
        let mut found: Vec<(&'static str, Credentials)> = Vec::new();
        if let Some(c) = from_url {
            found.push(("credentials in --nats URL", c));
        }
        if let Some(path) = &self.creds {
            found.push(("--nats-creds", Credentials::Creds(path.clone())));
        }
        if let Some(path) = &self.nkey {
            found.push(("--nats-nkey", Credentials::Nkey(path.clone())));
        }
        match (&self.user, &self.password) {
            (Some(user), Some(password)) => found.push((
                "--nats-user",
                Credentials::UserPassword(user.clone(), password.clone()),
            )),
            (None, None) => {}
            (Some(_), None) => {
                return Err(BusError::Settings {
                    option: "--nats-user",
                    path: String::new(),
                    reason: "needs a password in BERTH_NATS_PASSWORD".to_string(),
                })
            }
            (None, Some(_)) => {
                return Err(BusError::Settings {
                    option: "BERTH_NATS_PASSWORD",
                    path: String::new(),
                    reason: "needs a user name (--nats-user or BERTH_NATS_USER)".to_string(),
                })
            }
        }
        if let Some(token) = &self.token {
            found.push(("BERTH_NATS_TOKEN", Credentials::Token(token.clone())));
        }
        if found.len() > 1 {
            let names: Vec<_> = found.iter().map(|(name, _)| *name).collect();
            return Err(BusError::Settings {
                option: "NATS credentials",
                path: String::new(),
                reason: format!("give only one of: {}", names.join(", ")),
            });
        }
        Ok(found.pop().map_or(Credentials::None, |(_, c)| c))
    }
}

fn missing_pair(given: &'static str, missing: &str) -> BusError {
    BusError::Settings {
        option: given,
        path: String::new(),
        reason: format!("needs {missing} as well"),
    }
}

fn read(option: &'static str, path: &Path) -> Result<Vec<u8>, BusError> {
    std::fs::read(path).map_err(|err| BusError::Settings {
        option,
        path: path.display().to_string(),
        reason: format!("cannot read it: {err}"),
    })
}

fn check_readable(option: &'static str, path: &Path) -> Result<(), BusError> {
    read(option, path).map(|_| ())
}

/// async-nats reads certificate files only while connecting and reports a bad one as a bare TLS
/// error; checking here names the option and the file.
fn check_pem_certificates(option: &'static str, path: &Path) -> Result<(), BusError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let pem = read(option, path)?;
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&pem).collect();
    match certs {
        Ok(certs) if !certs.is_empty() => Ok(()),
        Ok(_) => Err(BusError::Settings {
            option,
            path: path.display().to_string(),
            reason: "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".to_string(),
        }),
        Err(err) => Err(BusError::Settings {
            option,
            path: path.display().to_string(),
            reason: format!("is not valid PEM: {err}"),
        }),
    }
}

/// The NKey user seed in the file: the first line that is one (`nk -gen user` writes just the
/// seed; other tools add comments around it). Checked here: async-nats would only log that it
/// could not use the seed and report a generic authentication failure.
fn read_nkey_seed(path: &Path) -> Result<String, BusError> {
    let option = "--nats-nkey";
    let bad = |reason: &str| BusError::Settings {
        option,
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let text = String::from_utf8(read(option, path)?)
        .map_err(|_| bad("is not text (expected an NKey user seed, SU...)"))?;
    let seed = text
        .lines()
        .map(str::trim)
        .find(|line| line.starts_with("SU"))
        .ok_or_else(|| bad("holds no NKey user seed (a line starting with SU)"))?;
    // Never put the seed, or the library's message about it, in the error.
    nkeys::KeyPair::from_seed(seed).map_err(|_| bad("holds a malformed NKey user seed"))?;
    Ok(seed.to_string())
}

/// Splits credentials out of the URL(s): returns the URLs without userinfo and the credentials
/// found (`user:password@` or `token@`, percent-decoded). All URLs must carry the same ones,
/// since one connection uses one set whichever server it reaches.
fn split_userinfo(urls: &str) -> Result<(String, Option<Credentials>), BusError> {
    let mut found: Option<Credentials> = None;
    let mut plain = Vec::new();
    for part in urls.split(',') {
        let part = part.trim();
        let host_start = part.find("://").map_or(0, |i| i + 3);
        let authority_end = part[host_start..]
            .find('/')
            .map_or(part.len(), |i| host_start + i);
        let Some(at) = part[host_start..authority_end].rfind('@') else {
            plain.push(part.to_string());
            continue;
        };
        let userinfo = &part[host_start..host_start + at];
        let creds = match userinfo.split_once(':') {
            Some((user, password)) => {
                Credentials::UserPassword(percent_decode(user)?, percent_decode(password)?)
            }
            None => Credentials::Token(percent_decode(userinfo)?),
        };
        if found.as_ref().is_some_and(|f| *f != creds) {
            return Err(BusError::Settings {
                option: "--nats",
                path: String::new(),
                reason: "the URLs carry different credentials; one connection uses one set"
                    .to_string(),
            });
        }
        found = Some(creds);
        plain.push(format!(
            "{}{}",
            &part[..host_start],
            &part[host_start + at + 1..]
        ));
    }
    Ok((plain.join(","), found))
}

/// `%40` -> `@` and so on, so a password holding `@`, `:` or `/` can be written in a URL.
fn percent_decode(s: &str) -> Result<String, BusError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                // The offending text could be part of a password: do not quote it.
                None => return Err(bad_url_encoding()),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad_url_encoding())
}

fn bad_url_encoding() -> BusError {
    BusError::Settings {
        option: "--nats",
        path: String::new(),
        reason: "the credentials in the URL are not valid percent-encoding".to_string(),
    }
}

/// Masks `user:password@` / `token@` in each comma-separated server URL.
pub(super) fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let part = part.trim();
            let host_start = part.find("://").map_or(0, |i| i + 3);
            let authority_end = part[host_start..]
                .find('/')
                .map_or(part.len(), |i| host_start + i);
            match part[host_start..authority_end].rfind('@') {
                Some(at) => format!(
                    "{}***@{}",
                    &part[..host_start],
                    &part[host_start + at + 1..]
                ),
                None => part.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn bus_urls_are_redacted() {
        assert_eq!(redact_url("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
        assert_eq!(
            redact_url("nats://user:pw@host:4222/x@y"),
            "nats://***@host:4222/x@y"
        );
        assert_eq!(redact_url("tok@host:4222"), "***@host:4222");
        assert_eq!(
            redact_url("nats://a:b@h1:4222, nats://h2:4222"),
            "nats://***@h1:4222,nats://h2:4222"
        );
    }

    #[test]
    fn url_userinfo_becomes_credentials() {
        let (url, creds) = split_userinfo("nats://berth:p%40ss%3Aw@h1:4222,tls://h2:4222").unwrap();
        assert_eq!(url, "nats://h1:4222,tls://h2:4222");
        assert_eq!(
            creds,
            Some(Credentials::UserPassword("berth".into(), "p@ss:w".into()))
        );
        let (url, creds) = split_userinfo("tls://s3cret@h:4222").unwrap();
        assert_eq!(url, "tls://h:4222");
        assert_eq!(creds, Some(Credentials::Token("s3cret".into())));
        assert_eq!(
            split_userinfo("nats://h:4222").unwrap(),
            ("nats://h:4222".into(), None)
        );
        let err = split_userinfo("nats://a:b@h1,nats://a:c@h2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("different credentials") && !err.contains(":c"),
            "{err}"
        );
        let err = split_userinfo("nats://a:x%zzsecret@h")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn one_credential_method_at_most() {
        let mut s = NatsSettings::new("nats://u:p@h");
        s.token = Some("t0ken".into());
        let (_, from_url) = split_userinfo(&s.url).unwrap();
        let err = s.credentials(from_url).unwrap_err().to_string();
        assert!(err.contains("only one of"), "{err}");
        assert!(!err.contains("t0ken") && !err.contains(":p@"), "{err}");

        let mut s = NatsSettings::new("nats://h");
        s.user = Some("berth".into());
        let err = s.credentials(None).unwrap_err().to_string();
        assert!(err.contains("BERTH_NATS_PASSWORD"), "{err}");
        s.password = Some("pw".into());
        assert_eq!(
            s.credentials(None).unwrap(),
            Credentials::UserPassword("berth".into(), "pw".into())
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let mut s = NatsSettings::new("nats://u:hunter2@h");
        s.password = Some("hunter3".into());
        s.token = Some("hunter4".into());
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter"), "{shown}");
    }

    #[tokio::test]
    async fn bad_files_name_the_option_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let not_pem = file(&dir, "ca.pem", "hello\n");
        let not_seed = file(&dir, "user.nk", "# a seed would go here\nSUnot-a-seed\n");
        let not_creds = file(&dir, "user.creds", "nothing here\n");
        let cases: Vec<(&str, NatsSettings)> = vec![
            (
                "--nats-ca",
                NatsSettings {
                    ca: Some(missing.clone()),
                    ..NatsSettings::new("tls://h")
                },
            ),
            (
                "--nats-ca",
                NatsSettings {
                    ca: Some(not_pem.clone()),
                    ..NatsSettings::new("tls://h")
                },
            ),
            (
                "--nats-nkey",
                NatsSettings {
                    nkey: Some(not_seed.clone()),
                    ..NatsSettings::new("nats://h")
                },
            ),
            (
                "--nats-creds",
                NatsSettings {
                    creds: Some(not_creds.clone()),
                    ..NatsSettings::new("nats://h")
                },
            ),
            (
                "--nats-tls-cert",
                NatsSettings {
                    tls_cert: Some(not_pem.clone()),
                    ..NatsSettings::new("tls://h")
                },
            ),
        ];
        for (option, settings) in cases {
            let err = settings.connect_options().await.err().unwrap().to_string();
            assert!(err.contains(option), "{option}: {err}");
            assert!(!err.contains("SUnot-a-seed"), "seed leaked: {err}");
        }
        let err = NatsSettings {
            ca: Some(missing.clone()),
            ..NatsSettings::new("tls://h")
        }
        .connect_options()
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }

    #[tokio::test]
    async fn a_good_nkey_seed_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let seed = nkeys::KeyPair::new_user().seed().unwrap();
        let path = file(&dir, "user.nk", &format!("# berth's NKey\n{seed}\n"));
        assert_eq!(read_nkey_seed(&path).unwrap(), seed);
    }
}
