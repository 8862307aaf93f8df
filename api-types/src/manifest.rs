//! Manifest loading: YAML and JSON files become `serde_json::Value` documents that remember, for every
//! field, the file, line and column it came from. Type errors found while deserializing a document and
//! semantic errors found by validators afterwards are both reported as `file:line:col: path: message`,
//! so a user can jump straight to the offending line.
//!
//! What is accepted, and why:
//! - Multi-document YAML (`---`). Documents that are empty, only comments, or an explicit `null` are
//!   skipped, as kubectl does, so leading and trailing separators are harmless.
//! - JSON goes through the same YAML parser (YAML 1.2 reads JSON), so JSON errors have locations
//!   too. A document whose root is an array, or a `List`-style object (`items` plus at most
//!   `apiVersion`, `kind` ending in `List`, and `metadata`), is split into one document per item, as
//!   `kubectl get -o json` output and hand-written bundles are.
//! - Plain scalars resolve per the YAML 1.2 core schema (`null`/`~`/empty, `true`/`false` in three
//!   spellings, decimal/`0x`/`0o` integers, floats); quoted scalars are always strings, and `yes`,
//!   `on` or `1_000` are strings as YAML 1.2 says. One deliberate deviation: a decimal integer with
//!   a leading zero (`0755`) is an error, because YAML 1.1 tools (Compose among them) read it as
//!   octal and a file mode silently changing value is worse than a prompt to write `0o755`.
//!   `.inf`/`.nan` and integers beyond 64 bits are errors because JSON cannot hold them.
//! - Tags: `!!str`, `!!int`, `!!float`, `!!bool`, `!!null` are honoured on scalars (`!!str 0755`
//!   is a string), `!!map`/`!!seq` are accepted on the matching collection, and the non-specific
//!   `!` makes a string. Any other tag (`!!binary`, `!!timestamp`, `!Custom`, ...) is rejected,
//!   because silently dropping it would change what the user meant.
//! - Mapping keys must be strings; a duplicate key is an error at the second occurrence (YAML
//!   parsers that keep the last one silently hide typos and merge mistakes).
//! - Anchors and aliases: an alias copies the anchored value. Merge keys (`<<: *defaults`, a YAML 1.1
//!   feature that Compose files use heavily) are supported: keys written in the mapping win, then
//!   earlier merged mappings win over later ones. Alias expansion is bounded so a "billion laughs"
//!   file fails instead of exhausting memory, and nesting is limited to [`MAX_DEPTH`] levels so
//!   deserializing and dropping a document cannot overflow the stack.
//!
//! Field paths ([`FieldPath`]) are written `spec.template.env[2].name`, the same form
//! `serde_path_to_error` prints and validators build with `format!("{path}.{key}")`. Keys are not
//! escaped, so a label key containing dots (`metadata.labels.com.example.tier`) reads naturally and
//! is found by exact lookup.
//!
//! Locations are 1-based lines and columns, counted in characters (a tab is one column). Inside
//! aliased content a path resolves to the alias, inside merged keys to the `<<` key.

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Number, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::Read;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, ScanError, TScalarStyle};

/// A field path such as `spec.template.env[2].name`; the document root is the empty path.
pub type FieldPath = String;

/// Deepest nesting accepted, in collections. Generous for any manifest, and low enough that the
/// recursive code that builds, deserializes and drops a `Value` stays far from the stack limit.
pub const MAX_DEPTH: usize = 128;

/// Budget, per document, for data copied by aliases (roughly bytes: a node counts 64, a string its
/// length). Real manifests use a few KiB; an alias bomb reaches this within a few levels.
const MAX_ALIAS_EXPANSION: usize = 64 << 20;

/// Extensions picked up when walking a directory.
const MANIFEST_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// A position in a manifest file, both 1-based. Columns count characters, not bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// One manifest document with the location of every field in it.
#[derive(Clone)]
pub struct SourceDoc {
    /// Display name of the file (`<stdin>` for standard input).
    pub file: String,
    /// 0-based position among the documents the file yielded: skipped empty documents do not count,
    /// and each item of a list counts as one.
    pub index: usize,
    pub value: Value,
    /// Path -> where the node starts; for a mapping's value, where its key starts, since that is
    /// the line a user looks for.
    locations: BTreeMap<FieldPath, Location>,
    doc_start: Location,
}

/// Hand-written so that logging a document never prints its content: manifests will carry secrets.
impl fmt::Debug for SourceDoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceDoc")
            .field("file", &self.file)
            .field("index", &self.index)
            .field("doc_start", &self.doc_start)
            .field("fields", &self.locations.len())
            .finish_non_exhaustive()
    }
}

impl SourceDoc {
    /// Where the document's root node starts.
    pub fn doc_start(&self) -> Location {
        self.doc_start
    }

    /// The location of `path`, or of its nearest ancestor that exists (a missing field is reported
    /// at the mapping that should hold it), or the document start.
    pub fn location_of(&self, path: &str) -> Location {
        let mut path = path;
        loop {
            if let Some(loc) = self.locations.get(path) {
                return *loc;
            }
            match parent_path(path) {
                Some(parent) => path = parent,
                None => return self.doc_start,
            }
        }
    }

    /// Deserializes the document, turning a serde error into one that names the field and its
    /// location. For an unknown field the path (and location) is that of the unknown key itself.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, ManifestError> {
        serde_path_to_error::deserialize(&self.value).map_err(|e| {
            let message = e.inner().to_string();
            let path = error_path(&self.value, e.path(), &message);
            ManifestError::at(self, &path, message)
        })
    }
}

/// A problem with a manifest, placed at a file, document, location and field path.
///
/// Displays as `fixtures/bad.yaml:12:7: document 2: spec.replicas: invalid type: string "three",
/// expected u32`; the location is left out when unknown, the document when it is the first one, and
/// the path when it is the root. It never includes the document's content, only (via serde's
/// messages) the offending scalar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{}", Rendered(self))]
pub struct ManifestError {
    pub file: String,
    /// 0-based document index, as in [`SourceDoc::index`].
    pub document: usize,
    pub location: Option<Location>,
    pub path: FieldPath,
    pub message: String,
}

struct Rendered<'a>(&'a ManifestError);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = self.0;
        f.write_str(&e.file)?;
        if let Some(loc) = e.location {
            write!(f, ":{loc}")?;
        }
        if e.document > 0 {
            write!(f, ": document {}", e.document + 1)?;
        }
        if !e.path.is_empty() {
            write!(f, ": {}", e.path)?;
        }
        write!(f, ": {}", e.message)
    }
}

impl ManifestError {
    /// An error about `path` in `doc`, located at that field (or its nearest existing ancestor).
    /// Meant for semantic validators that run after deserialization.
    pub fn at(doc: &SourceDoc, path: &str, message: impl Into<String>) -> Self {
        ManifestError {
            file: doc.file.clone(),
            document: doc.index,
            location: Some(doc.location_of(path)),
            path: path.to_owned(),
            message: message.into(),
        }
    }

    /// An error about a whole file (cannot read it, not UTF-8, ...).
    fn file(
        file: impl Into<String>,
        location: Option<Location>,
        message: impl Into<String>,
    ) -> Self {
        ManifestError {
            file: file.into(),
            document: 0,
            location,
            path: String::new(),
            message: message.into(),
        }
    }
}

/// Parses every document of one file. `file` is only used as the display name in locations and
/// errors. Stops at the first error, since a YAML parser cannot resynchronize after one.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<SourceDoc>, ManifestError> {
    // A byte-order mark is invisible in editors; leaving it would shift columns and glue it to the
    // first key.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    match Builder::new(file, text, Vec::new()).run() {
        Err(first) if first.message.contains("invalid Unicode character escape") => {
            // JSON encoders such as Python's escape non-BMP characters as UTF-16 surrogate pairs,
            // which YAML rejects. Retry with YAML's 32-bit escape, correcting columns back.
            match rewrite_surrogate_pairs(text) {
                Some((rewritten, shifts)) => Builder::new(file, &rewritten, shifts).run(),
                None => Err(first),
            }
        }
        other => other,
    }
}

/// Loads manifests from files, directories (walked recursively in sorted order, taking `*.yaml`,
/// `*.yml` and `*.json` case-insensitively, skipping hidden entries, following symlinks) and `-`
/// (standard input, `<stdin>` in messages). A file named explicitly is read whatever its extension.
/// A missing path, a directory without manifests, an unreadable or non-UTF-8 file, and any parse
/// error are all reported: every error from every file, so a user can fix them in one go.
pub fn load_paths(paths: &[PathBuf]) -> Result<Vec<SourceDoc>, Vec<ManifestError>> {
    load_with_stdin(paths, &mut std::io::stdin().lock())
}

fn load_with_stdin(
    paths: &[PathBuf],
    stdin: &mut dyn Read,
) -> Result<Vec<SourceDoc>, Vec<ManifestError>> {
    let mut docs = Vec::new();
    let mut errors = Vec::new();
    let mut stdin_read = false;
    for path in paths {
        if path.as_os_str() == "-" {
            if stdin_read {
                errors.push(ManifestError::file(
                    "<stdin>",
                    None,
                    "standard input given more than once",
                ));
                continue;
            }
            stdin_read = true;
            let mut bytes = Vec::new();
            match stdin.read_to_end(&mut bytes) {
                Ok(_) => parse_bytes("<stdin>", &bytes, &mut docs, &mut errors),
                Err(e) => errors.push(ManifestError::file(
                    "<stdin>",
                    None,
                    format!("cannot read: {e}"),
                )),
            }
            continue;
        }
        let name = path.display().to_string();
        match std::fs::metadata(path) {
            Err(e) => errors.push(ManifestError::file(name, None, io_message(&e))),
            Ok(meta) if meta.is_dir() => {
                let mut files = Vec::new();
                let mut visited = HashSet::new();
                walk_dir(path, &mut files, &mut visited, &mut errors);
                if files.is_empty() {
                    errors.push(ManifestError::file(
                        name,
                        None,
                        "directory contains no *.yaml, *.yml or *.json files",
                    ));
                }
                for file in files {
                    load_file(&file, &mut docs, &mut errors);
                }
            }
            // Named explicitly, so any extension is taken.
            Ok(_) => load_file(path, &mut docs, &mut errors),
        }
    }
    if errors.is_empty() {
        Ok(docs)
    } else {
        Err(errors)
    }
}

fn io_message(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::NotFound {
        "no such file or directory".to_owned()
    } else {
        format!("cannot read: {e}")
    }
}

/// Collects manifest files under `dir` in sorted order, depth first. `visited` holds canonical
/// directories so a symlink cycle is walked once instead of forever.
fn walk_dir(
    dir: &Path,
    files: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
    errors: &mut Vec<ManifestError>,
) {
    let name = dir.display().to_string();
    match std::fs::canonicalize(dir) {
        Ok(canonical) => {
            if !visited.insert(canonical) {
                return;
            }
        }
        Err(e) => {
            errors.push(ManifestError::file(name, None, io_message(&e)));
            return;
        }
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(ManifestError::file(name, None, io_message(&e)));
            return;
        }
    };
    let mut entries: Vec<_> = match entries.collect::<Result<_, _>>() {
        Ok(entries) => entries,
        Err(e) => {
            errors.push(ManifestError::file(name, None, io_message(&e)));
            return;
        }
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let file_name = entry.file_name();
        if file_name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        let wanted = path
            .extension()
            .and_then(|ext| ext.to_str())
            .is_some_and(|ext| {
                MANIFEST_EXTENSIONS
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(ext))
            });
        // `fs::metadata` follows symlinks, so linked files and directories are taken too.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk_dir(&path, files, visited, errors),
            Ok(meta) if meta.is_file() && wanted => files.push(path),
            Ok(_) => {}
            // A dangling link that looks like a manifest is probably a mistake worth reporting.
            Err(e) if wanted => errors.push(ManifestError::file(
                path.display().to_string(),
                None,
                io_message(&e),
            )),
            Err(_) => {}
        }
    }
}

fn load_file(path: &Path, docs: &mut Vec<SourceDoc>, errors: &mut Vec<ManifestError>) {
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => parse_bytes(&name, &bytes, docs, errors),
        Err(e) => errors.push(ManifestError::file(name, None, io_message(&e))),
    }
}

fn parse_bytes(
    name: &str,
    bytes: &[u8],
    docs: &mut Vec<SourceDoc>,
    errors: &mut Vec<ManifestError>,
) {
    match std::str::from_utf8(bytes) {
        Ok(text) => match parse_str(name, text) {
            Ok(mut parsed) => docs.append(&mut parsed),
            Err(e) => errors.push(e),
        },
        Err(e) => {
            // Point at the bad byte: usually a file saved in Latin-1 with one accented letter.
            let valid = &bytes[..e.valid_up_to()];
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            errors.push(ManifestError::file(
                name,
                Some(Location { line, column }),
                "file is not valid UTF-8",
            ));
        }
    }
}

/// The parent of a path: `a.b[2]` -> `a.b` -> `a` -> `` -> none.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    Some(match path.rfind(['.', '[']) {
        Some(i) => &path[..i],
        None => "",
    })
}

fn join_key(parent: &str, key: &str) -> FieldPath {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn join_index(parent: &str, index: usize) -> FieldPath {
    format!("{parent}[{index}]")
}

/// Converts serde_path_to_error's path to ours. For an unknown field (or a variant given as a map
/// key) serde reports the enclosing mapping; the key itself is what the user has to fix.
fn error_path(value: &Value, path: &serde_path_to_error::Path, message: &str) -> FieldPath {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let mut node = Some(value);
    for segment in path {
        match segment {
            Segment::Seq { index } => {
                out = join_index(&out, *index);
                node = node.and_then(|n| n.get(index));
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                out = join_key(&out, key);
                node = node.and_then(|n| n.get(key));
            }
            // Beyond this point serde buffered the input (untagged or flattened types) and lost
            // track; the known prefix still gives a useful location.
            Segment::Unknown => return out,
        }
    }
    let named = ["unknown field `", "unknown variant `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    if let (Some(name), Some(Value::Object(map))) = (named, node) {
        if map.contains_key(name) {
            out = join_key(&out, name);
        }
    }
    out
}

/// An anchored value, with what it costs to copy and how deep it reaches, checked at each alias.
struct Anchored {
    value: Value,
    cost: usize,
    height: usize,
}

/// Builds documents from the YAML event stream. Recursion follows the document's nesting, which
/// [`MAX_DEPTH`] bounds.
struct Builder<'a> {
    file: &'a str,
    parser: Parser<std::str::Chars<'a>>,
    /// Columns to add back per line after [`rewrite_surrogate_pairs`]: (line, column in the rewritten
    /// text, 0-based) of each shortened escape.
    shifts: Vec<(usize, usize)>,
    docs: Vec<SourceDoc>,
    anchors: HashMap<usize, Anchored>,
    locations: BTreeMap<FieldPath, Location>,
    expansion: usize,
}

impl<'a> Builder<'a> {
    fn new(file: &'a str, text: &'a str, shifts: Vec<(usize, usize)>) -> Self {
        Builder {
            file,
            parser: Parser::new_from_str(text),
            shifts,
            docs: Vec::new(),
            anchors: HashMap::new(),
            locations: BTreeMap::new(),
            expansion: 0,
        }
    }

    /// yaml-rust2 markers have 1-based lines but 0-based columns.
    fn loc(&self, mark: Marker) -> Location {
        let shift: usize = self
            .shifts
            .iter()
            .filter(|&&(line, col)| line == mark.line() && col < mark.col())
            .count()
            * 2;
        Location {
            line: mark.line(),
            column: mark.col() + shift + 1,
        }
    }

    fn error(&self, location: Location, path: &str, message: impl Into<String>) -> ManifestError {
        ManifestError {
            file: self.file.to_owned(),
            document: self.docs.len(),
            location: Some(location),
            path: path.to_owned(),
            message: message.into(),
        }
    }

    fn scan_error(&self, e: &ScanError) -> ManifestError {
        self.error(
            self.loc(*e.marker()),
            "",
            format!("invalid YAML: {}", e.info()),
        )
    }

    fn next(&mut self) -> Result<(Event, Marker), ManifestError> {
        self.parser.next_token().map_err(|e| self.scan_error(&e))
    }

    fn run(mut self) -> Result<Vec<SourceDoc>, ManifestError> {
        loop {
            let (event, _) = self.next()?;
            match event {
                Event::StreamEnd => return Ok(self.docs),
                Event::DocumentStart => self.document()?,
                // StreamStart, DocumentEnd, and the reserved `Nothing`.
                _ => {}
            }
        }
    }

    fn document(&mut self) -> Result<(), ManifestError> {
        // Anchors are scoped to their document in YAML.
        self.anchors.clear();
        self.locations.clear();
        self.expansion = 0;
        let (event, mark) = self.next()?;
        let value = self.node(event, mark, "", None, true, 0)?;
        let locations = std::mem::take(&mut self.locations);
        let doc_start = locations.get("").copied().unwrap_or_else(|| self.loc(mark));
        match value {
            Value::Null => {}
            Value::Array(items) => self.split(items, "", &locations),
            Value::Object(mut map) if is_list(&map) => {
                if let Some(Value::Array(items)) = map.remove("items") {
                    self.split(items, "items", &locations);
                }
            }
            value => self.docs.push(SourceDoc {
                file: self.file.to_owned(),
                index: self.docs.len(),
                value,
                locations,
                doc_start,
            }),
        }
        Ok(())
    }

    /// One document per list item, with the item's paths made relative to it.
    fn split(&mut self, items: Vec<Value>, list: &str, all: &BTreeMap<FieldPath, Location>) {
        for (i, value) in items.into_iter().enumerate() {
            let prefix = join_index(list, i);
            let mut locations = BTreeMap::new();
            // Every path under the item starts with its prefix, and since the prefix ends in `]`
            // no sibling (`[1]` vs `[10]`) can share it.
            let range = all.range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded));
            for (path, loc) in range.take_while(|(path, _)| path.starts_with(&prefix)) {
                let rest = &path[prefix.len()..];
                locations.insert(rest.strip_prefix('.').unwrap_or(rest).to_owned(), *loc);
            }
            let doc_start = locations
                .get("")
                .copied()
                .unwrap_or(Location { line: 1, column: 1 });
            self.docs.push(SourceDoc {
                file: self.file.to_owned(),
                index: self.docs.len(),
                value,
                locations,
                doc_start,
            });
        }
    }

    /// Records where `path` is, keeping the first claim: two different nodes can print as the same
    /// path only through keys containing dots, and then either location is as good.
    fn record(&mut self, path: &str, location: Location) {
        self.locations.entry(path.to_owned()).or_insert(location);
    }

    fn anchor(&mut self, id: usize, value: &Value) {
        if id != 0 {
            self.anchors.insert(
                id,
                Anchored {
                    value: value.clone(),
                    cost: cost(value),
                    height: height(value),
                },
            );
        }
    }

    /// Builds the node that starts with `event`. `key_loc` is the location of the key when the node
    /// is a mapping value; `record` is false for keys and merge sources, whose paths are not fields.
    fn node(
        &mut self,
        event: Event,
        mark: Marker,
        path: &str,
        key_loc: Option<Location>,
        record: bool,
        depth: usize,
    ) -> Result<Value, ManifestError> {
        let here = self.loc(mark);
        // Errors about a mapping's value point at its key, like `location_of` does, so a type
        // error and a semantic error about the same field show the same position.
        let at = key_loc.unwrap_or(here);
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                if record {
                    self.record(path, at);
                }
                let value = resolve_scalar(&text, style, tag.as_ref())
                    .map_err(|m| self.error(at, path, m))?;
                self.anchor(anchor, &value);
                Ok(value)
            }
            Event::Alias(id) => {
                if record {
                    self.record(path, at);
                }
                let Some(anchored) = self.anchors.get(&id) else {
                    return Err(self.error(
                        at,
                        path,
                        "alias refers to an anchor that is not defined before it in this document \
                         (or to a node that contains the alias)",
                    ));
                };
                if depth + anchored.height > MAX_DEPTH {
                    return Err(self.error(
                        at,
                        path,
                        format!("nesting deeper than {MAX_DEPTH} levels (through an alias)"),
                    ));
                }
                self.expansion += anchored.cost;
                if self.expansion > MAX_ALIAS_EXPANSION {
                    return Err(self.error(
                        at,
                        path,
                        "aliases expand to too much data (an alias bomb?)",
                    ));
                }
                Ok(anchored.value.clone())
            }
            Event::SequenceStart(anchor, tag) => {
                self.check_depth(depth, at, path)?;
                self.check_collection_tag(tag.as_ref(), "seq", at, path)?;
                let start = self.collection_start(here)?;
                if record {
                    self.record(path, key_loc.unwrap_or(start));
                }
                let mut items = Vec::new();
                loop {
                    let (event, mark) = self.next()?;
                    if event == Event::SequenceEnd {
                        break;
                    }
                    let item_path = join_index(path, items.len());
                    items.push(self.node(event, mark, &item_path, None, record, depth + 1)?);
                }
                let value = Value::Array(items);
                self.anchor(anchor, &value);
                Ok(value)
            }
            Event::MappingStart(anchor, tag) => {
                self.check_depth(depth, at, path)?;
                self.check_collection_tag(tag.as_ref(), "map", at, path)?;
                let start = self.collection_start(here)?;
                if record {
                    self.record(path, key_loc.unwrap_or(start));
                }
                let value = Value::Object(self.mapping(path, record, depth)?);
                self.anchor(anchor, &value);
                Ok(value)
            }
            _ => Err(self.error(here, path, "invalid YAML: unexpected event")),
        }
    }

    /// The body of a mapping, after its `MappingStart`.
    fn mapping(
        &mut self,
        path: &str,
        record: bool,
        depth: usize,
    ) -> Result<Map<String, Value>, ManifestError> {
        let mut map = Map::new();
        let mut merge: Option<(Value, Location)> = None;
        loop {
            let (event, mark) = self.next()?;
            if event == Event::MappingEnd {
                break;
            }
            let key_loc = self.loc(mark);
            let (key, is_merge) = self.key(event, key_loc, path)?;
            let child = join_key(path, &key);
            if is_merge {
                if merge.is_some() {
                    return Err(self.error(key_loc, &child, "duplicate key `<<`"));
                }
                let (event, mark) = self.next()?;
                let source = self.node(event, mark, path, Some(key_loc), false, depth + 1)?;
                merge = Some((source, key_loc));
                continue;
            }
            if map.contains_key(&key) {
                return Err(self.error(key_loc, &child, format!("duplicate key `{key}`")));
            }
            let (event, mark) = self.next()?;
            let value = self.node(event, mark, &child, Some(key_loc), record, depth + 1)?;
            map.insert(key, value);
        }
        if let Some((source, at)) = merge {
            let sources = match source {
                Value::Object(m) => vec![m],
                Value::Array(items) => items
                    .into_iter()
                    .map(|item| match item {
                        Value::Object(m) => Some(m),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if sources.is_empty() {
                return Err(self.error(
                    at,
                    path,
                    "merge key `<<` needs a mapping or a sequence of mappings",
                ));
            }
            // Explicit keys were inserted first, and earlier sources are visited first, so the
            // first writer wins as the merge-key spec requires.
            for source in sources {
                for (key, value) in source {
                    if !map.contains_key(&key) {
                        if record {
                            self.record(&join_key(path, &key), at);
                        }
                        map.insert(key, value);
                    }
                }
            }
        }
        Ok(map)
    }

    /// A mapping key: a string, or the merge key `<<` (plain, untagged).
    fn key(
        &mut self,
        event: Event,
        at: Location,
        parent: &str,
    ) -> Result<(String, bool), ManifestError> {
        let value = match event {
            Event::Scalar(text, style, anchor, tag) => {
                if text == "<<" && style == TScalarStyle::Plain && tag.is_none() {
                    return Ok((text, true));
                }
                let value = resolve_scalar(&text, style, tag.as_ref())
                    .map_err(|m| self.error(at, parent, m))?;
                self.anchor(anchor, &value);
                match value {
                    Value::String(s) => return Ok((s, false)),
                    _ => {
                        return Err(self.error(
                            at,
                            parent,
                            format!(
                                "mapping key must be a string, found {} `{text}`; quote it to use it as a key",
                                kind_name(&value)
                            ),
                        ))
                    }
                }
            }
            Event::Alias(id) => {
                match self.anchors.get(&id) {
                    Some(anchored) => anchored.value.clone(),
                    None => return Err(self.error(
                        at,
                        parent,
                        "alias refers to an anchor that is not defined before it in this document",
                    )),
                }
            }
            Event::SequenceStart(..) => Value::Array(Vec::new()),
            Event::MappingStart(..) => Value::Object(Map::new()),
            _ => return Err(self.error(at, parent, "invalid YAML: unexpected event")),
        };
        match value {
            Value::String(s) => Ok((s, false)),
            other => Err(self.error(
                at,
                parent,
                format!("mapping key must be a string, found {}", kind_name(&other)),
            )),
        }
    }

    fn check_depth(&self, depth: usize, at: Location, path: &str) -> Result<(), ManifestError> {
        if depth >= MAX_DEPTH {
            return Err(self.error(at, path, format!("nesting deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn check_collection_tag(
        &self,
        tag: Option<&Tag>,
        expected: &str,
        at: Location,
        path: &str,
    ) -> Result<(), ManifestError> {
        match tag {
            None => Ok(()),
            // The non-specific `!` only means "not a plain scalar", which a collection isn't anyway.
            Some(tag) if matches!(core_tag(tag), Some(t) if t == expected || t == "!") => Ok(()),
            Some(tag) => Err(self.error(at, path, unsupported_tag(tag, expected))),
        }
    }

    /// Where a collection really starts. yaml-rust2 marks a block mapping's start after its first
    /// key, so the first child's position is taken when it comes earlier.
    fn collection_start(&mut self, start: Location) -> Result<Location, ManifestError> {
        let first = self
            .parser
            .peek()
            .map(|(_, mark)| *mark)
            .map_err(|e| e.clone());
        match first {
            Ok(first) => Ok(start.min(self.loc(first))),
            Err(e) => Err(self.scan_error(&e)),
        }
    }
}

fn is_list(map: &Map<String, Value>) -> bool {
    matches!(map.get("items"), Some(Value::Array(_)))
        && map.iter().all(|(key, value)| match key.as_str() {
            "items" | "apiVersion" | "metadata" => true,
            "kind" => value.as_str().is_some_and(|k| k.ends_with("List")),
            _ => false,
        })
}

/// What copying a value costs against [`MAX_ALIAS_EXPANSION`].
fn cost(value: &Value) -> usize {
    64 + match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(cost).sum(),
        Value::Object(map) => map.iter().map(|(k, v)| k.len() + cost(v)).sum(),
        _ => 0,
    }
}

/// Collection levels in a value (a scalar has none).
fn height(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(height).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(height).max().unwrap_or(0),
        _ => 0,
    }
}

fn kind_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "a sequence",
        Value::Object(_) => "a mapping",
    }
}

/// The core-schema name of a `tag:yaml.org,2002:` tag (`!!str` -> `str`), `!` for the non-specific
/// tag, `None` for anything else.
fn core_tag(tag: &Tag) -> Option<&str> {
    if tag.handle.is_empty() && tag.suffix == "!" {
        return Some("!");
    }
    let full = format!("{}{}", tag.handle, tag.suffix);
    let name = full.strip_prefix("tag:yaml.org,2002:")?;
    ["str", "int", "float", "bool", "null", "map", "seq"]
        .into_iter()
        .find(|n| *n == name)
}

fn tag_display(tag: &Tag) -> String {
    let full = format!("{}{}", tag.handle, tag.suffix);
    if let Some(name) = full.strip_prefix("tag:yaml.org,2002:") {
        format!("!!{name}")
    } else if full.starts_with('!') {
        full
    } else {
        format!("!<{full}>")
    }
}

fn unsupported_tag(tag: &Tag, node: &str) -> String {
    let shown = tag_display(tag);
    match core_tag(tag) {
        Some(_) => format!("tag `{shown}` cannot be used on a {}", node_name(node)),
        None => format!(
            "unsupported tag `{shown}` (supported: !!str, !!int, !!float, !!bool, !!null, !!map, !!seq)"
        ),
    }
}

fn node_name(node: &str) -> &'static str {
    match node {
        "map" => "mapping",
        "seq" => "sequence",
        _ => "scalar",
    }
}

/// Resolves a scalar to JSON. Errors never quote the scalar: it may be a secret.
fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    let Some(tag) = tag else {
        if style != TScalarStyle::Plain {
            return Ok(Value::String(text.to_owned()));
        }
        if is_null(text) {
            return Ok(Value::Null);
        }
        if let Some(b) = parse_bool(text) {
            return Ok(Value::Bool(b));
        }
        if let Some(n) = parse_int(text) {
            return n.map(Value::Number);
        }
        if let Some(f) = parse_float(text) {
            return f.map(Value::Number);
        }
        return Ok(Value::String(text.to_owned()));
    };
    let mismatch = || format!("value is not a valid `{}`", tag_display(tag));
    match core_tag(tag) {
        Some("str" | "!") => Ok(Value::String(text.to_owned())),
        Some("null") if is_null(text) => Ok(Value::Null),
        Some("bool") => parse_bool(text).map(Value::Bool).ok_or_else(mismatch),
        Some("int") => parse_int(text).ok_or_else(mismatch)?.map(Value::Number),
        Some("float") => match parse_int(text) {
            // `!!float 1` is the float 1.0, not the integer 1.
            Some(Ok(n)) => finite(n.as_f64().unwrap_or(f64::NAN)).map(Value::Number),
            _ => parse_float(text).ok_or_else(mismatch)?.map(Value::Number),
        },
        Some("null") => Err(mismatch()),
        _ => Err(unsupported_tag(tag, "scalar")),
    }
}

fn is_null(text: &str) -> bool {
    matches!(text, "" | "~" | "null" | "Null" | "NULL")
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// `None` when `text` is not an integer in the core schema; `Some(Err)` when it is one JSON can't
/// hold or one whose meaning depends on the YAML version.
fn parse_int(text: &str) -> Option<Result<Number, String>> {
    let out_of_range =
        || "integer does not fit in 64 bits; quote it to make it a string".to_owned();
    let radix = |digits: &str, radix: u32| {
        (!digits.is_empty() && digits.chars().all(|c| c.is_digit(radix))).then(|| {
            u64::from_str_radix(digits, radix)
                .map(Number::from)
                .map_err(|_| out_of_range())
        })
    };
    if let Some(hex) = text.strip_prefix("0x") {
        return radix(hex, 16);
    }
    if let Some(oct) = text.strip_prefix("0o") {
        return radix(oct, 8);
    }
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if digits.len() > 1 && digits.starts_with('0') {
        // The core schema reads `0755` as 755, YAML 1.1 (and so Compose files) as octal 493. A file
        // mode or zip code silently changing value is worse than asking the user to say which.
        return Some(Err(
            "integer with a leading zero is ambiguous (octal in YAML 1.1, decimal in \
             YAML 1.2): write `0o` before octal digits, drop the zeros for decimal, or quote it \
             for a string"
                .to_owned(),
        ));
    }
    Some(if negative {
        text.parse::<i64>()
            .map(Number::from)
            .map_err(|_| out_of_range())
    } else {
        digits
            .parse::<u64>()
            .map(Number::from)
            .map_err(|_| out_of_range())
    })
}

/// `None` when `text` is not a float in the core schema; `Some(Err)` for the ones JSON can't hold.
fn parse_float(text: &str) -> Option<Result<Number, String>> {
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if matches!(unsigned, ".inf" | ".Inf" | ".INF") || matches!(text, ".nan" | ".NaN" | ".NAN") {
        return Some(finite(f64::NAN));
    }
    // [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e.strip_prefix(['-', '+']).unwrap_or(e))),
        None => (unsigned, None),
    };
    let mantissa_ok = match mantissa.split_once('.') {
        Some((whole, fraction)) => {
            digits(whole) && digits(fraction) && !(whole.is_empty() && fraction.is_empty())
        }
        None => !mantissa.is_empty() && digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| !e.is_empty() && digits(e));
    if !(mantissa_ok && exponent_ok) {
        return None;
    }
    // Rust's float grammar accepts exactly this language (`1.`, `.5`, `+1e3`), and overflow
    // gives infinity, which `finite` rejects.
    Some(
        text.parse::<f64>()
            .map_err(|e| e.to_string())
            .and_then(finite),
    )
}

fn finite(f: f64) -> Result<Number, String> {
    Number::from_f64(f).ok_or_else(|| {
        "number is infinite or NaN, which JSON cannot represent; quote it to make it a string"
            .to_owned()
    })
}

/// Replaces JSON surrogate-pair escapes (`\ud83d\ude00`) with YAML's `\U0001f600`. Returns the new
/// text and, per replacement, its line (1-based) and column (0-based) in the new text, since each
/// replacement is two characters shorter. Only runs after the YAML parser rejected the escape, so
/// scanning without tracking quotes is acceptable.
fn rewrite_surrogate_pairs(text: &str) -> Option<(String, Vec<(usize, usize)>)> {
    fn hex4(s: &str) -> Option<u32> {
        let h = s.get(..4)?;
        if h.bytes().all(|b| b.is_ascii_hexdigit()) {
            u32::from_str_radix(h, 16).ok()
        } else {
            None
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut shifts = Vec::new();
    let (mut line, mut col) = (1, 0);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if c == '\\' {
            let pair = rest
                .strip_prefix("\\u")
                .and_then(|r| Some((hex4(r)?, r.get(4..)?)))
                .filter(|(high, _)| (0xD800..0xDC00).contains(high))
                .and_then(|(high, r)| {
                    let r = r.strip_prefix("\\u")?;
                    let low = hex4(r).filter(|low| (0xDC00..0xE000).contains(low))?;
                    Some((0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00), &r[4..]))
                });
            if let Some((code, r)) = pair {
                shifts.push((line, col));
                let escape = format!("\\U{code:08x}");
                col += escape.len();
                out.push_str(&escape);
                rest = r;
                continue;
            }
            // Copy an escape pair as a unit so `\\u...` (an escaped backslash) is left alone.
            out.push('\\');
            col += 1;
            rest = &rest[1..];
            if let Some(next) = rest.chars().next() {
                if next == '\n' {
                    line += 1;
                    col = 0;
                } else {
                    col += 1;
                }
                out.push(next);
                rest = &rest[next.len_utf8()..];
            }
            continue;
        }
        if c == '\n' {
            line += 1;
            col = 0;
        } else {
            col += 1;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    (!shifts.is_empty()).then_some((out, shifts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Thing {
        kind: String,
        spec: Spec,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Spec {
        replicas: u32,
        image: String,
        #[serde(default)]
        env: Vec<EnvVar>,
        #[serde(default)]
        restart_policy: Option<Policy>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct EnvVar {
        name: String,
        value: String,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "camelCase")]
    enum Policy {
        Always,
        OnFailure,
    }

    fn loc(line: usize, column: usize) -> Location {
        Location { line, column }
    }

    fn parse(text: &str) -> Vec<SourceDoc> {
        parse_str("t.yaml", text).unwrap()
    }

    fn parse_err(text: &str) -> String {
        parse_str("t.yaml", text).unwrap_err().to_string()
    }

    fn deser_err(text: &str) -> String {
        let docs = parse(text);
        docs.last()
            .unwrap()
            .deserialize::<Thing>()
            .unwrap_err()
            .to_string()
    }

    const TWO_DOCS: &str = "\
# leading comment
---
kind: Service
spec:
  replicas: 2
  image: nginx
  env:
    - name: A
      value: \"1\"
    - name: B
      value: '2'
---
kind: Service
spec:
  image: redis
  replicas: 1
  volumes: []
";

    #[test]
    fn multi_document_values_and_locations() {
        let docs = parse(TWO_DOCS);
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].index, docs[1].index), (0, 1));
        assert_eq!(docs[0].file, "t.yaml");
        let thing: Thing = docs[0].deserialize().unwrap();
        assert_eq!(thing.spec.env[1].value, "2");
        assert_eq!(thing.spec.replicas, 2);

        let d = &docs[0];
        assert_eq!(d.doc_start(), loc(3, 1));
        assert_eq!(d.location_of(""), loc(3, 1));
        assert_eq!(d.location_of("kind"), loc(3, 1));
        assert_eq!(d.location_of("spec"), loc(4, 1));
        assert_eq!(d.location_of("spec.replicas"), loc(5, 3));
        assert_eq!(d.location_of("spec.env"), loc(7, 3));
        // A sequence item is located at its content, just after the dash.
        assert_eq!(d.location_of("spec.env[0]"), loc(8, 7));
        assert_eq!(d.location_of("spec.env[0].name"), loc(8, 7));
        assert_eq!(d.location_of("spec.env[0].value"), loc(9, 7));
        assert_eq!(d.location_of("spec.env[1]"), loc(10, 7));
        assert_eq!(d.location_of("spec.env[1].value"), loc(11, 7));
        assert_eq!(docs[1].doc_start(), loc(13, 1));
        assert_eq!(docs[1].location_of("spec.volumes"), loc(17, 3));
    }

    #[test]
    fn location_falls_back_to_nearest_ancestor() {
        let d = &parse(TWO_DOCS)[0];
        assert_eq!(d.location_of("spec.env[1].nope"), loc(10, 7));
        assert_eq!(d.location_of("spec.env[7].name"), loc(7, 3));
        assert_eq!(d.location_of("spec.missing.deeper[0]"), loc(4, 1));
        assert_eq!(d.location_of("nothing"), loc(3, 1));
        let e = ManifestError::at(d, "spec.env[1].value", "must not be `2`");
        assert_eq!(
            e.to_string(),
            "t.yaml:11:7: spec.env[1].value: must not be `2`"
        );
        assert_eq!(e.document, 0);
        let e = ManifestError::at(&parse(TWO_DOCS)[1], "", "bad document");
        assert_eq!(e.to_string(), "t.yaml:13:1: document 2: bad document");
    }

    #[test]
    fn unknown_field_in_second_document() {
        let docs = parse(TWO_DOCS);
        let e = docs[1].deserialize::<Thing>().unwrap_err();
        assert_eq!(e.path, "spec.volumes");
        assert_eq!(e.location, Some(loc(17, 3)));
        assert_eq!(e.document, 1);
        assert_eq!(
            e.to_string(),
            "t.yaml:17:3: document 2: spec.volumes: unknown field `volumes`, \
             expected one of `replicas`, `image`, `env`, `restartPolicy`"
        );
        let e = deser_err(
            "kind: S\nspec:\n  replicas: 1\n  image: x\n  env:\n  - name: A\n    value: b\n  - name: B\n    valeu: c\n",
        );
        assert_eq!(
            e,
            "t.yaml:9:5: spec.env[1].valeu: unknown field `valeu`, expected `name` or `value`"
        );
    }

    #[test]
    fn wrong_type() {
        let e = deser_err("kind: S\nspec:\n  image: x\n  replicas: three\n");
        assert_eq!(
            e,
            "t.yaml:4:3: spec.replicas: invalid type: string \"three\", expected u32"
        );
        let e = deser_err("kind: S\nspec:\n  image: x\n  replicas: 1\n  env: {name: A}\n");
        assert_eq!(
            e,
            "t.yaml:5:3: spec.env: invalid type: map, expected a sequence"
        );
        // Quoted numbers are strings.
        let e = deser_err("kind: S\nspec:\n  image: x\n  replicas: \"3\"\n");
        assert_eq!(
            e,
            "t.yaml:4:3: spec.replicas: invalid type: string \"3\", expected u32"
        );
        let e =
            deser_err("kind: S\nspec:\n  image: x\n  replicas: 1\n  restartPolicy: sometimes\n");
        assert_eq!(
            e,
            "t.yaml:5:3: spec.restartPolicy: unknown variant `sometimes`, expected `always` or `onFailure`"
        );
        let e = deser_err("just a string\n");
        assert_eq!(
            e,
            "t.yaml:1:1: invalid type: string \"just a string\", expected struct Thing"
        );
    }

    #[test]
    fn missing_required_field() {
        let e = deser_err("---\nkind: S\n\nspec:\n  replicas: 1\n");
        assert_eq!(e, "t.yaml:4:1: spec: missing field `image`");
        let e = deser_err("spec: {replicas: 1, image: x}\n");
        assert_eq!(e, "t.yaml:1:1: missing field `kind`");
    }

    #[test]
    fn duplicate_keys() {
        assert_eq!(
            parse_err("kind: a\nspec:\n  image: x\n  image: y\n"),
            "t.yaml:4:3: spec.image: duplicate key `image`"
        );
        assert_eq!(
            parse_err("a: 1\n---\nb: 1\nc: {d: 1, \"d\": 2}\n"),
            "t.yaml:4:11: document 2: c.d: duplicate key `d`"
        );
    }

    #[test]
    fn aliases_copy_values_and_merge_keys_merge() {
        let text = "\
defaults: &defaults
  image: nginx
  replicas: 2
env: &env [{name: A, value: b}]
first:
  <<: *defaults
  replicas: 5
  env: *env
second:
  <<: [{image: own}, *defaults]
";
        let d = &parse(text)[0];
        assert_eq!(
            d.value["first"],
            json!({"image": "nginx", "replicas": 5, "env": [{"name": "A", "value": "b"}]})
        );
        assert_eq!(d.value["second"], json!({"image": "own", "replicas": 2}));
        // Inside aliased content paths resolve to the alias, merged keys to the `<<` key.
        assert_eq!(d.location_of("first.env"), loc(8, 3));
        assert_eq!(d.location_of("first.env[0].name"), loc(8, 3));
        assert_eq!(d.location_of("first.image"), loc(6, 3));
        assert_eq!(d.location_of("first.replicas"), loc(7, 3));

        assert_eq!(
            parse_err("a: *nope\n"),
            "t.yaml:1:4: invalid YAML: while parsing node, found unknown anchor"
        );
        // Anchors do not cross documents.
        assert_eq!(
            parse_err("a: &x 1\n---\nb: *x\n"),
            "t.yaml:3:1: document 2: b: alias refers to an anchor that is not defined before it in \
             this document (or to a node that contains the alias)"
        );
        assert_eq!(
            parse_err("a: &x [1, *x]\n"),
            "t.yaml:1:11: a[1]: alias refers to an anchor that is not defined before it in this \
             document (or to a node that contains the alias)"
        );
        assert_eq!(
            parse_err("a:\n  <<: 3\n"),
            "t.yaml:2:3: a: merge key `<<` needs a mapping or a sequence of mappings"
        );
        // A quoted `<<` is an ordinary key.
        assert_eq!(parse("'<<': 1\n")[0].value, json!({"<<": 1}));
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_rejected() {
        let mut text = String::from("a0: &a0 [\"lol lol lol lol lol lol lol lol\"]\n");
        for i in 1..12 {
            let prev = format!("*a{}", i - 1);
            text.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        let e = parse_str("bomb.yaml", &text).unwrap_err();
        assert!(e.message.contains("aliases expand to too much data"), "{e}");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(
            parse_err(&deep),
            "t.yaml:1:129[128]: nesting deeper than 128 levels"
                .replace("[128]", &format!(": {}", "[0]".repeat(128)))
        );
        // The root mapping is the first of the 128 levels allowed.
        let ok = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert_eq!(parse(&format!("a: {ok}\n")).len(), 1);
        // Depth gained through an alias counts too.
        let half = format!("{}{}", "[".repeat(100), "]".repeat(100));
        let e = parse_err(&format!(
            "a: &x {half}\nb: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[*x]]]]]]]]]]]]]]]]]]]]]]]]]]]]]\n"
        ));
        assert!(
            e.contains("nesting deeper than 128 levels (through an alias)"),
            "{e}"
        );
    }

    #[test]
    fn json_gets_locations_too() {
        let text = "{\n  \"kind\": \"S\",\n  \"spec\": {\n    \"image\": \"x\",\n    \"replicas\": \"2\",\n    \"env\": [{\"name\": \"A\", \"value\": \"1\"}]\n  }\n}\n";
        let docs = parse_str("t.json", text).unwrap();
        assert_eq!(docs.len(), 1);
        let d = &docs[0];
        assert_eq!(d.location_of(""), loc(1, 1));
        assert_eq!(d.location_of("spec"), loc(3, 3));
        assert_eq!(d.location_of("spec.env[0]"), loc(6, 13));
        assert_eq!(d.location_of("spec.env[0].value"), loc(6, 27));
        assert_eq!(
            d.deserialize::<Thing>().unwrap_err().to_string(),
            "t.json:5:5: spec.replicas: invalid type: string \"2\", expected u32"
        );
        // Minified, tab-indented and CRLF JSON parse the same way.
        let min = parse_str("m.json", "{\"a\":{\"b\":[1,2.5,true,null,\"x\"]}}").unwrap();
        assert_eq!(min[0].value, json!({"a": {"b": [1, 2.5, true, null, "x"]}}));
        assert_eq!(min[0].location_of("a.b[4]"), loc(1, 28));
        let tabs = parse_str("t.json", "{\r\n\t\"a\": {\r\n\t\t\"b\": 1\r\n\t}\r\n}\r\n").unwrap();
        assert_eq!(tabs[0].location_of("a.b"), loc(3, 3));
        assert_eq!(
            parse_str("bad.json", "{\"a\": 1\n \"b\": 2}\n")
                .unwrap_err()
                .to_string(),
            "bad.json:2:5: invalid YAML: while parsing a flow mapping, did not find expected ',' or '}'"
        );
    }

    #[test]
    fn json_surrogate_pair_escapes() {
        let text = "{\"a\": \"\\ud83d\\ude00 \\u00e9\", \"b\": \"\\ud83d\\ude00\", \"c\": 1}";
        let d = &parse_str("p.json", text).unwrap()[0];
        assert_eq!(
            d.value,
            json!({"a": "\u{1f600} \u{e9}", "b": "\u{1f600}", "c": 1})
        );
        // Columns are those of the original text, not of the rewritten one.
        assert_eq!(d.location_of("b"), loc(1, 30));
        assert_eq!(d.location_of("c"), loc(1, 51));
        // An escaped backslash is not an escape.
        let d = &parse("a: \"\\\\ud83d\\ud83d\\ude00\"\n")[0];
        assert_eq!(d.value, json!({"a": "\\ud83d\u{1f600}"}));
        // A lone surrogate is still an error.
        assert_eq!(
            parse_err("a: \"\\ud83d\"\n"),
            "t.yaml:1:4: invalid YAML: while parsing a quoted scalar, found invalid Unicode character escape code"
        );
    }

    #[test]
    fn lists_are_split_into_documents() {
        let text = "[\n  {\"kind\": \"A\"},\n  {\"kind\": \"B\",\n   \"spec\": {\"x\": 1}}\n]\n";
        let docs = parse_str("l.json", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].value, json!({"kind": "A"}));
        assert_eq!((docs[0].index, docs[1].index), (0, 1));
        assert_eq!(docs[0].doc_start(), loc(2, 3));
        assert_eq!(docs[1].doc_start(), loc(3, 3));
        assert_eq!(docs[1].location_of("kind"), loc(3, 4));
        assert_eq!(docs[1].location_of("spec.x"), loc(4, 13));
        let e = ManifestError::at(&docs[1], "spec.x", "bad");
        assert_eq!(e.to_string(), "l.json:4:13: document 2: spec.x: bad");

        let text = "{\n  \"apiVersion\": \"v1\",\n  \"kind\": \"List\",\n  \"metadata\": {},\n  \"items\": [\n    {\"kind\": \"A\"},\n    {\"kind\": \"B\", \"spec\": {\"replicas\": 1}}\n  ]\n}\n";
        let docs = parse_str("k.json", text).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].value, json!({"kind": "B", "spec": {"replicas": 1}}));
        assert_eq!(docs[1].location_of(""), loc(7, 5));
        assert_eq!(docs[1].location_of("spec.replicas"), loc(7, 28));
        assert!(docs[1].location_of("items").line == 7);
        let e = docs[1].deserialize::<Thing>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "k.json:7:19: document 2: spec: missing field `image`"
        );

        // YAML lists split the same way, after other documents, counting on.
        let docs = parse("kind: X\n---\nkind: ServiceList\nitems:\n- kind: A\n- kind: B\n");
        let kinds: Vec<_> = docs
            .iter()
            .map(|d| (d.index, d.value["kind"].clone()))
            .collect();
        assert_eq!(kinds, [(0, json!("X")), (1, json!("A")), (2, json!("B"))]);
        assert_eq!(docs[2].doc_start(), loc(6, 3));

        // An object that merely has an `items` field is not a list.
        let docs = parse("kind: Config\nitems: [1]\n");
        assert_eq!(docs.len(), 1);
        assert_eq!(parse("{\"items\": []}").len(), 0);
    }

    #[test]
    fn empty_documents_are_skipped() {
        assert!(parse("").is_empty());
        assert!(parse("# nothing here\n").is_empty());
        assert!(parse("---\n---\n# only a comment\n---\n...\n").is_empty());
        let docs = parse("---\n# c\n---\na: 1\n---\n~\n---\n\n---\nb: 2\n---\n");
        assert_eq!(docs.len(), 2);
        assert_eq!((docs[0].index, docs[1].index), (0, 1));
        assert_eq!(docs[1].value, json!({"b": 2}));
        assert_eq!(docs[1].doc_start(), loc(10, 1));
        assert_eq!(
            ManifestError::at(&docs[1], "b", "x").to_string(),
            "t.yaml:10:1: document 2: b: x"
        );
    }

    #[test]
    fn syntax_errors_carry_the_parser_location() {
        assert_eq!(
            parse_err("kind: a\nspec:\n  image: x\n replicas: 1\n"),
            "t.yaml:4:10: invalid YAML: while parsing a block mapping, did not find expected key"
        );
        assert_eq!(
            parse_err("a: 1\n---\nb: [1, 2\n"),
            "t.yaml:4:1: document 2: invalid YAML: while parsing a flow sequence, expected ',' or ']'"
        );
        assert_eq!(
            parse_err("a:\tb\n"),
            "t.yaml:1:4: invalid YAML: ':' must be followed by a valid YAML whitespace"
        );
    }

    #[test]
    fn keys_must_be_strings() {
        assert_eq!(
            parse_err("ports:\n  1: a\n"),
            "t.yaml:2:3: ports: mapping key must be a string, found number `1`; quote it to use it as a key"
        );
        assert_eq!(
            parse_err("a: 1\n? [a]\n: 1\n"),
            "t.yaml:2:3: mapping key must be a string, found a sequence"
        );
        assert_eq!(
            parse_err("{a: 1, {b: 1}: 2}"),
            "t.yaml:1:8: mapping key must be a string, found a mapping"
        );
        assert_eq!(
            parse_err("true: 1\n"),
            "t.yaml:1:1: mapping key must be a string, found boolean `true`; quote it to use it as a key"
        );
        assert_eq!(
            parse_err(": 1\n"),
            "t.yaml:1:1: mapping key must be a string, found null ``; quote it to use it as a key"
        );
        assert_eq!(
            parse("\"1\": a\n!!str 2: b\n")[0].value,
            json!({"1": "a", "2": "b"})
        );
    }

    #[test]
    fn keys_with_dots_are_found_by_exact_path() {
        let d = &parse("metadata:\n  labels:\n    com.example.tier: web\n    app: x\n")[0];
        assert_eq!(d.location_of("metadata.labels.com.example.tier"), loc(3, 5));
        assert_eq!(d.location_of("metadata.labels.app"), loc(4, 5));
    }

    #[test]
    fn plain_scalars_follow_the_core_schema() {
        let cases = [
            ("~", json!(null)),
            ("null", json!(null)),
            ("Null", json!(null)),
            ("NULL", json!(null)),
            ("", json!(null)),
            ("''", json!("")),
            ("true", json!(true)),
            ("True", json!(true)),
            ("FALSE", json!(false)),
            ("yes", json!("yes")),
            ("on", json!("on")),
            ("0", json!(0)),
            ("-0", json!(0)),
            ("-12", json!(-12)),
            ("+7", json!(7)),
            ("0x1F", json!(31)),
            ("0o17", json!(15)),
            ("0o8", json!("0o8")),
            ("0x", json!("0x")),
            ("1_000", json!("1_000")),
            ("18446744073709551615", json!(18446744073709551615u64)),
            ("-9223372036854775808", json!(-9223372036854775808i64)),
            ("1.5", json!(1.5)),
            ("-2.5e3", json!(-2500.0)),
            (".5", json!(0.5)),
            ("1.", json!(1.0)),
            ("1e3", json!(1000.0)),
            ("+1E-2", json!(0.01)),
            ("0.5", json!(0.5)),
            ("0e0", json!(0.0)),
            ("1.2.3", json!("1.2.3")),
            ("1e", json!("1e")),
            (".", json!(".")),
            ("inf", json!("inf")),
            ("\"true\"", json!("true")),
            ("'null'", json!("null")),
            ("\"12\"", json!("12")),
            ("x y", json!("x y")),
        ];
        for (text, expected) in cases {
            let value = &parse(&format!("v: {text}\n"))[0].value["v"];
            assert_eq!(value, &expected, "{text}");
        }
        assert_eq!(
            parse_err("a:\n  b: .inf\n"),
            "t.yaml:2:3: a.b: number is infinite or NaN, which JSON cannot represent; quote it to make it a string"
        );
        assert_eq!(
            parse_err("- .NaN\n"),
            "t.yaml:1:3: [0]: number is infinite or NaN, which JSON cannot represent; quote it to make it a string"
        );
        assert!(parse_err("a: 1e400\n").contains("infinite or NaN"));
        assert_eq!(
            parse_err("a: 18446744073709551616\n"),
            "t.yaml:1:1: a: integer does not fit in 64 bits; quote it to make it a string"
        );
        assert!(parse_err("a: -9223372036854775809\n").contains("does not fit in 64 bits"));
        assert_eq!(
            parse_err("mode: 0755\n"),
            "t.yaml:1:1: mode: integer with a leading zero is ambiguous (octal in YAML 1.1, decimal \
             in YAML 1.2): write `0o` before octal digits, drop the zeros for decimal, or quote it \
             for a string"
        );
        assert!(parse_err("a: -007\n").contains("leading zero"));
        assert_eq!(
            parse("a: 0o755\nb: '0755'\n")[0].value,
            json!({"a": 493, "b": "0755"})
        );
        // Block scalars are strings.
        assert_eq!(
            parse("a: |\n  12\nb: >-\n  true\n")[0].value,
            json!({"a": "12\n", "b": "true"})
        );
    }

    #[test]
    fn tags() {
        let d = &parse("a: !!str 0755\nb: !!int '12'\nc: !!float 1\nd: !!bool \"true\"\ne: !!null ''\nf: ! 12\ng: !!map {x: 1}\nh: !!seq [1]\ni: !<tag:yaml.org,2002:str> 1\n")[0];
        assert_eq!(
            d.value,
            json!({"a": "0755", "b": 12, "c": 1.0, "d": true, "e": null, "f": "12", "g": {"x": 1}, "h": [1], "i": "1"})
        );
        assert_eq!(
            parse_err("a: !!binary aGVsbG8=\n"),
            "t.yaml:1:1: a: unsupported tag `!!binary` (supported: !!str, !!int, !!float, !!bool, !!null, !!map, !!seq)"
        );
        assert_eq!(
            parse_err("a: !Ref x\n"),
            "t.yaml:1:1: a: unsupported tag `!Ref` (supported: !!str, !!int, !!float, !!bool, !!null, !!map, !!seq)"
        );
        assert_eq!(
            parse_err("a: !!int x\n"),
            "t.yaml:1:1: a: value is not a valid `!!int`"
        );
        assert_eq!(
            parse_err("a: !!bool yes\n"),
            "t.yaml:1:1: a: value is not a valid `!!bool`"
        );
        assert_eq!(
            parse_err("a: !!null 0\n"),
            "t.yaml:1:1: a: value is not a valid `!!null`"
        );
        assert_eq!(
            parse_err("a: !!map [1]\n"),
            "t.yaml:1:1: a: tag `!!map` cannot be used on a sequence"
        );
        assert_eq!(
            parse_err("- !!seq 1\n"),
            "t.yaml:1:9: [0]: tag `!!seq` cannot be used on a scalar"
        );
    }

    #[test]
    fn byte_order_mark_and_crlf() {
        let d = &parse("\u{feff}a: 1\r\nb:\r\n  c: 2\r\n")[0];
        assert_eq!(d.value, json!({"a": 1, "b": {"c": 2}}));
        assert_eq!(d.location_of("a"), loc(1, 1));
        assert_eq!(d.location_of("b.c"), loc(3, 3));
    }

    #[test]
    fn truncated_and_odd_inputs_never_panic() {
        let text = "%YAML 1.2\n---\na: &x {b: [1, \"\\ud83d\\ude00\", !!str 2]}\n\
                    c: *x\nd:\n  <<: *x\n  e: |\n    text\n? f\n: [é, {g: 'h'}]\n...\n\
                    --- [{\"items\": []}, 3]\n";
        for (end, _) in text.char_indices() {
            let _ = parse_str("t.yaml", &text[..end]);
        }
        assert_eq!(parse(text).len(), 3);
    }

    #[test]
    fn display_format() {
        let mut e = ManifestError {
            file: "fixtures/bad.yaml".into(),
            document: 1,
            location: Some(loc(12, 7)),
            path: "spec.replicas".into(),
            message: "invalid type: string \"three\", expected u32".into(),
        };
        assert_eq!(
            e.to_string(),
            "fixtures/bad.yaml:12:7: document 2: spec.replicas: invalid type: string \"three\", expected u32"
        );
        e.document = 0;
        e.location = None;
        e.path.clear();
        assert_eq!(
            e.to_string(),
            "fixtures/bad.yaml: invalid type: string \"three\", expected u32"
        );
    }

    #[test]
    fn debug_does_not_print_values() {
        let d = &parse("password: hunter2\n")[0];
        let shown = format!("{d:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("t.yaml"), "{shown}");
    }

    fn write(dir: &Path, name: &str, content: &[u8]) {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    #[test]
    fn directories_load_in_sorted_order() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "b.yaml", b"name: b1\n---\nname: b2\n");
        write(root, "a.json", b"[{\"name\": \"a1\"}, {\"name\": \"a2\"}]");
        write(root, "c/z.yml", b"name: cz\n");
        write(root, "c/a.YAML", b"name: ca\n");
        write(root, "d.txt", b"name: ignored\n");
        write(root, "README.md", b"# not a manifest: [\n");
        write(root, ".hidden.yaml", b"name: hidden\n");
        write(root, ".git/config.yaml", b"name: hidden dir\n");
        write(root, "e.yaml", b"# nothing yet\n");
        let docs = load_paths(&[root.to_path_buf()]).unwrap();
        let names: Vec<_> = docs
            .iter()
            .map(|d| d.value["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["a1", "a2", "b1", "b2", "ca", "cz"]);
        let shown = |d: &SourceDoc| {
            (
                d.file
                    .strip_prefix(&root.display().to_string())
                    .unwrap()
                    .to_owned(),
                d.index,
            )
        };
        assert_eq!(shown(&docs[1]), ("/a.json".to_owned(), 1));
        assert_eq!(shown(&docs[3]), ("/b.yaml".to_owned(), 1));
        assert_eq!(shown(&docs[4]), ("/c/a.YAML".to_owned(), 0));

        // A file named explicitly is taken whatever its extension.
        let docs = load_paths(&[root.join("d.txt"), root.join("c")]).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0].value["name"], "ignored");
    }

    #[test]
    fn errors_are_collected_across_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "m/1-good.yaml", b"name: ok\n");
        write(root, "m/2-syntax.yaml", b"a: 1\nb: [\n");
        write(root, "m/3-dup.json", b"{\"a\": 1,\n \"a\": 2}");
        write(root, "m/4-latin1.yaml", b"a: 1\nname: caf\xe9\n");
        write(root, "m/5-good.yml", b"name: ok2\n");
        std::fs::create_dir_all(root.join("empty/sub")).unwrap();
        write(root, "empty/notes.txt", b"x");
        let paths = [
            root.join("m"),
            root.join("missing.yaml"),
            root.join("empty"),
        ];
        let errors = load_paths(&paths).unwrap_err();
        let shown: Vec<_> = errors
            .iter()
            .map(|e| e.to_string().replace(&root.display().to_string(), "ROOT"))
            .collect();
        assert_eq!(
            shown,
            [
                "ROOT/m/2-syntax.yaml:3:1: invalid YAML: while parsing a node, did not find expected node content"
                    .to_owned(),
                "ROOT/m/3-dup.json:2:2: a: duplicate key `a`".to_owned(),
                "ROOT/m/4-latin1.yaml:2:10: file is not valid UTF-8".to_owned(),
                "ROOT/missing.yaml: no such file or directory".to_owned(),
                "ROOT/empty: directory contains no *.yaml, *.yml or *.json files".to_owned(),
            ]
        );
    }

    #[test]
    fn stdin_is_read_once() {
        let mut input: &[u8] = b"---\nname: from stdin\n---\nname: two\n";
        let docs = load_with_stdin(&[PathBuf::from("-")], &mut input).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1].file, "<stdin>");
        assert_eq!(docs[1].location_of("name"), loc(4, 1));
        let mut input: &[u8] = b"a: [\n";
        let errors =
            load_with_stdin(&[PathBuf::from("-"), PathBuf::from("-")], &mut input).unwrap_err();
        let shown: Vec<_> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "<stdin>:2:1: invalid YAML: while parsing a node, did not find expected node content",
                "<stdin>: standard input given more than once",
            ]
        );
    }

    #[test]
    fn paths_from_serde_match_ours() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            groups: Vec<Vec<Inner>>,
        }
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            n: u8,
        }
        let d = &parse("groups:\n- - n: 1\n  - n: 300\n")[0];
        let e = d.deserialize::<Outer>().unwrap_err();
        assert_eq!(e.path, "groups[0][1].n");
        assert_eq!(
            e.to_string(),
            "t.yaml:3:5: groups[0][1].n: invalid value: integer `300`, expected u8"
        );
    }
}
