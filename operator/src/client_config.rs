//! The client's configuration file and how a client command finds its server and token.
//!
//! `~/.config/berth/config.yaml` (or `$XDG_CONFIG_HOME/berth/config.yaml`, or the file
//! `$BERTH_CONFIG` names) holds named contexts: a URL, a CA and the path of a token file, never a
//! token itself, so the file can be shared and backed up without handing out credentials:
//!
//! ```yaml
//! current-context: prod
//! contexts:
//!   - name: prod
//!     url: https://berth.example:7474
//!     ca: /etc/berth/ca.pem
//!     token-file: /home/me/.config/berth/prod.token
//! ```
//!
//! Every setting is taken from the first of: a flag, an environment variable, the context
//! (`--context`, `$BERTH_CONTEXT` or `current-context`), the default.

use crate::Conn;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the API server is when nothing says otherwise (`berth up`'s default listen address).
pub const DEFAULT_URL: &str = "http://127.0.0.1:7474";

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

/// One named server: where it is, which CA to trust, where its token is kept.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl ConfigFile {
    pub fn context(&self, name: &str) -> Option<&Context> {
        self.contexts.iter().find(|c| c.name == name)
    }
}

/// Where the configuration file is: `$BERTH_CONFIG`, else `$XDG_CONFIG_HOME/berth/config.yaml`,
/// else `$HOME/.config/berth/config.yaml`.
pub fn config_path(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf, String> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    if let Some(p) = set("BERTH_CONFIG") {
        return Ok(PathBuf::from(p));
    }
    if let Some(x) = set("XDG_CONFIG_HOME") {
        return Ok(Path::new(&x).join("berth").join("config.yaml"));
    }
    match set("HOME") {
        Some(h) => Ok(Path::new(&h).join(".config").join("berth").join("config.yaml")),
        None => Err(
            "error: cannot find the client configuration: set BERTH_CONFIG, XDG_CONFIG_HOME or HOME"
                .into(),
        ),
    }
}

/// Reads the file; a missing file is an empty configuration.
pub fn load(path: &Path) -> Result<ConfigFile, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
        Err(e) => return Err(format!("error: cannot read {}: {e}", path.display())),
    };
    let name = path.display().to_string();
    let docs =
        berth_api_types::manifest::parse_str(&name, &text).map_err(|e| format!("error: {e}"))?;
    let Some(doc) = docs.first() else {
        return Ok(ConfigFile::default());
    };
    let mut file: ConfigFile = doc.deserialize().map_err(|e| format!("error: {e}"))?;
    // Relative paths in the file are relative to the file, not to wherever berth runs.
    let dir = path.parent().unwrap_or(Path::new("."));
    for c in &mut file.contexts {
        for p in [&mut c.ca, &mut c.token_file].into_iter().flatten() {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
    Ok(file)
}

/// Writes the file (private: it says where the token files are), replacing it atomically.
pub fn save(path: &Path, file: &ConfigFile) -> Result<(), String> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("error: cannot create {}: {e}", dir.display()))?;
    let value = serde_json::to_value(file).map_err(|e| e.to_string())?;
    let text = crate::output::to_yaml(&value);
    let text = text.strip_prefix("---\n").unwrap_or(&text);
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| format!("error: cannot write in {}: {e}", dir.display()))?;
    tmp.write_all(text.as_bytes())
        .map_err(|e| format!("error: cannot write {}: {e}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| format!("error: cannot write {}: {}", path.display(), e.error))?;
    Ok(())
}

/// Where a client command goes, with what.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// One URL or several, separated by commas.
    pub url: String,
    pub ca: Option<PathBuf>,
    pub token: Option<Token>,
}

/// A token and where it came from (for messages; the value is never printed).
#[derive(Clone, PartialEq)]
pub struct Token {
    pub value: String,
    pub source: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token(from {})", self.source)
    }
}

/// The connection settings of `conn` (flags, and `url`/`ca`/`context` from their environment
/// variables through clap), the token's environment variables, and the configuration file.
/// `read_token` reads a token file (a parameter so tests need no files).
pub fn resolve_with(
    conn: &Conn,
    env: &dyn Fn(&str) -> Option<String>,
    file: &ConfigFile,
    read_token: &dyn Fn(&Path) -> Result<String, String>,
) -> Result<Resolved, String> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let context_name = conn
        .context
        .clone()
        .or_else(|| file.current_context.clone());
    let context = match &context_name {
        Some(name) => Some(file.context(name).ok_or_else(|| {
            let known: Vec<&str> = file.contexts.iter().map(|c| c.name.as_str()).collect();
            format!(
                "error: context `{name}` is not in the client configuration (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?),
        None => None,
    };
    let url = conn
        .url
        .clone()
        .or_else(|| context.and_then(|c| c.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let ca = conn
        .ca
        .clone()
        .or_else(|| context.and_then(|c| c.ca.clone()));
    let from_file = |p: &Path, how: &str| -> Result<Token, String> {
        Ok(Token {
            value: read_token(p)?,
            source: format!("{how} {}", p.display()),
        })
    };
    let token = if let Some(t) = &conn.token {
        Some(Token {
            value: t.clone(),
            source: "--token".into(),
        })
    } else if let Some(p) = &conn.token_file {
        Some(from_file(p, "--token-file")?)
    } else if let Some(t) = set("BERTH_TOKEN") {
        Some(Token {
            value: t,
            source: "BERTH_TOKEN".into(),
        })
    } else if let Some(p) = set("BERTH_TOKEN_FILE") {
        Some(from_file(Path::new(&p), "BERTH_TOKEN_FILE")?)
    } else if let Some((c, p)) = context.and_then(|c| c.token_file.as_ref().map(|p| (c, p))) {
        Some(from_file(p, &format!("context `{}`: token-file", c.name))?)
    } else {
        None
    };
    Ok(Resolved { url, ca, token })
}

/// [`resolve_with`] on the process's environment and configuration file.
pub fn resolve(conn: &Conn) -> Result<Resolved, String> {
    let env = |k: &str| std::env::var(k).ok();
    // A process without a home (a controller under systemd) runs on flags and variables alone.
    let file = match config_path(&env) {
        Ok(path) => load(&path)?,
        Err(_) if conn.context.is_none() => ConfigFile::default(),
        Err(e) => return Err(e),
    };
    resolve_with(conn, &env, &file, &read_token_file)
}

/// A token file's content, trimmed. Warns (on stderr) when others than its owner may read it.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("error: cannot read the token file {}: {e}", path.display()))?;
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: the token file {} can be read by others than its owner (mode {mode:o}): run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("error: the token file {} is empty", path.display()));
    }
    Ok(token.to_string())
}

/// `berth config ...`
#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// List the contexts; `*` marks the current one.
    GetContexts,
    /// Print the current context's name.
    CurrentContext,
    /// Make NAME the current context.
    UseContext { name: String },
    /// Create context NAME, or change the settings given.
    SetContext {
        name: String,
        /// API server URL (several separated by commas).
        #[arg(long)]
        url: Option<String>,
        /// CA (PEM) to trust for an https URL.
        #[arg(long)]
        ca: Option<PathBuf>,
        /// File holding the token (keep it `chmod 600`); the token itself is never stored here.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
}

pub fn run(command: ConfigCommand) -> Result<(), String> {
    let env = |k: &str| std::env::var(k).ok();
    let path = config_path(&env)?;
    let mut file = load(&path)?;
    match command {
        ConfigCommand::GetContexts => {
            let current = file.current_context.as_deref();
            let show = |p: &Option<PathBuf>| {
                p.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "-".into())
            };
            let rows: Vec<Vec<String>> = file
                .contexts
                .iter()
                .map(|c| {
                    vec![
                        if current == Some(c.name.as_str()) {
                            "*"
                        } else {
                            ""
                        }
                        .to_string(),
                        c.name.clone(),
                        c.url.clone().unwrap_or_else(|| "-".into()),
                        show(&c.ca),
                        show(&c.token_file),
                    ]
                })
                .collect();
            println!(
                "{}",
                crate::output::table(&["CURRENT", "NAME", "URL", "CA", "TOKEN FILE"], &rows)
            );
            Ok(())
        }
        ConfigCommand::CurrentContext => match file.current_context {
            Some(name) => {
                println!("{name}");
                Ok(())
            }
            None => Err(format!(
                "error: no current context in {} (berth config use-context NAME)",
                path.display()
            )),
        },
        ConfigCommand::UseContext { name } => {
            if file.context(&name).is_none() {
                return Err(format!(
                    "error: no context `{name}` in {} (berth config set-context {name} --url ...)",
                    path.display()
                ));
            }
            file.current_context = Some(name.clone());
            save(&path, &file)?;
            println!("Switched to context \"{name}\".");
            Ok(())
        }
        ConfigCommand::SetContext {
            name,
            url,
            ca,
            token_file,
        } => {
            if name.is_empty() {
                return Err("error: a context needs a name".into());
            }
            if let Some(u) = &url {
                crate::api_client::parse_urls(u).map_err(|e| format!("error: --url: {e}"))?;
            }
            // Stored absolute: the file is read from any directory.
            let absolute = |p: PathBuf| -> Result<PathBuf, String> {
                std::path::absolute(&p).map_err(|e| format!("error: {}: {e}", p.display()))
            };
            let ca = ca.map(absolute).transpose()?;
            let token_file = token_file.map(absolute).transpose()?;
            let created = file.context(&name).is_none();
            if created {
                file.contexts.push(Context {
                    name: name.clone(),
                    ..Context::default()
                });
            }
            let c = file
                .contexts
                .iter_mut()
                .find(|c| c.name == name)
                .expect("just ensured");
            if url.is_some() {
                c.url = url;
            }
            if ca.is_some() {
                c.ca = ca;
            }
            if token_file.is_some() {
                c.token_file = token_file;
            }
            save(&path, &file)?;
            println!(
                "Context \"{name}\" {}.",
                if created { "created" } else { "modified" }
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn conn() -> Conn {
        Conn {
            url: None,
            token: None,
            token_file: None,
            ca: None,
            context: None,
        }
    }

    fn file() -> ConfigFile {
        ConfigFile {
            current_context: Some("prod".into()),
            contexts: vec![
                Context {
                    name: "prod".into(),
                    url: Some("https://prod:7474".into()),
                    ca: Some("/prod-ca.pem".into()),
                    token_file: Some("/prod.token".into()),
                },
                Context {
                    name: "staging".into(),
                    url: Some("https://staging:7474".into()),
                    ca: None,
                    token_file: Some("/staging.token".into()),
                },
            ],
        }
    }

    fn resolve_in(
        conn: &Conn,
        env: &[(&str, &str)],
        file: &ConfigFile,
    ) -> Result<Resolved, String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let read = |p: &Path| Ok(format!("token-of:{}", p.display()));
        resolve_with(conn, &|k| env.get(k).cloned(), file, &read)
    }

    fn token(r: &Resolved) -> &str {
        &r.token.as_ref().expect("a token").value
    }

    #[test]
    fn flags_beat_env_beat_context_beat_default() {
        // Only the file: the current context.
        let r = resolve_in(&conn(), &[], &file()).unwrap();
        assert_eq!(r.url, "https://prod:7474");
        assert_eq!(r.ca.as_deref(), Some(Path::new("/prod-ca.pem")));
        assert_eq!(token(&r), "token-of:/prod.token");
        // --context picks another.
        let mut c = conn();
        c.context = Some("staging".into());
        let r = resolve_in(&c, &[], &file()).unwrap();
        assert_eq!(r.url, "https://staging:7474");
        assert_eq!(r.ca, None);
        assert_eq!(token(&r), "token-of:/staging.token");
        // Environment beats the context.
        let r = resolve_in(&conn(), &[("BERTH_TOKEN_FILE", "/env.token")], &file()).unwrap();
        assert_eq!(token(&r), "token-of:/env.token");
        let env = [("BERTH_TOKEN", "t-env"), ("BERTH_TOKEN_FILE", "/env.token")];
        let r = resolve_in(&conn(), &env, &file()).unwrap();
        assert_eq!(token(&r), "t-env");
        // Flags beat the environment (url and ca arrive through clap, flag or variable alike).
        let mut c = conn();
        c.token_file = Some("/flag.token".into());
        c.url = Some("http://flag:1".into());
        let r = resolve_in(&c, &env, &file()).unwrap();
        assert_eq!(token(&r), "token-of:/flag.token");
        assert_eq!(r.url, "http://flag:1");
        c.token = Some("t-flag".into());
        assert_eq!(token(&resolve_in(&c, &env, &file()).unwrap()), "t-flag");
        // Nothing at all: the default URL, no token.
        let r = resolve_in(&conn(), &[], &ConfigFile::default()).unwrap();
        assert_eq!(r.url, DEFAULT_URL);
        assert_eq!(r.token, None);
    }

    #[test]
    fn an_unknown_context_is_an_error_naming_the_known_ones() {
        let mut c = conn();
        c.context = Some("qa".into());
        let err = resolve_in(&c, &[], &file()).unwrap_err();
        assert!(
            err.contains("`qa`") && err.contains("prod, staging"),
            "{err}"
        );
        let mut f = file();
        f.current_context = Some("gone".into());
        assert!(resolve_in(&conn(), &[], &f).unwrap_err().contains("`gone`"));
    }

    #[test]
    fn the_token_never_shows_in_debug_output() {
        let r = resolve_in(&conn(), &[("BERTH_TOKEN", "s3cret-token")], &file()).unwrap();
        let shown = format!("{r:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("BERTH_TOKEN"), "{shown}");
    }

    #[test]
    fn the_file_round_trips_and_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth").join("config.yaml");
        assert_eq!(load(&path).unwrap(), ConfigFile::default());
        save(&path, &file()).unwrap();
        assert_eq!(load(&path).unwrap(), file());
        std::fs::write(
            &path,
            "current-context: a\ncontexts:\n  - name: a\n    token-file: a.token\n",
        )
        .unwrap();
        let loaded = load(&path).unwrap();
        assert_eq!(
            loaded.contexts[0].token_file.as_deref(),
            Some(path.parent().unwrap().join("a.token").as_path())
        );
        std::fs::write(&path, "contexts:\n  - name: a\n    token: abc\n").unwrap();
        let err = load(&path).unwrap_err();
        assert!(err.contains("token") && !err.contains("abc"), "{err}");
    }

    #[test]
    fn config_path_precedence() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            config_path(&env(&[("BERTH_CONFIG", "/x.yaml"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/x.yaml")
        );
        assert_eq!(
            config_path(&env(&[("XDG_CONFIG_HOME", "/xdg"), ("HOME", "/h")])).unwrap(),
            PathBuf::from("/xdg/berth/config.yaml")
        );
        assert_eq!(
            config_path(&env(&[("HOME", "/h")])).unwrap(),
            PathBuf::from("/h/.config/berth/config.yaml")
        );
    }

    #[test]
    fn token_files_are_trimmed_and_an_empty_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        std::fs::write(&p, "abc\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "abc");
        std::fs::write(&p, "\n").unwrap();
        assert!(read_token_file(&p).unwrap_err().contains("is empty"));
        let missing = read_token_file(&dir.path().join("nope")).unwrap_err();
        assert!(missing.contains("cannot read the token file"), "{missing}");
    }
}
