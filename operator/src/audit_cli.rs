//! `berth audit` and `berth audit verify`: the audit trail for an auditor (a table, JSON, or CSV
//! for a spreadsheet) and the server's recomputation of its chain, which fails the command when
//! a record was edited or deleted.

use crate::backup_cli::EvidenceFormat;
use crate::cli::{api_error, client};
use crate::output::{csv, plain, table};
use crate::Conn;
use berth_api_types::access::{AuditRecord, AuditVerification};
use clap::{Subcommand, ValueEnum};

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute the chain on the server: every record's keyed hash and its link to the one
    /// before. Prints the records checked and the head hash (note it down: it anchors the trail);
    /// exits 1 naming the first broken record, and why, when one was edited or deleted.
    Verify {
        #[arg(short = 'o', long, default_value = "table")]
        output: VerifyFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum VerifyFormat {
    Table,
    Json,
}

/// `berth audit [--since] [-o]`.
pub async fn list(conn: &Conn, since: Option<&str>, output: EvidenceFormat) -> Result<(), String> {
    let records = client(conn)?.audit(since).await.map_err(api_error)?;
    match output {
        EvidenceFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "items": records }))
                .map_err(|e| e.to_string())?
        ),
        EvidenceFormat::Csv => print!("{}", records_csv(&records)),
        EvidenceFormat::Table if records.is_empty() => eprintln!("No audit records."),
        EvidenceFormat::Table => println!("{}", records_table(&records)),
    }
    Ok(())
}

/// `berth audit verify`.
pub async fn verify(conn: &Conn, output: VerifyFormat) -> Result<(), String> {
    let v = client(conn)?.audit_verify().await.map_err(api_error)?;
    match output {
        VerifyFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?
        ),
        VerifyFormat::Table if v.ok => println!("{}", verified(&v)),
        VerifyFormat::Table => {}
    }
    if v.ok {
        Ok(())
    } else {
        Err(broken(&v))
    }
}

fn verified(v: &AuditVerification) -> String {
    match &v.head {
        Some(head) => format!("audit chain intact: {} records; head {head}", v.records),
        None => "audit chain intact: no records yet".to_string(),
    }
}

fn broken(v: &AuditVerification) -> String {
    format!(
        "error: the audit chain is broken at record {}: {} ({} records stored)",
        v.first_broken
            .map(|s| s.to_string())
            .unwrap_or_else(|| "?".into()),
        v.problem.as_deref().unwrap_or("no reason given"),
        v.records
    )
}

/// `Service/web`, `Service`, or `-`; an exec's task and program after it.
fn object(r: &AuditRecord) -> String {
    let object = match (&r.entry.kind, &r.entry.name) {
        (Some(k), Some(n)) => format!("{k}/{n}"),
        (Some(k), None) => k.clone(),
        (None, Some(n)) => n.clone(),
        (None, None) => "-".into(),
    };
    let mut extra = String::new();
    if let Some(t) = &r.entry.task {
        extra.push_str(&format!(" task={t}"));
    }
    if let Some(p) = &r.entry.program {
        extra.push_str(&format!(" program={p}"));
    }
    format!("{object}{extra}")
}

/// `1->2`, `->1` (created), `3->` (deleted), or `-`.
fn generations(r: &AuditRecord) -> String {
    let g = |g: Option<u64>| g.map(|g| g.to_string()).unwrap_or_default();
    match (r.entry.generation_before, r.entry.generation_after) {
        (None, None) => "-".into(),
        (b, a) => format!("{}->{}", g(b), g(a)),
    }
}

fn outcome(r: &AuditRecord) -> String {
    if r.entry.outcome == "ok" {
        "ok".into()
    } else {
        format!("{} {}", r.entry.code, r.entry.outcome)
    }
}

fn records_table(records: &[AuditRecord]) -> String {
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let e = &r.entry;
            vec![
                r.seq.to_string(),
                r.time.clone(),
                plain(&e.token_id),
                e.role.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                plain(e.source.as_deref().unwrap_or("-")),
                plain(&e.action),
                plain(&object(r)),
                generations(r),
                plain(&outcome(r)),
            ]
        })
        .collect();
    table(
        &[
            "SEQ",
            "TIME (UTC)",
            "TOKEN",
            "ROLE",
            "SOURCE",
            "ACTION",
            "OBJECT",
            "GENERATION",
            "OUTCOME",
        ],
        &rows,
    )
}

/// Every field of every record, `prev` and `hash` included, so the export carries the chain.
fn records_csv(records: &[AuditRecord]) -> String {
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    let rows: Vec<Vec<String>> = records
        .iter()
        .map(|r| {
            let e = &r.entry;
            vec![
                r.seq.to_string(),
                r.time.clone(),
                e.token_id.clone(),
                e.role.map(|r| r.to_string()).unwrap_or_default(),
                e.source.clone().unwrap_or_default(),
                e.action.clone(),
                e.kind.clone().unwrap_or_default(),
                e.name.clone().unwrap_or_default(),
                opt(e.generation_before),
                opt(e.generation_after),
                e.code.to_string(),
                e.outcome.clone(),
                e.task.clone().unwrap_or_default(),
                e.program.clone().unwrap_or_default(),
                r.prev.clone(),
                r.hash.clone(),
            ]
        })
        .collect();
    csv(
        &[
            "seq",
            "time",
            "token_id",
            "role",
            "source",
            "action",
            "kind",
            "name",
            "generation_before",
            "generation_after",
            "code",
            "outcome",
            "task",
            "program",
            "prev",
            "hash",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::access::{AuditEntry, Role};

    fn record(name: &str) -> AuditRecord {
        AuditRecord {
            seq: 7,
            time: "2026-11-30T02:38:00.123Z".into(),
            entry: AuditEntry {
                token_id: "ci".into(),
                role: Some(Role::Deployer),
                source: Some("10.0.0.5:51234".into()),
                action: "patch".into(),
                kind: Some("Service".into()),
                name: Some(name.into()),
                generation_before: Some(3),
                generation_after: Some(4),
                code: 200,
                outcome: "ok".into(),
                ..AuditEntry::default()
            },
            prev: "a".repeat(64),
            hash: "b".repeat(64),
        }
    }

    #[test]
    fn csv_quotes_commas_quotes_and_line_breaks_and_defuses_formulas() {
        let out = records_csv(&[
            record(r#"we,b "x""#),
            record("line\nbreak"),
            record("=HYPERLINK(\"http://evil\")"),
        ]);
        let lines: Vec<&str> = out.split_terminator('\n').collect();
        assert_eq!(
            lines[0],
            "seq,time,token_id,role,source,action,kind,name,generation_before,generation_after,code,outcome,task,program,prev,hash"
        );
        assert_eq!(
            lines[1],
            format!(
                r#"7,2026-11-30T02:38:00.123Z,ci,deployer,10.0.0.5:51234,patch,Service,"we,b ""x""",3,4,200,ok,,,{},{}"#,
                "a".repeat(64),
                "b".repeat(64)
            )
        );
        // The line break stays inside its quoted cell: a CSV reader sees one record.
        assert!(out.contains("Service,\"line\nbreak\",3,4"), "{out}");
        assert!(
            out.contains(r#",Service,"'=HYPERLINK(""http://evil"")",3,"#),
            "a formula is shown, not run: {out}"
        );
    }

    #[test]
    fn table_shows_object_generations_outcome_and_escapes_control_characters() {
        let mut refused = record("\u{1b}[2Jgone");
        refused.entry.outcome = "Forbidden".into();
        refused.entry.code = 403;
        refused.entry.generation_before = None;
        refused.entry.generation_after = None;
        let out = records_table(&[record("web"), refused]);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("SEQ"), "{out}");
        assert!(
            lines[1].contains("Service/web")
                && lines[1].contains("3->4")
                && lines[1].ends_with("ok"),
            "{out}"
        );
        assert!(
            !out.contains('\u{1b}'),
            "an escape sequence reached the terminal: {out:?}"
        );
        assert!(
            lines[2].contains(r"Service/\u{1b}[2Jgone") && lines[2].ends_with("403 Forbidden"),
            "{out}"
        );
    }

    #[test]
    fn a_broken_chain_is_reported_with_its_record_and_reason() {
        let v = AuditVerification {
            records: 9,
            ok: false,
            first_broken: Some(4),
            problem: Some("record 4 is missing (deleted)".into()),
            head: None,
        };
        assert_eq!(
            broken(&v),
            "error: the audit chain is broken at record 4: record 4 is missing (deleted) (9 records stored)"
        );
    }
}
