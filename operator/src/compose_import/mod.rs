//! `berth import compose`: a Compose file (v3 / the Compose spec, as kept for `docker stack deploy`)
//! translated into berth manifests. Pure: the caller hands in the file's text and a way to read the
//! files it names (`env_file`, `configs.*.file`), and gets back validated objects, Ingress stubs,
//! warnings and notes. Nothing is silently dropped: every key that is not mapped is a warning naming
//! the Compose path, its line, and what to do instead.
//!
//! Choices, and why:
//! - Secrets are never read. A `file:` secret becomes a note with the `berth create secret` command
//!   that stores it, instead of a manifest holding its value: manifests are meant to be reviewed,
//!   committed and applied from CI, and a value copied into one outlives the file it came from (which
//!   teams usually keep out of version control). The command reads the file straight into berth's
//!   encrypted store, so the value is in no new place at all.
//! - Every emitted object passes the server's own checks (`decode_object`, then the admission policy a
//!   default server applies), so `berth apply -f` never refuses the output; a translation that would
//!   not pass is an error at the Compose key it came from.
//! - Published ports have no berth equivalent (services live on internal networks); ports that look
//!   like HTTP get a commented Ingress stub, since only the user knows the host name.

mod envfile;
pub mod run;

use berth_api_types::manifest::{Location, ManifestError, SourceDoc};
use berth_api_types::units::{ByteSize, Cpus, Duration};
use berth_api_types::{Kind, API_VERSION};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

#[cfg(test)]
mod tests;

/// What the import was asked for besides the file.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Put before every created object's name (`shop` makes `shop-web`), as `docker stack deploy`
    /// prefixes with the stack name.
    pub prefix: Option<String>,
}

/// Reads a file the Compose file names (relative paths are already joined to its directory).
pub type ReadFile<'a> = &'a dyn Fn(&Path) -> std::io::Result<Vec<u8>>;

/// A warning or note, placed at the Compose key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub file: String,
    pub location: Location,
    /// The Compose path, e.g. `services.web.cap_add`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: {}: {}",
            self.file, self.location, self.path, self.message
        )
    }
}

/// A commented-out Ingress for a service that published a web port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressStub {
    /// The Ingress's name (the berth Service's name, or `NAME-PORT` for a second port).
    pub name: String,
    /// YAML, every line a comment: applying it as it is does nothing.
    pub text: String,
}

/// One emitted object: its manifest and the Compose key it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    pub kind: Kind,
    pub name: String,
    pub from: String,
    pub manifest: Value,
}

#[derive(Debug, Clone, Default)]
pub struct Import {
    /// Networks, Volumes, Configs, then Services: the order a reader wants them in.
    pub objects: Vec<Emitted>,
    pub ingress_stubs: Vec<IngressStub>,
    /// Something was not imported, or imported differently than Compose runs it.
    pub warnings: Vec<Finding>,
    /// Something the user must do (create a secret) or should know (names changed).
    pub notes: Vec<Finding>,
}

/// Ports that suggest an HTTP service (container or published side).
const WEB_PORTS: [u64; 11] = [
    80, 443, 3000, 4000, 5000, 8000, 8008, 8080, 8081, 8443, 8888,
];

/// Translates one Compose file. `file` is the name used in messages; `base` the directory relative
/// paths in it are read from. `Err` holds every problem found, each at its file, line and key.
pub fn import(
    file: &str,
    text: &str,
    base: &Path,
    read: ReadFile<'_>,
    options: &Options,
) -> Result<Import, Vec<ManifestError>> {
    let docs = berth_api_types::manifest::parse_str(file, text).map_err(|e| vec![e])?;
    let doc = match docs.as_slice() {
        [one] => one,
        [] => {
            return Err(vec![ManifestError {
                file: file.to_string(),
                document: 0,
                location: None,
                path: String::new(),
                message: "is empty: expected a Compose file with `services:`".into(),
            }])
        }
        [_, second, ..] => {
            return Err(vec![ManifestError::at(
                second,
                "",
                "a Compose file is one YAML document; this is a second one",
            )])
        }
    };
    let mut cx = Cx {
        doc,
        base,
        read,
        prefix: options.prefix.clone(),
        out: Import::default(),
        errors: Vec::new(),
        names: HashMap::new(),
    };
    if let Some(p) = &options.prefix {
        let mut errors = berth_api_types::validate::Errors::default();
        berth_api_types::validate::check_dns_label(&mut errors, "--prefix", p);
        if let Err(e) = errors.into_result() {
            return Err(e
                .into_iter()
                .map(|e| ManifestError {
                    file: file.to_string(),
                    document: 0,
                    location: None,
                    path: e.path,
                    message: e.message,
                })
                .collect());
        }
    }
    cx.document(&doc.value);
    if cx.errors.is_empty() {
        // In file order, as a reader goes through the file.
        cx.out.warnings.sort_by_key(|f| f.location);
        cx.out.notes.sort_by_key(|f| f.location);
        Ok(cx.out)
    } else {
        Err(cx.errors)
    }
}

/// A top-level secret, config, volume or network as services refer to it.
#[derive(Debug, Clone)]
struct Declared {
    /// The berth object's name.
    name: String,
    /// The key its single file is stored under (secrets and configs created here).
    key: Option<String>,
}

struct Cx<'a> {
    doc: &'a SourceDoc,
    base: &'a Path,
    read: ReadFile<'a>,
    prefix: Option<String>,
    out: Import,
    errors: Vec<ManifestError>,
    /// (kind, berth name) -> the Compose path that claimed it, so two Compose names that sanitize
    /// to one berth name are an error rather than one object overwriting the other.
    names: HashMap<(Kind, String), String>,
}

/// `parent.key`, the way manifest locations are keyed.
fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

fn index(parent: &str, i: usize) -> String {
    format!("{parent}[{i}]")
}

/// What a Compose value is, for type errors.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

impl Cx<'_> {
    fn finding(&self, path: &str, message: String) -> Finding {
        Finding {
            file: self.doc.file.clone(),
            location: self.doc.location_of(path),
            path: path.to_string(),
            message,
        }
    }

    /// A path the Compose file names, relative to its directory (`./x` shown as `x`).
    fn resolve(&self, file: &str) -> PathBuf {
        let relative: PathBuf = Path::new(file)
            .components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect();
        self.base.join(relative)
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        let f = self.finding(path, message.into());
        self.out.warnings.push(f);
    }

    fn note(&mut self, path: &str, message: impl Into<String>) {
        let f = self.finding(path, message.into());
        self.out.notes.push(f);
    }

    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors
            .push(ManifestError::at(self.doc, path, message.into()));
    }

    /// Warns about every key of `map` not in `handled` (extension keys `x-*` are Compose's own
    /// way of saying "ignore this", so they are skipped).
    fn leftovers(&mut self, map: &Map<String, Value>, path: &str, handled: &[&str]) {
        for key in map.keys() {
            if handled.contains(&key.as_str()) || key.starts_with("x-") {
                continue;
            }
            let advice = advice(key).unwrap_or("it has no berth equivalent");
            self.warn(&join(path, key), format!("not imported: {advice}"));
        }
    }

    /// A mapping, or `None` (null counts as an empty mapping, as Compose reads `volumes: {db:}`).
    fn mapping<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match v {
            Value::Object(m) => Some(m),
            Value::Null => None,
            other => {
                self.error(
                    path,
                    format!("must be a mapping, found {}", type_name(other)),
                );
                None
            }
        }
    }

    /// A string; numbers and booleans are taken as written (`image: 3` is not one, but a label
    /// value `true` is).
    fn scalar(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            other => {
                self.error(
                    path,
                    format!("must be a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            other => {
                self.error(
                    path,
                    format!("must be a string, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn boolean(&mut self, v: &Value, path: &str) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            other => {
                self.error(
                    path,
                    format!("must be true or false, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn count(&mut self, v: &Value, path: &str) -> Option<u64> {
        match v.as_u64() {
            Some(n) => Some(n),
            None => {
                self.error(
                    path,
                    format!("must be a whole number of 0 or more, found {v}"),
                );
                None
            }
        }
    }

    fn list<'v>(&mut self, v: &'v Value, path: &str) -> Option<&'v Vec<Value>> {
        match v {
            Value::Array(a) => Some(a),
            other => {
                self.error(path, format!("must be a list, found {}", type_name(other)));
                None
            }
        }
    }

    fn strings(&mut self, v: &Value, path: &str) -> Option<Vec<String>> {
        let items = self.list(v, path)?;
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            out.push(self.scalar(item, &index(path, i))?);
        }
        Some(out)
    }

    /// A command: a list as it is, or a string split as a shell would (without running one), which
    /// is what Compose does with `command: npm start`.
    fn command(&mut self, v: &Value, path: &str) -> Option<Vec<String>> {
        match v {
            Value::String(s) => match shlex::split(s) {
                Some(words) => Some(words),
                None => {
                    self.error(path, "has an unterminated quote or escape");
                    None
                }
            },
            Value::Array(_) => self.strings(v, path),
            other => {
                self.error(
                    path,
                    format!("must be a string or a list, found {}", type_name(other)),
                );
                None
            }
        }
    }

    fn duration(&mut self, v: &Value, path: &str) -> Option<String> {
        let text = self.scalar(v, path)?;
        match Duration::parse(&text) {
            Ok(_) => Some(text),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    /// `KEY=VALUE` list or `KEY: VALUE` mapping (labels, environment).
    fn pairs(&mut self, v: &Value, path: &str) -> Vec<(String, Option<String>, String)> {
        let mut out = Vec::new();
        match v {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let p = index(path, i);
                    if let Some(s) = self.scalar(item, &p) {
                        match s.split_once('=') {
                            Some((k, val)) => out.push((k.to_string(), Some(val.to_string()), p)),
                            None => out.push((s, None, p)),
                        }
                    }
                }
            }
            Value::Object(m) => {
                for (k, val) in m {
                    let p = join(path, k);
                    let value = match val {
                        Value::Null => None,
                        other => self.scalar(other, &p),
                    };
                    out.push((k.clone(), value, p));
                }
            }
            Value::Null => {}
            other => self.error(
                path,
                format!(
                    "must be a list of KEY=VALUE or a mapping, found {}",
                    type_name(other)
                ),
            ),
        }
        out
    }

    /// Labels as a map; a key without a value gets an empty one, as Docker does.
    fn labels(&mut self, v: &Value, path: &str) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (k, val, p) in self.pairs(v, path) {
            if k.starts_with(berth_api_types::names::labels::PREFIX) {
                self.warn(
                    &p,
                    format!(
                        "not imported: the label prefix `{}` is reserved for berth",
                        berth_api_types::names::labels::PREFIX
                    ),
                );
                continue;
            }
            out.insert(k, val.unwrap_or_default());
        }
        out
    }

    /// The berth name for a Compose name: the prefix, then the name as a DNS label. A changed name
    /// is a note (other services and env values may spell the old one).
    fn claim(&mut self, kind: Kind, compose: &str, path: &str, prefixed: bool) -> Option<String> {
        let clean = sanitize(compose);
        let name = match (&self.prefix, prefixed) {
            (Some(p), true) => format!("{p}-{clean}"),
            _ => clean.clone(),
        };
        let mut errors = berth_api_types::validate::Errors::default();
        berth_api_types::validate::check_dns_label(&mut errors, "name", &name);
        if clean.is_empty() || errors.into_result().is_err() {
            self.error(
                path,
                format!("`{compose}` cannot be made a berth name (a DNS label of at most 63 characters): rename it"),
            );
            return None;
        }
        if let Some(first) = self.names.insert((kind, name.clone()), path.to_string()) {
            self.error(
                path,
                format!(
                    "becomes {} `{name}`, as `{first}` does: rename one of them",
                    kind.lower()
                ),
            );
            return None;
        }
        if clean != compose {
            self.note(
                path,
                format!("named `{name}` in berth (names are DNS labels: lower case, `-`)"),
            );
        }
        Some(name)
    }

    /// Validates `manifest` with the server's own rules and keeps it; a refusal is an error at the
    /// Compose key it came from (a translation berth would refuse must not reach a file).
    fn emit(&mut self, from: &str, manifest: Value) -> bool {
        match berth_api_types::typed::decode_object(&manifest) {
            Ok(obj) => {
                let refused =
                    crate::store::check_write(&crate::store::Policy::default(), &obj).err();
                if let Some(errors) = refused {
                    let why: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    if obj.kind == Kind::Volume {
                        self.warn(
                            from,
                            format!(
                                "not imported: berth refuses this volume unless the server runs with --allow-bind-mounts ({}); use a volume without host paths, or create it by hand on a server that allows them",
                                why.join("; ")
                            ),
                        );
                    } else {
                        self.error(
                            from,
                            format!(
                                "would make a {} berth refuses: {}",
                                obj.kind.lower(),
                                why.join("; ")
                            ),
                        );
                    }
                    return false;
                }
                let manifest = json!({
                    "apiVersion": obj.api_version,
                    "kind": obj.kind,
                    "metadata": obj.metadata,
                    "spec": obj.spec,
                });
                self.out.objects.push(Emitted {
                    kind: obj.kind,
                    name: obj.metadata.name.clone(),
                    from: from.to_string(),
                    manifest,
                });
                true
            }
            Err(errors) => {
                for e in errors {
                    self.error(from, format!("would make an invalid berth object: {e}"));
                }
                false
            }
        }
    }

    fn document(&mut self, root: &Value) {
        let Some(top) = self.mapping(root, "") else {
            self.error("", "is empty: expected a Compose file with `services:`");
            return;
        };
        if let Some(name) = top.get("name") {
            let name = name.as_str().unwrap_or_default();
            let hint = match &self.prefix {
                Some(p) => format!("names are prefixed with `{p}-` (--prefix)"),
                None => format!("pass `--prefix {}` to prefix berth names with it, as `docker stack deploy` does with the stack name", sanitize(name)),
            };
            self.warn("name", format!("the project name is not used: {hint}"));
        }
        self.scan_interpolation(root, "");
        // `$$` is Compose's escaped `$`: what the container sees is one.
        let root = &unescape_dollars(root);
        let Some(top) = root.as_object() else { return };
        let empty = Value::Null;
        let networks = self.networks(top.get("networks").unwrap_or(&empty));
        let volumes = self.volumes(top.get("volumes").unwrap_or(&empty));
        let configs = self.files(
            Kind::Config,
            "configs",
            top.get("configs").unwrap_or(&empty),
        );
        let secrets = self.files(
            Kind::Secret,
            "secrets",
            top.get("secrets").unwrap_or(&empty),
        );
        let declared = Declarations {
            networks,
            volumes,
            configs,
            secrets,
        };
        match top.get("services") {
            Some(v) => {
                if let Some(services) = self.mapping(v, "services") {
                    if let (Some(p), true) = (&self.prefix, services.len() > 1) {
                        self.note(
                            "services",
                            format!("services reach each other by their berth names (`{p}-NAME`), not by their Compose names as in a stack: change host names in env values and configs"),
                        );
                    }
                    let mut services: Vec<(&String, &Value)> = services.iter().collect();
                    services.sort_by_key(|(k, _)| k.as_str());
                    for (name, svc) in services {
                        self.service(name, svc, &declared);
                    }
                }
            }
            None => self.error("", "has no `services:`: nothing to import"),
        }
        self.leftovers(
            top,
            "",
            &[
                "version", "name", "services", "networks", "volumes", "configs", "secrets",
            ],
        );
    }

    /// Compose substitutes `${VAR}` from the shell and `.env` before it reads the file; berth has
    /// neither, so each such value would be taken literally.
    fn scan_interpolation(&mut self, v: &Value, path: &str) {
        match v {
            Value::String(s) if has_variable(s) => self.warn(
                path,
                "uses a variable (`$NAME` or `${NAME}`): berth does not substitute variables as Compose does; the text is imported as written: put the value in the file",
            ),
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    self.scan_interpolation(item, &index(path, i));
                }
            }
            Value::Object(m) => {
                // `x-` blocks are only templates: their copies are scanned where they are used.
                for (k, item) in m.iter().filter(|(k, _)| !k.starts_with("x-")) {
                    self.scan_interpolation(item, &join(path, k));
                }
            }
            _ => {}
        }
    }

    fn networks(&mut self, v: &Value) -> BTreeMap<String, Declared> {
        let mut out = BTreeMap::new();
        let Some(map) = self.mapping(v, "networks") else {
            return out;
        };
        for (key, def) in map {
            let path = join("networks", key);
            let def_map = self.mapping(def, &path).cloned().unwrap_or_default();
            if let Some(name) = self.external(&def_map, &path, key, Kind::Network) {
                out.insert(key.clone(), Declared { name, key: None });
                continue;
            }
            let Some(name) = self.claim(Kind::Network, key, &path, true) else {
                continue;
            };
            let mut spec = Map::new();
            if let Some(d) = def_map.get("driver") {
                let p = join(&path, "driver");
                if let Some(driver) = self.string(d, &p) {
                    if driver != "overlay" {
                        self.warn(&p, format!("not imported: berth networks are Swarm overlay networks; `{driver}` is not available"));
                    }
                }
            }
            if let Some(opts) = def_map.get("driver_opts") {
                let p = join(&path, "driver_opts");
                if let Some(opts) = self.mapping(opts, &p) {
                    for k in opts.keys() {
                        if k == "encrypted" {
                            spec.insert("encrypted".into(), json!(true));
                        } else {
                            self.warn(&join(&p, k), "not imported: berth sets no overlay driver options other than encryption");
                        }
                    }
                }
            }
            for flag in ["attachable", "internal"] {
                if let Some(b) = def_map.get(flag) {
                    if let Some(b) = self.boolean(b, &join(&path, flag)) {
                        spec.insert(flag.into(), json!(b));
                    }
                }
            }
            if let Some(l) = def_map.get("labels") {
                let labels = self.labels(l, &join(&path, "labels"));
                if !labels.is_empty() {
                    spec.insert("labels".into(), json!(labels));
                }
            }
            if let Some(n) = def_map.get("name") {
                self.custom_name(n, &join(&path, "name"), &name);
            }
            self.leftovers(
                &def_map,
                &path,
                &[
                    "driver",
                    "driver_opts",
                    "attachable",
                    "internal",
                    "labels",
                    "external",
                    "name",
                ],
            );
            if self.emit(&path, manifest(Kind::Network, &name, Value::Object(spec))) {
                out.insert(key.clone(), Declared { name, key: None });
            }
        }
        out
    }

    /// `name:` on a created object: the Swarm name `docker stack deploy` would have used. berth
    /// names Swarm objects after the berth object, so it is reported, not applied.
    fn custom_name(&mut self, v: &Value, path: &str, berth_name: &str) {
        if let Some(n) = self.scalar(v, path) {
            self.warn(
                path,
                format!("not imported: berth names the Swarm object after the berth object (`{berth_name}`), not `{n}`"),
            );
        }
    }

    /// `external: true`: referenced by its `name` (or key), never created, and noted so the user
    /// makes sure a berth object of that name exists. Returns the berth name when external.
    fn external(
        &mut self,
        def: &Map<String, Value>,
        path: &str,
        key: &str,
        kind: Kind,
    ) -> Option<String> {
        let ext = def.get("external")?;
        let p = join(path, "external");
        let external = match ext {
            // Compose file format 3.3 and older: `external: {name: x}`.
            Value::Object(m) => {
                if let Some(n) = m.get("name") {
                    let n = self.scalar(n, &join(&p, "name"))?;
                    return self.external_ref(path, &n, kind);
                }
                true
            }
            other => self.boolean(other, &p)?,
        };
        if !external {
            return None;
        }
        let name = match def.get("name") {
            Some(n) => self.scalar(n, &join(path, "name"))?,
            None => key.to_string(),
        };
        for k in def.keys() {
            if k != "external" && k != "name" && !k.starts_with("x-") {
                self.warn(
                    &join(path, k),
                    format!("not imported: `{key}` is external, so it is not created here"),
                );
            }
        }
        self.external_ref(path, &name, kind)
    }

    fn external_ref(&mut self, path: &str, name: &str, kind: Kind) -> Option<String> {
        let clean = sanitize(name);
        let mut errors = berth_api_types::validate::Errors::default();
        berth_api_types::validate::check_dns_label(&mut errors, "name", &clean);
        if errors.into_result().is_err() {
            self.error(
                path,
                format!("external name `{name}` cannot be a berth name"),
            );
            return None;
        }
        let how = match kind {
            Kind::Secret => format!(" (`berth create secret {clean} --from-file KEY=PATH`)"),
            Kind::Config => format!(" (`berth create config {clean} --from-file KEY=PATH`)"),
            _ => String::new(),
        };
        self.note(
            path,
            format!(
                "external: not created; services wait until a berth {} named `{clean}` exists{how} (a Swarm object made with `docker {} create` is not one)",
                kind.lower(),
                kind.lower()
            ),
        );
        Some(clean)
    }

    fn volumes(&mut self, v: &Value) -> BTreeMap<String, Declared> {
        let mut out = BTreeMap::new();
        let Some(map) = self.mapping(v, "volumes") else {
            return out;
        };
        for (key, def) in map {
            let path = join("volumes", key);
            let def_map = self.mapping(def, &path).cloned().unwrap_or_default();
            if let Some(name) = self.external(&def_map, &path, key, Kind::Volume) {
                out.insert(key.clone(), Declared { name, key: None });
                continue;
            }
            let Some(name) = self.claim(Kind::Volume, key, &path, true) else {
                continue;
            };
            let mut spec = Map::new();
            if let Some(d) = def_map.get("driver") {
                if let Some(driver) = self.string(d, &join(&path, "driver")) {
                    spec.insert("driver".into(), json!(driver));
                }
            }
            if let Some(opts) = def_map.get("driver_opts") {
                let p = join(&path, "driver_opts");
                if let Some(opts) = self.mapping(opts, &p) {
                    let mut o = BTreeMap::new();
                    for (k, val) in opts {
                        if let Some(val) = self.scalar(val, &join(&p, k)) {
                            o.insert(k.clone(), val);
                        }
                    }
                    spec.insert("driverOpts".into(), json!(o));
                }
            }
            if let Some(l) = def_map.get("labels") {
                let labels = self.labels(l, &join(&path, "labels"));
                if !labels.is_empty() {
                    spec.insert("labels".into(), json!(labels));
                }
            }
            if let Some(n) = def_map.get("name") {
                self.custom_name(n, &join(&path, "name"), &name);
            }
            self.leftovers(
                &def_map,
                &path,
                &["driver", "driver_opts", "labels", "external", "name"],
            );
            if self.emit(&path, manifest(Kind::Volume, &name, Value::Object(spec))) {
                let stack = self.prefix.as_deref().unwrap_or("STACK");
                self.note(
                    &path,
                    format!("berth's volume is `{name}` on each node: data in a volume `docker stack deploy` made (`{stack}_{key}`) is not carried over; restore it into `{name}` (berth backups) or copy it before switching"),
                );
                out.insert(key.clone(), Declared { name, key: None });
            }
        }
        out
    }

    /// Top-level `secrets:` or `configs:`.
    fn files(&mut self, kind: Kind, section: &str, v: &Value) -> BTreeMap<String, Declared> {
        let mut out = BTreeMap::new();
        let Some(map) = self.mapping(v, section) else {
            return out;
        };
        for (key, def) in map {
            let path = join(section, key);
            let def_map = self.mapping(def, &path).cloned().unwrap_or_default();
            if let Some(name) = self.external(&def_map, &path, key, kind) {
                out.insert(key.clone(), Declared { name, key: None });
                continue;
            }
            let Some(name) = self.claim(kind, key, &path, true) else {
                continue;
            };
            // The file's one key: the Compose name, which is already a valid file name.
            let file_key = if key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                key.clone()
            } else {
                name.clone()
            };
            let mut handled = vec!["file", "external", "name", "labels"];
            let labels = match def_map.get("labels") {
                Some(l) => self.labels(l, &join(&path, "labels")),
                None => BTreeMap::new(),
            };
            if let Some(n) = def_map.get("name") {
                self.custom_name(n, &join(&path, "name"), &name);
            }
            let declared = Declared {
                name: name.clone(),
                key: Some(file_key.clone()),
            };
            match (kind, def_map.get("file"), def_map.get("content")) {
                (Kind::Secret, Some(f), _) => {
                    let p = join(&path, "file");
                    let Some(f) = self.string(f, &p) else {
                        continue;
                    };
                    let full = self.resolve(&f);
                    if let Err(e) = std::fs::metadata(&full) {
                        self.warn(
                            &p,
                            format!(
                                "{} cannot be read ({e}); the command below needs it",
                                full.display()
                            ),
                        );
                    }
                    let mut command = format!(
                        "berth create secret {name} --from-file {}",
                        quote(&format!("{file_key}={}", full.display()))
                    );
                    for (k, v) in &labels {
                        command.push_str(&format!(" --label {}", quote(&format!("{k}={v}"))));
                    }
                    self.note(
                        &path,
                        format!("no manifest is written for a secret, so its value lands in no file meant to be committed; create it from its file with: {command}"),
                    );
                    out.insert(key.clone(), declared);
                }
                (Kind::Config, Some(f), _) => {
                    let p = join(&path, "file");
                    let Some(f) = self.string(f, &p) else {
                        continue;
                    };
                    let full = self.resolve(&f);
                    let bytes = match (self.read)(&full) {
                        Ok(b) => b,
                        Err(e) => {
                            self.error(&p, format!("cannot read {}: {e}", full.display()));
                            continue;
                        }
                    };
                    let spec = match String::from_utf8(bytes) {
                        Ok(text) => json!({ "stringData": { file_key.clone(): text } }),
                        Err(e) => {
                            use base64::Engine;
                            let b64 =
                                base64::engine::general_purpose::STANDARD.encode(e.into_bytes());
                            json!({ "data": { file_key.clone(): b64 } })
                        }
                    };
                    let mut m = manifest(kind, &name, spec);
                    if !labels.is_empty() {
                        m["metadata"]["labels"] = json!(labels);
                    }
                    if self.emit(&path, m) {
                        out.insert(key.clone(), declared);
                    }
                }
                (Kind::Config, None, Some(c)) => {
                    handled.push("content");
                    let p = join(&path, "content");
                    let Some(text) = self.string(c, &p) else {
                        continue;
                    };
                    let mut m = manifest(
                        kind,
                        &name,
                        json!({ "stringData": { file_key.clone(): text } }),
                    );
                    if !labels.is_empty() {
                        m["metadata"]["labels"] = json!(labels);
                    }
                    if self.emit(&path, m) {
                        out.insert(key.clone(), declared);
                    }
                }
                _ => {
                    let what = if def_map.contains_key("environment") {
                        handled.push("environment");
                        let cmd = kind.lower();
                        format!("is taken from an environment variable, which berth cannot read: write the value to a file and run `berth create {cmd} {name} --from-file {file_key}=FILE`")
                    } else {
                        "has no `file:` source (nor `external: true`): nothing to import".into()
                    };
                    self.error(&path, what);
                    continue;
                }
            }
            self.leftovers(&def_map, &path, &handled);
        }
        out
    }

    fn service(&mut self, key: &str, v: &Value, d: &Declarations) {
        let path = join("services", key);
        let Some(svc) = self.mapping(v, &path) else {
            self.error(&path, "must be a mapping with at least `image:`");
            return;
        };
        let mut handled: Vec<&str> = vec![
            "image",
            "entrypoint",
            "command",
            "environment",
            "env_file",
            "deploy",
            "healthcheck",
            "labels",
            "secrets",
            "configs",
            "volumes",
            "tmpfs",
            "networks",
            "hostname",
            "user",
            "working_dir",
            "stop_grace_period",
            "init",
            "ports",
        ];
        let mut spec = Map::new();
        let image = match svc.get("image") {
            Some(i) => self.string(i, &join(&path, "image")),
            None => {
                let why = if svc.contains_key("build") {
                    "has only `build:`: berth runs images from a registry; build and push the image (in CI) and set `image:`"
                } else {
                    "has no `image:`"
                };
                self.error(&path, why);
                None
            }
        };
        if let Some(image) = image {
            spec.insert("image".into(), json!(image));
        }
        if let Some(Value::Object(deploy)) = svc.get("deploy") {
            let p = join(&path, "deploy");
            {
                if let Some(Value::String(mode)) = deploy.get("mode") {
                    if mode.ends_with("-job") {
                        self.warn(&join(&p, "mode"), format!("not imported: berth runs long-running services, not jobs (`{mode}`); the service `{key}` is skipped: run it as a one-off task outside berth"));
                        return;
                    }
                }
            }
        }
        let Some(name) = self.claim(Kind::Service, key, &path, true) else {
            return;
        };
        // Compose's entrypoint replaces the image's ENTRYPOINT and command its CMD: exactly
        // berth's `command` and `args` (Swarm's ContainerSpec.Command and Args). As in Docker,
        // an entrypoint given without a command drops the image's CMD.
        let entrypoint = svc
            .get("entrypoint")
            .and_then(|e| self.command(e, &join(&path, "entrypoint")));
        let command = svc
            .get("command")
            .and_then(|c| self.command(c, &join(&path, "command")));
        match (entrypoint, command) {
            (Some(e), Some(c)) if e.is_empty() => {
                // An empty entrypoint clears the image's; the command is then the whole program.
                if c.is_empty() {
                    self.warn(&join(&path, "entrypoint"), "not imported: an empty entrypoint and command has no berth equivalent; set `command:` to the program to run");
                } else {
                    spec.insert("command".into(), json!(c));
                }
            }
            (Some(e), c) => {
                if e.is_empty() {
                    self.warn(&join(&path, "entrypoint"), "not imported: an empty entrypoint (clearing the image's) has no berth equivalent; set `command:` to the program to run");
                } else {
                    spec.insert("command".into(), json!(e));
                }
                if let Some(c) = c {
                    spec.insert("args".into(), json!(c));
                }
            }
            (None, Some(c)) => {
                if c.is_empty() {
                    self.warn(
                        &join(&path, "command"),
                        "not imported: an empty command runs the image's CMD, as no command does",
                    );
                } else {
                    spec.insert("args".into(), json!(c));
                }
            }
            (None, None) => {}
        }
        let env = self.environment(svc, &path);
        if !env.is_empty() {
            let list: Vec<Value> = env
                .into_iter()
                .map(|(n, v)| json!({"name": n, "value": v}))
                .collect();
            spec.insert("env".into(), Value::Array(list));
        }
        if let Some(l) = svc.get("labels") {
            let labels = self.labels(l, &join(&path, "labels"));
            if !labels.is_empty() {
                spec.insert("containerLabels".into(), json!(labels));
            }
        }
        for (compose, berth) in [
            ("hostname", "hostname"),
            ("user", "user"),
            ("working_dir", "workingDir"),
        ] {
            if let Some(val) = svc.get(compose) {
                if let Some(s) = self.scalar(val, &join(&path, compose)) {
                    spec.insert(berth.into(), json!(s));
                }
            }
        }
        if let Some(g) = svc.get("stop_grace_period") {
            if let Some(g) = self.duration(g, &join(&path, "stop_grace_period")) {
                spec.insert("stopGracePeriod".into(), json!(g));
            }
        }
        if let Some(i) = svc.get("init") {
            if let Some(i) = self.boolean(i, &join(&path, "init")) {
                spec.insert("init".into(), json!(i));
            }
        }
        if let Some(deploy) = svc.get("deploy") {
            self.deploy(deploy, &join(&path, "deploy"), &mut spec);
        }
        if let Some(h) = svc.get("healthcheck") {
            if let Some(h) = self.healthcheck(h, &join(&path, "healthcheck")) {
                spec.insert("healthcheck".into(), h);
            }
        }
        for (section, kind, declared) in [
            ("secrets", Kind::Secret, &d.secrets),
            ("configs", Kind::Config, &d.configs),
        ] {
            if let Some(refs) = svc.get(section) {
                let refs = self.file_refs(refs, &join(&path, section), kind, declared);
                if !refs.is_empty() {
                    spec.insert(section.into(), Value::Array(refs));
                }
            }
        }
        let mut mounts = Vec::new();
        if let Some(vols) = svc.get("volumes") {
            mounts.extend(self.mounts(vols, &join(&path, "volumes"), &d.volumes));
        }
        if let Some(t) = svc.get("tmpfs") {
            mounts.extend(self.tmpfs(t, &join(&path, "tmpfs")));
        }
        if !mounts.is_empty() {
            spec.insert("volumes".into(), Value::Array(mounts));
        }
        if let Some(n) = svc.get("networks") {
            let nets = self.service_networks(n, &join(&path, "networks"), &d.networks);
            if !nets.is_empty() {
                spec.insert("networks".into(), json!(nets));
            }
        }
        if let Some(p) = svc.get("ports") {
            self.ports(p, &join(&path, "ports"), &name);
        }
        if svc.contains_key("build") && spec.contains_key("image") {
            handled.push("build");
            self.warn(&join(&path, "build"), "not imported: berth runs images from a registry; build and push the image in CI (the `image:` given is what runs)");
        }
        self.leftovers(svc, &path, &handled);
        if spec.contains_key("image") {
            self.emit(&path, manifest(Kind::Service, &name, Value::Object(spec)));
        }
    }

    /// env_file first (in order, later files win), then `environment` over it, as Compose does.
    fn environment(&mut self, svc: &Map<String, Value>, path: &str) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        let set = |env: &mut Vec<(String, String)>, k: String, v: String| match env
            .iter_mut()
            .find(|(n, _)| *n == k)
        {
            Some(slot) => slot.1 = v,
            None => env.push((k, v)),
        };
        if let Some(files) = svc.get("env_file") {
            let p = join(path, "env_file");
            let entries: Vec<(Value, String)> = match files {
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v.clone(), index(&p, i)))
                    .collect(),
                other => vec![(other.clone(), p.clone())],
            };
            for (entry, ep) in entries {
                // The long form: {path, required}.
                let (file, required) = match &entry {
                    Value::Object(m) => {
                        let file = m
                            .get("path")
                            .and_then(|f| self.string(f, &join(&ep, "path")));
                        let required = m
                            .get("required")
                            .and_then(|r| self.boolean(r, &join(&ep, "required")))
                            .unwrap_or(true);
                        for k in m.keys() {
                            if !matches!(k.as_str(), "path" | "required") {
                                self.warn(&join(&ep, k), "not imported: only `path` and `required` of an env_file entry are read");
                            }
                        }
                        (file, required)
                    }
                    other => (self.string(other, &ep), true),
                };
                let Some(file) = file else { continue };
                let full = self.resolve(&file);
                let bytes = match (self.read)(&full) {
                    Ok(b) => b,
                    Err(e) if !required => {
                        self.note(
                            &ep,
                            format!(
                                "{} is optional and cannot be read ({e}): skipped",
                                full.display()
                            ),
                        );
                        continue;
                    }
                    Err(e) => {
                        self.error(&ep, format!("cannot read {}: {e}", full.display()));
                        continue;
                    }
                };
                let Ok(text) = String::from_utf8(bytes) else {
                    self.error(&ep, format!("{} is not UTF-8 text", full.display()));
                    continue;
                };
                let shown = full.display().to_string();
                for entry in envfile::parse(&text) {
                    let at = format!("{shown}:{}", entry.line);
                    match entry.value {
                        Ok(Some(value)) => {
                            if looks_secret(&entry.name) {
                                self.warn(&ep, secret_env_warning(&entry.name, &at));
                            }
                            if has_variable(&value) {
                                self.warn(&ep, format!("{at}: {} uses a variable (`$NAME`): berth does not substitute it; the text is imported as written", entry.name));
                            }
                            set(&mut env, entry.name, value);
                        }
                        Ok(None) => self.warn(&ep, format!("{at}: {} has no value (Compose takes it from the shell running it): not imported; give it a value", entry.name)),
                        Err(why) => self.error(&ep, format!("{at}: {why}")),
                    }
                }
            }
        }
        if let Some(e) = svc.get("environment") {
            for (k, v, p) in self.pairs(e, &join(path, "environment")) {
                match v {
                    Some(v) => {
                        if looks_secret(&k) {
                            self.warn(&p, secret_env_warning(&k, "environment"));
                        }
                        set(&mut env, k, v);
                    }
                    None => self.warn(&p, format!("not imported: {k} has no value (Compose takes it from the shell running `docker stack deploy`, berth has none); give it a value")),
                }
            }
        }
        env
    }

    fn deploy(&mut self, v: &Value, path: &str, spec: &mut Map<String, Value>) {
        let Some(deploy) = self.mapping(v, path) else {
            return;
        };
        if let Some(m) = deploy.get("mode") {
            let p = join(path, "mode");
            match self.string(m, &p).as_deref() {
                Some("replicated") => {}
                Some("global") => {
                    spec.insert("mode".into(), json!("global"));
                }
                Some(other) => self.error(
                    &p,
                    format!("`{other}` is not a mode: `replicated` or `global`"),
                ),
                None => {}
            }
        }
        if let Some(r) = deploy.get("replicas") {
            if let Some(r) = self.count(r, &join(path, "replicas")) {
                spec.insert("replicas".into(), json!(r));
            }
        }
        if let Some(l) = deploy.get("labels") {
            let labels = self.labels(l, &join(path, "labels"));
            if !labels.is_empty() {
                spec.insert("labels".into(), json!(labels));
            }
        }
        if let Some(r) = deploy.get("resources") {
            let p = join(path, "resources");
            if let Some(res) = self.mapping(r, &p) {
                let mut out = Map::new();
                for (side, berth) in [("limits", "limits"), ("reservations", "reservations")] {
                    let Some(amounts) = res.get(side) else {
                        continue;
                    };
                    let sp = join(&p, side);
                    let Some(amounts) = self.mapping(amounts, &sp) else {
                        continue;
                    };
                    let mut a = Map::new();
                    if let Some(c) = amounts.get("cpus") {
                        let cp = join(&sp, "cpus");
                        if let Some(c) = self.scalar(c, &cp) {
                            match Cpus::parse(&c) {
                                Ok(_) => {
                                    a.insert("cpus".into(), json!(c));
                                }
                                Err(e) => self.error(&cp, e),
                            }
                        }
                    }
                    if let Some(m) = amounts.get("memory") {
                        let mp = join(&sp, "memory");
                        if let Some(m) = self.scalar(m, &mp) {
                            match ByteSize::parse(&m) {
                                Ok(_) => {
                                    a.insert("memory".into(), json!(m));
                                }
                                Err(e) => self.error(&mp, e),
                            }
                        }
                    }
                    self.leftovers(amounts, &sp, &["cpus", "memory"]);
                    if !a.is_empty() {
                        out.insert(berth.into(), Value::Object(a));
                    }
                }
                self.leftovers(res, &p, &["limits", "reservations"]);
                if !out.is_empty() {
                    spec.insert("resources".into(), Value::Object(out));
                }
            }
        }
        for (compose, berth) in [("update_config", "update"), ("rollback_config", "rollback")] {
            if let Some(u) = deploy.get(compose) {
                if let Some(u) = self.update_policy(u, &join(path, compose)) {
                    spec.insert(berth.into(), u);
                }
            }
        }
        if let Some(r) = deploy.get("restart_policy") {
            let p = join(path, "restart_policy");
            if let Some(r) = self.mapping(r, &p) {
                let mut out = Map::new();
                if let Some(c) = r.get("condition") {
                    let cp = join(&p, "condition");
                    match self.string(c, &cp).as_deref() {
                        Some(c @ ("none" | "on-failure" | "any")) => {
                            out.insert("condition".into(), json!(c));
                        }
                        Some(other) => self.error(
                            &cp,
                            format!("`{other}` is not a condition: `none`, `on-failure` or `any`"),
                        ),
                        None => {}
                    }
                }
                for k in ["delay", "window"] {
                    if let Some(d) = r.get(k) {
                        if let Some(d) = self.duration(d, &join(&p, k)) {
                            out.insert(k.into(), json!(d));
                        }
                    }
                }
                if let Some(m) = r.get("max_attempts") {
                    if let Some(m) = self.count(m, &join(&p, "max_attempts")) {
                        out.insert("maxAttempts".into(), json!(m));
                    }
                }
                self.leftovers(r, &p, &["condition", "delay", "window", "max_attempts"]);
                if !out.is_empty() {
                    spec.insert("restart".into(), Value::Object(out));
                }
            }
        }
        if let Some(pl) = deploy.get("placement") {
            let p = join(path, "placement");
            if let Some(pl) = self.mapping(pl, &p) {
                let mut out = Map::new();
                if let Some(c) = pl.get("constraints") {
                    if let Some(c) = self.strings(c, &join(&p, "constraints")) {
                        out.insert("constraints".into(), json!(c));
                    }
                }
                if let Some(prefs) = pl.get("preferences") {
                    let pp = join(&p, "preferences");
                    let mut spread = Vec::new();
                    if let Some(items) = self.list(prefs, &pp) {
                        for (i, item) in items.iter().enumerate() {
                            let ip = index(&pp, i);
                            if let Some(m) = self.mapping(item, &ip) {
                                if let Some(s) = m.get("spread") {
                                    if let Some(s) = self.string(s, &join(&ip, "spread")) {
                                        spread.push(s);
                                    }
                                }
                                self.leftovers(m, &ip, &["spread"]);
                            }
                        }
                    }
                    if !spread.is_empty() {
                        out.insert("spread".into(), json!(spread));
                    }
                }
                if let Some(m) = pl.get("max_replicas_per_node") {
                    if let Some(m) = self.count(m, &join(&p, "max_replicas_per_node")) {
                        out.insert("maxReplicasPerNode".into(), json!(m));
                    }
                }
                self.leftovers(
                    pl,
                    &p,
                    &["constraints", "preferences", "max_replicas_per_node"],
                );
                if !out.is_empty() {
                    spec.insert("placement".into(), Value::Object(out));
                }
            }
        }
        self.leftovers(
            deploy,
            path,
            &[
                "mode",
                "replicas",
                "labels",
                "resources",
                "update_config",
                "rollback_config",
                "restart_policy",
                "placement",
            ],
        );
    }

    fn update_policy(&mut self, v: &Value, path: &str) -> Option<Value> {
        let u = self.mapping(v, path)?;
        let mut out = Map::new();
        if let Some(p) = u.get("parallelism") {
            if let Some(p) = self.count(p, &join(path, "parallelism")) {
                out.insert("parallelism".into(), json!(p));
            }
        }
        for k in ["delay", "monitor"] {
            if let Some(d) = u.get(k) {
                if let Some(d) = self.duration(d, &join(path, k)) {
                    out.insert(k.into(), json!(d));
                }
            }
        }
        if let Some(a) = u.get("failure_action") {
            let p = join(path, "failure_action");
            match self.string(a, &p).as_deref() {
                Some(a @ ("pause" | "continue" | "rollback")) => {
                    out.insert("failureAction".into(), json!(a));
                }
                Some(other) => self.error(
                    &p,
                    format!("`{other}` is not an action: `pause`, `continue` or `rollback`"),
                ),
                None => {}
            }
        }
        if let Some(r) = u.get("max_failure_ratio") {
            let p = join(path, "max_failure_ratio");
            match r.as_f64() {
                Some(r) => {
                    out.insert("maxFailureRatio".into(), json!(r));
                }
                None => self.error(
                    &p,
                    format!("must be a number from 0 to 1, found {}", type_name(r)),
                ),
            }
        }
        if let Some(o) = u.get("order") {
            let p = join(path, "order");
            match self.string(o, &p).as_deref() {
                Some(o @ ("start-first" | "stop-first")) => {
                    out.insert("order".into(), json!(o));
                }
                Some(other) => self.error(
                    &p,
                    format!("`{other}` is not an order: `start-first` or `stop-first`"),
                ),
                None => {}
            }
        }
        self.leftovers(
            u,
            path,
            &[
                "parallelism",
                "delay",
                "monitor",
                "failure_action",
                "max_failure_ratio",
                "order",
            ],
        );
        (!out.is_empty()).then_some(Value::Object(out))
    }

    fn healthcheck(&mut self, v: &Value, path: &str) -> Option<Value> {
        let h = self.mapping(v, path)?;
        let mut out = Map::new();
        if let Some(d) = h.get("disable") {
            if self.boolean(d, &join(path, "disable")) == Some(true) {
                out.insert("disable".into(), json!(true));
            }
        }
        if let Some(t) = h.get("test") {
            let p = join(path, "test");
            match t {
                // A string is run by the container's shell, as Compose does.
                Value::String(s) => {
                    out.insert("test".into(), json!(["CMD-SHELL", s]));
                }
                other => {
                    if let Some(t) = self.strings(other, &p) {
                        if t.first().is_some_and(|f| f == "NONE") {
                            out.insert("disable".into(), json!(true));
                        } else {
                            out.insert("test".into(), json!(t));
                        }
                    }
                }
            }
        }
        for (compose, berth) in [
            ("interval", "interval"),
            ("timeout", "timeout"),
            ("start_period", "startPeriod"),
        ] {
            if let Some(d) = h.get(compose) {
                if let Some(d) = self.duration(d, &join(path, compose)) {
                    out.insert(berth.into(), json!(d));
                }
            }
        }
        if let Some(r) = h.get("retries") {
            if let Some(r) = self.count(r, &join(path, "retries")) {
                out.insert("retries".into(), json!(r));
            }
        }
        self.leftovers(
            h,
            path,
            &[
                "disable",
                "test",
                "interval",
                "timeout",
                "start_period",
                "retries",
            ],
        );
        (!out.is_empty()).then_some(Value::Object(out))
    }

    /// A service's `secrets:` or `configs:`: short (`- name`) or long (`- source: name`). The
    /// target is always written: Compose's default (`/run/secrets/<source>`, `/<source>`) is
    /// named after the Compose name, which berth's name may not be.
    fn file_refs(
        &mut self,
        v: &Value,
        path: &str,
        kind: Kind,
        declared: &BTreeMap<String, Declared>,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let Some(items) = self.list(v, path) else {
            return out;
        };
        let section = if kind == Kind::Secret {
            "secrets"
        } else {
            "configs"
        };
        for (i, item) in items.iter().enumerate() {
            let p = index(path, i);
            let (source, long) = match item {
                Value::String(s) => (s.clone(), None),
                Value::Object(m) => match m
                    .get("source")
                    .and_then(|s| self.string(s, &join(&p, "source")))
                {
                    Some(s) => (s, Some(m)),
                    None => {
                        self.error(&p, "needs `source:`");
                        continue;
                    }
                },
                other => {
                    self.error(
                        &p,
                        format!(
                            "must be a name or a mapping with `source:`, found {}",
                            type_name(other)
                        ),
                    );
                    continue;
                }
            };
            let Some(decl) = declared.get(&source) else {
                self.error(
                    &p,
                    format!("`{source}` is not defined under the top-level `{section}:`"),
                );
                continue;
            };
            let mut r = Map::new();
            r.insert("name".into(), json!(decl.name));
            if let Some(k) = &decl.key {
                r.insert("key".into(), json!(k));
            }
            let default_target = if kind == Kind::Secret {
                source.clone()
            } else {
                format!("/{source}")
            };
            let mut target = default_target;
            if let Some(m) = long {
                if let Some(t) = m.get("target") {
                    if let Some(t) = self.string(t, &join(&p, "target")) {
                        target = t;
                    }
                }
                for k in ["uid", "gid"] {
                    if let Some(val) = m.get(k) {
                        if let Some(val) = self.scalar(val, &join(&p, k)) {
                            r.insert(k.into(), json!(val));
                        }
                    }
                }
                if let Some(mode) = m.get("mode") {
                    let mp = join(&p, "mode");
                    match mode {
                        // YAML read `0o440` (or `288`) as a number: berth writes the octal text.
                        Value::Number(n) => match n.as_u64() {
                            Some(bits) if bits <= 0o777 => {
                                r.insert("mode".into(), json!(format!("{bits:04o}")));
                            }
                            _ => self.error(&mp, format!("{n} is not a file mode (at most 0o777)")),
                        },
                        Value::String(s) => {
                            r.insert("mode".into(), json!(s));
                        }
                        other => self.error(
                            &mp,
                            format!(
                                "must be a file mode such as 0o440, found {}",
                                type_name(other)
                            ),
                        ),
                    }
                }
                self.leftovers(m, &p, &["source", "target", "uid", "gid", "mode"]);
            }
            r.insert("target".into(), json!(target));
            out.push(Value::Object(r));
        }
        out
    }

    fn mounts(
        &mut self,
        v: &Value,
        path: &str,
        declared: &BTreeMap<String, Declared>,
    ) -> Vec<Value> {
        let mut out = Vec::new();
        let Some(items) = self.list(v, path) else {
            return out;
        };
        for (i, item) in items.iter().enumerate() {
            let p = index(path, i);
            // (type, source, target, read-only, tmpfs size)
            let (typ, source, target, read_only, size) = match item {
                Value::String(s) => {
                    let parts: Vec<&str> = s.split(':').collect();
                    let (source, target, opts) = match parts.as_slice() {
                        [t] => (None, t.to_string(), None),
                        [s, t] => (Some(s.to_string()), t.to_string(), None),
                        [s, t, o] => (Some(s.to_string()), t.to_string(), Some(*o)),
                        _ => {
                            self.error(&p, format!("`{s}` is not SOURCE:TARGET[:MODE]"));
                            continue;
                        }
                    };
                    let mut ro = false;
                    for o in opts
                        .unwrap_or_default()
                        .split(',')
                        .filter(|o| !o.is_empty())
                    {
                        match o {
                            "ro" => ro = true,
                            "rw" => {}
                            other => self.warn(&p, format!("not imported: the mount option `{other}` has no berth equivalent")),
                        }
                    }
                    let typ = match &source {
                        None => "volume",
                        Some(s) if s.starts_with(['/', '.', '~']) => "bind",
                        Some(_) => "volume",
                    };
                    (typ.to_string(), source, target, ro, None)
                }
                Value::Object(m) => {
                    let typ = match m.get("type") {
                        Some(t) => match self.string(t, &join(&p, "type")) {
                            Some(t) => t,
                            None => continue,
                        },
                        None => "volume".to_string(),
                    };
                    let source = m
                        .get("source")
                        .and_then(|s| self.string(s, &join(&p, "source")));
                    let Some(target) = m
                        .get("target")
                        .and_then(|t| self.string(t, &join(&p, "target")))
                    else {
                        self.error(&p, "needs `target:`");
                        continue;
                    };
                    let ro = m
                        .get("read_only")
                        .and_then(|r| self.boolean(r, &join(&p, "read_only")))
                        .unwrap_or(false);
                    let mut size = None;
                    if let Some(t) = m.get("tmpfs") {
                        let tp = join(&p, "tmpfs");
                        if let Some(t) = self.mapping(t, &tp) {
                            if let Some(s) = t.get("size") {
                                let sp = join(&tp, "size");
                                if let Some(s) = self.scalar(s, &sp) {
                                    match ByteSize::parse(&s) {
                                        Ok(_) => size = Some(s),
                                        Err(e) => self.error(&sp, e),
                                    }
                                }
                            }
                            self.leftovers(t, &tp, &["size"]);
                        }
                    }
                    self.leftovers(m, &p, &["type", "source", "target", "read_only", "tmpfs"]);
                    (typ, source, target, ro, size)
                }
                other => {
                    self.error(
                        &p,
                        format!(
                            "must be SOURCE:TARGET or a mapping, found {}",
                            type_name(other)
                        ),
                    );
                    continue;
                }
            };
            let mut mount = Map::new();
            mount.insert("target".into(), json!(target));
            match typ.as_str() {
                "volume" => match source {
                    Some(src) => match declared.get(&src) {
                        Some(decl) => {
                            mount.insert("volume".into(), json!(decl.name));
                        }
                        None => {
                            self.error(&p, format!("`{src}` is not defined under the top-level `volumes:`"));
                            continue;
                        }
                    },
                    None => self.note(&p, format!("`{target}` is an anonymous volume: its data is in no backup, and berth's status says so")),
                },
                "tmpfs" => {
                    mount.insert("tmpfs".into(), json!(true));
                    if let Some(s) = size {
                        mount.insert("size".into(), json!(s));
                    }
                }
                "bind" => {
                    self.warn(&p, format!("not imported: `{}` is a host path; berth mounts no host paths into services (a task may run on any node). Use a named volume for data, or a Config for a file", source.unwrap_or_default()));
                    continue;
                }
                other => {
                    self.warn(&p, format!("not imported: mounts of type `{other}` have no berth equivalent"));
                    continue;
                }
            }
            if read_only {
                mount.insert("readOnly".into(), json!(true));
            }
            out.push(Value::Object(mount));
        }
        out
    }

    fn tmpfs(&mut self, v: &Value, path: &str) -> Vec<Value> {
        let entries: Vec<(Value, String)> = match v {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| (v.clone(), index(path, i)))
                .collect(),
            other => vec![(other.clone(), path.to_string())],
        };
        let mut out = Vec::new();
        for (entry, p) in entries {
            let Some(s) = self.string(&entry, &p) else {
                continue;
            };
            let (target, opts) = match s.split_once(':') {
                Some((t, o)) => (t.to_string(), Some(o.to_string())),
                None => (s.clone(), None),
            };
            let mut mount = json!({"target": target, "tmpfs": true});
            for o in opts.iter().flat_map(|o| o.split(',')) {
                match o.split_once('=') {
                    Some(("size", size)) if ByteSize::parse(size).is_ok() => {
                        mount["size"] = json!(size);
                    }
                    _ => self.warn(
                        &p,
                        format!("not imported: the tmpfs option `{o}` (only `size=` is)"),
                    ),
                }
            }
            out.push(mount);
        }
        out
    }

    fn service_networks(
        &mut self,
        v: &Value,
        path: &str,
        declared: &BTreeMap<String, Declared>,
    ) -> Vec<String> {
        let mut names: Vec<(String, String)> = Vec::new();
        match v {
            Value::Array(_) => {
                if let Some(list) = self.strings(v, path) {
                    names = list
                        .into_iter()
                        .enumerate()
                        .map(|(i, n)| (n, index(path, i)))
                        .collect();
                }
            }
            Value::Object(m) => {
                for (n, opts) in m {
                    let p = join(path, n);
                    if let Some(o) = self.mapping(opts, &p) {
                        for k in o.keys() {
                            let advice = match k.as_str() {
                                "aliases" => {
                                    "services are reached by their berth name only, no aliases"
                                }
                                "ipv4_address" | "ipv6_address" => "Swarm assigns addresses itself",
                                _ => "it has no berth equivalent",
                            };
                            self.warn(&join(&p, k), format!("not imported: {advice}"));
                        }
                    }
                    names.push((n.clone(), p));
                }
            }
            other => self.error(
                path,
                format!("must be a list or a mapping, found {}", type_name(other)),
            ),
        }
        let mut out = Vec::new();
        for (n, p) in names {
            match declared.get(&n) {
                Some(decl) => out.push(decl.name.clone()),
                None if n == "default" => self.warn(&p, "not imported: Compose's implicit `default` network is berth's default network, which services join when they list no network; list it under the top-level `networks:` to make it a network of its own"),
                None => self.error(&p, format!("`{n}` is not defined under the top-level `networks:`")),
            }
        }
        out
    }

    /// Published ports: never mapped, always warned; web ones get an Ingress stub.
    fn ports(&mut self, v: &Value, path: &str, service: &str) {
        let Some(items) = self.list(v, path) else {
            return;
        };
        let mut stubbed: BTreeSet<u64> = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            let p = index(path, i);
            let (published, target) = match item {
                Value::Number(n) => (None, n.as_u64()),
                Value::String(s) => parse_port(s),
                Value::Object(m) => (
                    m.get("published").and_then(|v| match v {
                        Value::String(s) => s.split('-').next().and_then(|s| s.parse().ok()),
                        other => other.as_u64(),
                    }),
                    m.get("target").and_then(Value::as_u64),
                ),
                other => {
                    self.error(
                        &p,
                        format!(
                            "must be a port, PUBLISHED:TARGET or a mapping, found {}",
                            type_name(other)
                        ),
                    );
                    continue;
                }
            };
            let Some(target) = target else {
                self.error(&p, "names no container port");
                continue;
            };
            let shown = match published {
                Some(pb) => format!("{pb}:{target}"),
                None => target.to_string(),
            };
            let web =
                WEB_PORTS.contains(&target) || published.is_some_and(|p| WEB_PORTS.contains(&p));
            if web {
                let name = if stubbed.is_empty() {
                    service.to_string()
                } else {
                    format!("{service}-{target}")
                };
                if stubbed.insert(target) {
                    self.out.ingress_stubs.push(IngressStub {
                        text: ingress_stub(&name, service, target, &shown),
                        name: name.clone(),
                    });
                }
                self.warn(&p, format!("not imported: berth publishes no ports on the nodes; HTTP(S) reaches `{service}` through an Ingress (HTTPS only, plain HTTP is redirected): fill in the host of the Ingress stub `{name}` (port {target}) and uncomment it"));
            } else {
                self.warn(&p, format!("not imported: berth publishes no ports on the nodes, and only HTTP has an Ingress; `{shown}` is reachable from services on the same network (put clients on it)"));
            }
        }
    }
}

struct Declarations {
    networks: BTreeMap<String, Declared>,
    volumes: BTreeMap<String, Declared>,
    configs: BTreeMap<String, Declared>,
    secrets: BTreeMap<String, Declared>,
}

/// A manifest without status, as `berth apply -f` reads it.
fn manifest(kind: Kind, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// `[IP:]PUBLISHED:TARGET[/PROTO]`, ranges by their first port: (published, target).
fn parse_port(s: &str) -> (Option<u64>, Option<u64>) {
    let s = s.split('/').next().unwrap_or(s);
    let first = |p: &str| {
        p.split('-')
            .next()
            .and_then(|p| p.trim().parse::<u64>().ok())
    };
    let mut parts = s.rsplitn(3, ':');
    let target = parts.next().and_then(first);
    let published = parts.next().and_then(first);
    (published, target)
}

/// Lower case, anything but letters, digits and `-` made `-`, no `-` at either end.
pub fn sanitize(name: &str) -> String {
    let mapped: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    mapped.trim_matches('-').to_string()
}

/// Every string with Compose's `$$` made `$`.
fn unescape_dollars(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(s.replace("$$", "$")),
        Value::Array(items) => Value::Array(items.iter().map(unescape_dollars).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), unescape_dollars(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `$NAME` or `${...}`; `$$` is Compose's escaped dollar.
fn has_variable(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            match b.get(i + 1) {
                Some(b'$') => {
                    i += 2;
                    continue;
                }
                Some(c) if *c == b'{' || c.is_ascii_alphabetic() || *c == b'_' => return true,
                _ => {}
            }
        }
        i += 1;
    }
    false
}

/// Whether an env name reads like it holds a credential. `*_FILE` and `*_PATH` name a file (the
/// right way to pass one), so they are not.
pub fn looks_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    if upper.ends_with("_FILE") || upper.ends_with("_PATH") {
        return false;
    }
    const PARTS: [&str; 9] = [
        "PASSWORD",
        "PASSWD",
        "PASS",
        "TOKEN",
        "SECRET",
        "KEY",
        "APIKEY",
        "CREDENTIALS",
        "PRIVATE",
    ];
    ["PASSWORD", "SECRET", "TOKEN"]
        .iter()
        .any(|w| upper.contains(w))
        || upper
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|part| PARTS.contains(&part))
}

/// Never shows the value: only the name and where it came from.
fn secret_env_warning(name: &str, from: &str) -> String {
    format!("{from}: {name} looks like a credential and is imported as a plain env value, which anyone who can read the service sees (`berth get service -o yaml`, `docker service inspect`): put it in a Secret (`berth create secret NAME --from-file {name}=FILE`), mount it under `secrets:` and have the program read /run/secrets/... (many images take `{name}_FILE`)")
}

/// Quotes a word for a shell command line when it needs it.
fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_./=:@%+,-".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// The commented-out Ingress: valid as soon as the host is filled in and the `# ` removed.
fn ingress_stub(name: &str, service: &str, port: u64, published: &str) -> String {
    let body = ingress_manifest(name, service, port, "CHANGE-ME.example.com");
    let yaml = crate::output::to_yaml(&body);
    let mut out = format!(
        "# Ingress for `{service}` (Compose published {published}): set the host, then remove the\n\
         # leading `# ` of the lines below. `mode: internal` has berth's CA issue the certificate;\n\
         # for a certificate of your own use `secretRef: NAME` (a Secret with tls.crt and tls.key).\n"
    );
    for line in yaml.lines() {
        if line == "---" {
            continue;
        }
        out.push_str("# ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn ingress_manifest(name: &str, service: &str, port: u64, host: &str) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": "Ingress",
        "metadata": {"name": name},
        "spec": {
            "rules": [{"host": host, "paths": [{"path": "/", "service": service, "port": port}]}],
            "tls": {"mode": "internal"},
        },
    })
}

/// What to do instead, for the Compose keys people use most that berth does not map.
fn advice(key: &str) -> Option<&'static str> {
    Some(match key {
        "build" => "berth runs images from a registry; build and push the image in CI and set `image:`",
        "depends_on" => "berth starts services independently; make the service retry its connections (a healthcheck keeps it out of Ready until it works)",
        "expose" => "services reach each other's ports on shared networks without it",
        "cap_add" => "berth grants no extra capabilities; run the program without them",
        "cap_drop" => "berth sets no capability list; the engine's default set applies",
        "privileged" => "berth never runs privileged containers",
        "network_mode" => "berth services join overlay networks only (no host or container network mode)",
        "pid" | "ipc" | "userns_mode" | "uts" => "sharing the host's or another container's namespaces is not available",
        "devices" => "host devices are not available to berth services",
        "container_name" => "Swarm names containers itself; the service keeps its berth name",
        "links" | "external_links" => "services on a shared network reach each other by name",
        "restart" => "docker stack deploy ignores it too; use deploy.restart_policy",
        "logging" => "services use the engine's log driver; read logs with `berth logs`",
        "security_opt" => "berth sets no security options; the engine's defaults apply",
        "sysctls" | "ulimits" | "shm_size" | "oom_score_adj" | "oom_kill_disable" => "kernel and resource tuning of containers is not available",
        "extra_hosts" | "dns" | "dns_search" | "dns_opt" | "domainname" | "mac_address" => "berth sets no DNS or host entries; services resolve each other through Swarm's DNS",
        "mem_limit" | "memswap_limit" | "mem_reservation" | "cpus" | "cpu_shares" | "cpu_quota" | "cpuset" | "cpu_count" | "cpu_percent" | "cpu_period" | "pids_limit" => "use deploy.resources (limits, reservations)",
        "scale" => "use deploy.replicas",
        "stop_signal" => "Swarm stops with SIGTERM, then SIGKILL after stopGracePeriod",
        "tty" | "stdin_open" => "services run without a terminal; use `berth exec -it` for one",
        "read_only" => "berth does not make the root filesystem read-only",
        "volumes_from" => "mount the same named volume in both services",
        "profiles" => "every service in the file is imported; delete the manifests you do not want",
        "platform" | "pull_policy" => "Swarm picks the image's platform and pulls when a node lacks the image",
        "endpoint_mode" => "berth services use a virtual IP",
        "pids" => "a process limit is not available",
        "generic_resources" | "devices_reservations" => "generic resources and device reservations are not available",
        "start_interval" => "Swarm's engine has no start interval",
        "version" => "it is informational",
        "secrets" | "configs" | "volumes" | "networks" | "services" => "it is not valid here",
        _ => return None,
    })
}

/// Paths of every file of the import, for `-o DIR`: `<kind>-<name>.yaml`.
pub fn file_name(kind: &str, name: &str) -> PathBuf {
    PathBuf::from(format!("{kind}-{name}.yaml"))
}
