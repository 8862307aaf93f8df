//! The transfer agent: what `berth agent volume-send|volume-receive` runs inside the short-lived
//! task berth starts on a volume's node. It reads its [`Grant`] from the Swarm secret file, connects
//! back to berth (see [`channel`](super::channel)), and streams the volume mounted at its
//! directory as tar, or replaces that directory's content with the tar berth sends.
//!
//! Blocking on purpose: one process, one connection, one job. It gives up at the grant's deadline
//! whatever it is doing (a watchdog thread exits the process), so a stuck transfer cannot keep a
//! volume mounted; berth removes the task anyway.

use super::stream;
use crate::swarm::channel::{self, Grant, Op};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// The longest the agent waits on one read or write of the connection.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one transfer; the error is for the task's log (it carries no secret).
pub fn run(op: Op, grant_file: &Path, dir: &Path) -> Result<(), String> {
    let grant = Grant::read(grant_file, op)?;
    channel::exit_at_deadline(grant.deadline);
    if op == Op::Exec {
        return Err("`exec` is not a volume transfer".into());
    }
    let mut s = channel::connect(&grant, IO_TIMEOUT).map_err(|e| e.to_string())?;
    match op {
        Op::Send => {
            let c =
                stream::pack(dir, &mut s).map_err(|e| format!("reading {}: {e}", dir.display()))?;
            channel::finish_sending(&mut s).map_err(|e| e.to_string())?;
            eprintln!(
                "berth agent: sent {} entries, {} bytes ({} special files skipped)",
                c.files, c.bytes, c.skipped
            );
            Ok(())
        }
        Op::Receive => {
            // Replace, not merge: what the volume had that the backup does not must go.
            let result = stream::empty_dir(dir)
                .map_err(|e| format!("emptying {}: {e}", dir.display()))
                .and_then(|()| {
                    stream::unpack(&mut s, dir)
                        .map_err(|e| format!("writing into {}: {e}", dir.display()))
                });
            let reply = match &result {
                Ok(c) => format!("DONE {} {} {}\n", c.files, c.bytes, c.skipped),
                Err(e) => format!("ERR {}\n", e.replace('\n', " ")),
            };
            s.write_all(reply.as_bytes()).map_err(|e| e.to_string())?;
            channel::finish_sending(&mut s).map_err(|e| e.to_string())?;
            let c = result?;
            eprintln!(
                "berth agent: received {} entries, {} bytes ({} special files skipped)",
                c.files, c.bytes, c.skipped
            );
            Ok(())
        }
        Op::Exec => unreachable!("refused above"),
    }
}

/// berth's side of a receive: the agent's one-line answer after unpacking.
pub(crate) fn parse_reply(line: &str) -> Result<stream::Counts, String> {
    let line = line.trim_end();
    if let Some(rest) = line.strip_prefix("DONE ") {
        let n: Vec<u64> = rest
            .split(' ')
            .map(|x| {
                x.parse()
                    .map_err(|_| format!("a malformed agent reply: {line}"))
            })
            .collect::<Result<_, _>>()?;
        if let [files, bytes, skipped] = n[..] {
            return Ok(stream::Counts {
                files,
                bytes,
                skipped,
            });
        }
    }
    if let Some(msg) = line.strip_prefix("ERR ") {
        return Err(msg.to_string());
    }
    Err(if line.is_empty() {
        "the agent closed the connection without an answer".to_string()
    } else {
        format!("a malformed agent reply: {line}")
    })
}
