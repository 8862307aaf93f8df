//! `berth create secret|config NAME --from-literal KEY=VALUE --from-file [KEY=]PATH`: a Secret or
//! Config made from the command line, so a secret value never has to be written into a YAML file.
//!
//! Every key and file is read and checked before the one request that creates the object: a
//! missing file or a key given twice creates nothing. A value never appears in what this prints:
//! errors name the argument by its position or its key, and `--dry-run -o yaml` shows a Secret's
//! keys with a placeholder instead of each value.

use crate::cli::{api_error, client, CliResult};
use crate::Conn;
use berth_api_types::names::paths;
use berth_api_types::secret_config::{Base64Value, DataSpec, TextValue};
use berth_api_types::validate::Errors;
use berth_api_types::Kind;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum CreateCommand {
    /// A Secret: stored encrypted, shown only as keys and digests.
    Secret(CreateArgs),
    /// A Config: stored and shown in clear.
    Config(CreateArgs),
}

#[derive(clap::Args)]
pub struct CreateArgs {
    pub name: String,
    /// KEY=VALUE; repeatable. For a secret prefer --from-file: a value in argv shows in `ps` and
    /// shell history.
    #[arg(long = "from-literal", value_name = "KEY=VALUE")]
    pub literals: Vec<String>,
    /// [KEY=]PATH: the file's content under KEY (default: the file's name); repeatable.
    #[arg(long = "from-file", value_name = "[KEY=]PATH")]
    pub files: Vec<String>,
    /// label KEY=VALUE for metadata.labels; repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Print the object instead of creating it (a Secret's values are not shown).
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the manifest as yaml or json.
    #[arg(short = 'o', long, default_value = "yaml", value_parser = ["yaml", "json"])]
    pub output: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// The keys and their bytes, from `--from-literal` and `--from-file`, in that order.
pub fn collect_data(
    literals: &[String],
    files: &[String],
    read: &dyn Fn(&Path) -> std::io::Result<Vec<u8>>,
) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut data: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut add = |key: String, value: Vec<u8>, from: String| -> Result<(), String> {
        if key.is_empty() {
            return Err(format!("error: {from}: the key is empty"));
        }
        if data.insert(key.clone(), value).is_some() {
            return Err(format!(
                "error: {from}: key `{key}` is given twice; give each key once"
            ));
        }
        Ok(())
    };
    for (i, lit) in literals.iter().enumerate() {
        // The argument may be a bare value typed by mistake: never quote it.
        let from = format!("--from-literal #{}", i + 1);
        let (k, v) = lit.split_once('=').ok_or_else(|| {
            format!("error: {from}: expected KEY=VALUE, found no `=` (the argument is not shown)")
        })?;
        add(k.to_string(), v.as_bytes().to_vec(), from)?;
    }
    for spec in files {
        let (key, path) = match spec.split_once('=') {
            Some((k, p)) => (k.to_string(), PathBuf::from(p)),
            None => {
                let p = PathBuf::from(spec);
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .ok_or_else(|| {
                        format!("error: --from-file {spec}: names no file (give KEY=PATH)")
                    })?;
                (name, p)
            }
        };
        let from = format!("--from-file {}", path.display());
        let bytes = read(&path).map_err(|e| format!("error: {from}: cannot read it: {e}"))?;
        add(key, bytes, from)?;
    }
    if data.is_empty() {
        return Err("error: give at least one --from-literal KEY=VALUE or --from-file PATH".into());
    }
    Ok(data)
}

/// The spec: a Secret's values base64 in `data` (bytes kept as they are); a Config's text in
/// `stringData` (readable in `get -o yaml`), other bytes in `data`.
fn spec_of(kind: Kind, data: BTreeMap<String, Vec<u8>>) -> DataSpec {
    let mut spec = DataSpec::default();
    for (k, v) in data {
        match (kind, String::from_utf8(v)) {
            (Kind::Config, Ok(text)) => {
                spec.string_data.insert(k, TextValue(text));
            }
            (_, Ok(text)) => {
                spec.data.insert(k, Base64Value(text.into_bytes()));
            }
            (_, Err(e)) => {
                spec.data.insert(k, Base64Value(e.into_bytes()));
            }
        }
    }
    spec
}

/// `KEY=VALUE` pairs of `--label`; a missing `=` names the argument (labels are not secret).
fn labels(pairs: &[String]) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    for p in pairs {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| format!("error: --label `{p}`: expected KEY=VALUE"))?;
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The manifest as `--dry-run` prints it: a Secret's values replaced by their size.
fn shown(kind: Kind, manifest: &Value, spec: &DataSpec) -> Value {
    let mut v = manifest.clone();
    if kind == Kind::Secret {
        let placeholders: serde_json::Map<String, Value> = spec
            .files()
            .iter()
            .map(|(k, bytes)| {
                (
                    k.clone(),
                    Value::String(format!("<not shown: {} bytes>", bytes.len())),
                )
            })
            .collect();
        v["spec"] = json!({ "data": placeholders });
    }
    v
}

pub async fn run(command: CreateCommand) -> CliResult {
    let (kind, args) = match command {
        CreateCommand::Secret(a) => (Kind::Secret, a),
        CreateCommand::Config(a) => (Kind::Config, a),
    };
    let data = collect_data(&args.literals, &args.files, &|p| std::fs::read(p))?;
    let spec = spec_of(kind, data);
    let labels = labels(&args.labels)?;
    // The server checks again; checking here too means nothing is sent that it would refuse.
    let mut errors = Errors::default();
    berth_api_types::validate::check_dns_label(&mut errors, "metadata.name", &args.name);
    for key in labels.keys() {
        berth_api_types::validate::check_label_key(&mut errors, "metadata.labels", key);
    }
    spec.validate(&mut errors);
    if let Err(errors) = errors.into_result() {
        return Err(errors
            .iter()
            .map(|e| format!("error: {e}"))
            .collect::<Vec<_>>()
            .join("\n"));
    }
    let mut metadata = json!({ "name": args.name });
    if !labels.is_empty() {
        metadata["labels"] = json!(labels);
    }
    let manifest = json!({
        "apiVersion": berth_api_types::API_VERSION,
        "kind": kind,
        "metadata": metadata,
        "spec": serde_json::to_value(&spec).map_err(|e| e.to_string())?,
    });
    if args.dry_run {
        let v = shown(kind, &manifest, &spec);
        match args.output.as_str() {
            "json" => println!(
                "{}",
                serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
            ),
            _ => print!("{}", crate::output::to_yaml(&v)),
        }
        if kind == Kind::Secret {
            eprintln!(
                "note: a secret's values are not shown; this manifest cannot be applied as it is (nothing was created)"
            );
        }
        return Ok(());
    }
    let client = client(&args.conn)?;
    let _: Value = client
        .request_json(
            reqwest::Method::POST,
            &paths::collection(kind),
            Some(&manifest),
        )
        .await
        .map_err(api_error)?;
    println!("{}/{} created", kind.lower(), args.name);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn files(path: &Path) -> std::io::Result<Vec<u8>> {
        match path.to_str() {
            Some("/etc/app.conf") => Ok(b"port=1".to_vec()),
            Some("/keys/tls.key") => Ok(b"KEY".to_vec()),
            _ => Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        }
    }

    #[test]
    fn literals_and_files_become_keys() {
        let data = collect_data(
            &s(&["user=admin", "pw=a=b"]),
            &s(&["/etc/app.conf", "key=/keys/tls.key"]),
            &files,
        )
        .unwrap();
        let expect: BTreeMap<String, Vec<u8>> = [
            ("user", &b"admin"[..]),
            ("pw", b"a=b"),
            ("app.conf", b"port=1"),
            ("key", b"KEY"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_vec()))
        .collect();
        assert_eq!(data, expect);
    }

    #[test]
    fn refusals_never_quote_a_value() {
        for (lits, fs, says) in [
            (s(&["hunter2"]), s(&[]), "expected KEY=VALUE"),
            (s(&["=hunter2"]), s(&[]), "the key is empty"),
            (
                s(&["pw=hunter2", "pw=hunter3"]),
                s(&[]),
                "key `pw` is given twice",
            ),
            (
                s(&["app.conf=hunter2"]),
                s(&["/etc/app.conf"]),
                "given twice",
            ),
            (
                s(&["a=hunter2"]),
                s(&["/nope/x"]),
                "--from-file /nope/x: cannot read it",
            ),
            (s(&[]), s(&[]), "at least one"),
        ] {
            let err = collect_data(&lits, &fs, &files).unwrap_err();
            assert!(err.contains(says), "{err}");
            assert!(!err.contains("hunter"), "a value leaked: {err}");
        }
    }

    #[test]
    fn a_secret_dry_run_shows_sizes_not_values() {
        let data: BTreeMap<String, Vec<u8>> = [("pw".to_string(), b"hunter2".to_vec())].into();
        let spec = spec_of(Kind::Secret, data.clone());
        let manifest = json!({"kind": "Secret", "spec": serde_json::to_value(&spec).unwrap()});
        let text = shown(Kind::Secret, &manifest, &spec).to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("aHVudGVyMg"),
            "{text}"
        );
        assert!(text.contains("<not shown: 7 bytes>"), "{text}");
        // A Config is shown as it is, text readable.
        let spec = spec_of(Kind::Config, data);
        let manifest = json!({"kind": "Config", "spec": serde_json::to_value(&spec).unwrap()});
        assert_eq!(
            shown(Kind::Config, &manifest, &spec)["spec"]["stringData"]["pw"],
            "hunter2"
        );
    }
}
