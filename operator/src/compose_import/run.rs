//! The `berth import compose FILE [-o DIR] [--prefix NAME]` command around the pure translation:
//! reads the file, prints warnings and notes on stderr, and writes the manifests either to stdout
//! (one multi-document YAML) or to DIR, one file per object.
//!
//! One file per object rather than per kind: a reviewer sees each service's diff on its own, a
//! service the user does not want is removed by deleting its file (which `berth apply --prune`
//! then deletes from berth too), and the commented Ingress stubs sit in files of their own, named
//! after the service, where they are easy to find and fill in.

use super::{file_name, import, Import, Options};
use crate::cli::CliResult;
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum ImportCommand {
    /// Turn a Compose file (v3 / Compose spec, as for `docker stack deploy`) into berth manifests.
    /// Warnings (on stderr) name every key that is not imported and what to do instead.
    Compose(ComposeArgs),
}

#[derive(clap::Args)]
pub struct ComposeArgs {
    /// The Compose file; env_file and file: sources are read relative to it.
    pub file: PathBuf,
    /// Write one manifest per object into this directory (created if missing; existing files
    /// are never overwritten) instead of one YAML stream on stdout.
    #[arg(short = 'o', long = "output-dir", value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Prefix every created object's name (`--prefix shop`: `shop-web`), as `docker stack deploy`
    /// prefixes with the stack name. Services reach each other by these names.
    #[arg(long)]
    pub prefix: Option<String>,
}

pub fn run(command: ImportCommand) -> CliResult {
    let ImportCommand::Compose(args) = command;
    let shown = args.file.display().to_string();
    let bytes =
        std::fs::read(&args.file).map_err(|e| format!("error: {shown}: cannot read: {e}"))?;
    let text =
        String::from_utf8(bytes).map_err(|_| format!("error: {shown}: is not UTF-8 text"))?;
    let base = args.file.parent().unwrap_or(Path::new("")).to_path_buf();
    let options = Options {
        prefix: args.prefix.clone(),
    };
    let result = import(&shown, &text, &base, &|p| std::fs::read(p), &options).map_err(|errs| {
        let mut lines: Vec<String> = errs.iter().map(|e| format!("error: {e}")).collect();
        lines.push(format!(
            "nothing was written: {} problem(s) in {shown}",
            errs.len()
        ));
        lines.join("\n")
    })?;
    report(&result);
    match &args.output_dir {
        Some(dir) => write_dir(dir, &result, &shown)?,
        None => print!("{}", stream(&result, &shown)),
    }
    Ok(())
}

/// Notes, then warnings, then a one-line summary, on stderr.
fn report(result: &Import) {
    for n in &result.notes {
        eprintln!("note: {n}");
    }
    for w in &result.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "imported {} object(s), {} Ingress stub(s); {} warning(s), {} note(s)",
        result.objects.len(),
        result.ingress_stubs.len(),
        result.warnings.len(),
        result.notes.len()
    );
}

/// One object as a YAML document, with a comment saying where it came from.
fn document(source: &str, o: &super::Emitted) -> String {
    let yaml = crate::output::to_yaml(&o.manifest);
    let body = yaml.strip_prefix("---\n").unwrap_or(&yaml);
    format!(
        "---\n# Imported by `berth import compose` from {source} ({}).\n{body}",
        o.from
    )
}

/// One YAML stream: every object, then the Ingress stubs as comments.
pub fn stream(result: &Import, source: &str) -> String {
    let mut out = String::new();
    for o in &result.objects {
        out.push_str(&document(source, o));
    }
    for s in &result.ingress_stubs {
        out.push_str("---\n");
        out.push_str(&s.text);
    }
    out
}

/// The files `-o DIR` writes: (name, content).
pub fn files(result: &Import, source: &str) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for o in &result.objects {
        out.push((file_name(o.kind.lower(), &o.name), document(source, o)));
    }
    for s in &result.ingress_stubs {
        out.push((file_name("ingress", &s.name), s.text.clone()));
    }
    out
}

/// Writes every file, after checking none exists (a file edited since the last import is never
/// overwritten) and that no two objects would share one.
fn write_dir(dir: &Path, result: &Import, source: &str) -> CliResult {
    let files = files(result, source);
    let existing: Vec<String> = files
        .iter()
        .map(|(name, _)| dir.join(name))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if !existing.is_empty() {
        return Err(format!(
            "error: {} already exist(s); nothing was written (remove them or choose another -o directory)",
            existing.join(", ")
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("error: cannot create {}: {e}", dir.display()))?;
    for (name, text) in &files {
        let path = dir.join(name);
        std::fs::write(&path, text)
            .map_err(|e| format!("error: cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
