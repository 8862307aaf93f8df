//! What a running Service is made of, as the day-2 commands see it through the API: its Swarm
//! tasks (`berth ps`), its log lines (`berth logs`) and the byte protocol of a command run in one
//! of its tasks (`berth exec`). The server and the CLI share these types so neither needs Docker
//! access of its own on the other's behalf.

use serde::{Deserialize, Serialize};

/// One Swarm task of a Service (`GET .../services/<name>/tasks`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskInfo {
    /// The engine's task id (full).
    pub id: String,
    /// `<service>.<slot>` (replicated) or `<service>.<node id>` (global), as `docker service ps`.
    pub name: String,
    /// The replica slot; none for a global Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<i64>,
    #[serde(default)]
    pub node_id: String,
    /// The node's hostname (its id when the node is gone).
    #[serde(default)]
    pub node: String,
    /// What the orchestrator wants (`running`, `shutdown`, ...).
    pub desired_state: String,
    /// What the task is (`running`, `rejected`, `failed`, `pending`, ...).
    pub state: String,
    /// When it entered that state (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// The image the task runs, as the engine pinned it (with `@sha256:` when it could).
    #[serde(default)]
    pub image: String,
    /// The `sha256:...` digest of `image`, when pinned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// The engine's error for a failed or rejected task ("No such image: ...").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The engine's status message ("started", "preparing", ...).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// The container on its node, once it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
}

impl TaskInfo {
    /// Whether a command can run in it now: running, and meant to keep running.
    pub fn is_running(&self) -> bool {
        self.state == "running" && self.desired_state == "running"
    }

    /// `web.1.abcdef012345@node1`: the prefix `docker service logs` gives a task's lines.
    pub fn log_prefix(&self) -> String {
        format!("{}.{}@{}", self.name, short_id(&self.id), self.node)
    }
}

/// The 12-character form of an engine id, as the docker CLI shows ids.
pub fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// The digest of a pinned image reference (`repo:tag@sha256:...` → `sha256:...`).
pub fn image_digest(image: &str) -> Option<String> {
    image
        .rsplit_once('@')
        .map(|(_, d)| d.to_string())
        .filter(|d| d.contains(':'))
}

/// Which task a command runs in: `--task 2` (a slot) or `--task abc123` (a task id or the start
/// of one), or the default (none): the first running task, those on `local_node` first (the only
/// engine the API server can reach). Returns an error naming what matched instead.
pub fn select_task<'a>(
    tasks: &'a [TaskInfo],
    selector: Option<&str>,
    local_node: &str,
) -> Result<&'a TaskInfo, String> {
    let running = || tasks.iter().filter(|t| t.is_running());
    match selector.map(str::trim) {
        None | Some("") => running()
            .min_by_key(|t| (t.node_id != local_node, t.slot.unwrap_or(0), t.id.clone()))
            .ok_or_else(|| "no task of it is running".to_string()),
        Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            let slot: i64 = s
                .parse()
                .map_err(|_| format!("`{s}` is not a slot number"))?;
            running()
                .find(|t| t.slot == Some(slot))
                .ok_or_else(|| format!("no running task in slot {slot}"))
        }
        Some(s) => {
            let matches: Vec<&TaskInfo> = tasks.iter().filter(|t| t.id.starts_with(s)).collect();
            match matches.as_slice() {
                [] => Err(format!("no task with id `{s}`")),
                [t] if t.is_running() => Ok(t),
                [t] => Err(format!(
                    "task {} is {} (desired {}), not running",
                    t.name, t.state, t.desired_state
                )),
                many => Err(format!(
                    "`{s}` starts {} task ids; give more of it",
                    many.len()
                )),
            }
        }
    }
}

/// One line of a Service's logs (`GET .../logs` answers newline-delimited JSON of these).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LogLine {
    /// [`TaskInfo::log_prefix`] of the task that wrote it.
    pub task: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The engine's timestamp (RFC 3339, nanoseconds), with `timestamps=true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The text without its newline (invalid UTF-8 replaced).
    pub line: String,
}

impl LogLine {
    /// As `docker service logs` prints it: `[time ]task | line`.
    pub fn render(&self) -> String {
        match &self.time {
            Some(t) => format!("{t} {} | {}", self.task, self.line),
            None => format!("{} | {}", self.task, self.line),
        }
    }
}

/// Splits what one task's log stream delivered into whole lines, keeping an unfinished line in
/// `pending` until its newline arrives (the engine may cut a long line into several frames).
/// With `timestamps`, each line's leading engine timestamp is taken off into `time`.
pub fn split_log_lines(
    pending: &mut Vec<u8>,
    chunk: &[u8],
    timestamps: bool,
) -> Vec<(Option<String>, String)> {
    pending.extend_from_slice(chunk);
    let mut out = Vec::new();
    while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
        let raw: Vec<u8> = pending.drain(..=pos).collect();
        out.push(log_line(&raw[..raw.len() - 1], timestamps));
    }
    out
}

/// The rest of a stream that ended without a final newline.
pub fn finish_log_lines(
    pending: &mut Vec<u8>,
    timestamps: bool,
) -> Option<(Option<String>, String)> {
    if pending.is_empty() {
        return None;
    }
    let raw = std::mem::take(pending);
    Some(log_line(&raw, timestamps))
}

fn log_line(raw: &[u8], timestamps: bool) -> (Option<String>, String) {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = String::from_utf8_lossy(raw).into_owned();
    if timestamps {
        if let Some((t, rest)) = text.split_once(' ') {
            if chrono::DateTime::parse_from_rfc3339(t).is_ok() {
                return (Some(t.to_string()), rest.to_string());
            }
        }
    }
    (None, text)
}

/// `POST .../services/<name>/exec`: what to run. The request asks for an HTTP upgrade to
/// [`EXEC_PROTOCOL`]; after the `101` both sides speak [`Frame`]s.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments (no shell unless the program is one).
    pub command: Vec<String>,
    /// A slot number or a task id (prefix); none: the first running task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Keep stdin open and forward it.
    #[serde(default)]
    pub stdin: bool,
    /// Give the command a terminal (stdout and stderr then arrive as one stream).
    #[serde(default)]
    pub tty: bool,
    /// The terminal's size at start, `[columns, rows]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[u16; 2]>,
}

/// The `Upgrade` token of an exec connection.
pub const EXEC_PROTOCOL: &str = "berth-exec/1";

/// Largest frame payload either side sends or accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// One message of an exec connection: a type byte, a 4-byte big-endian length, the payload.
/// The client sends `Stdin`, `StdinEof` and `Resize`; the server `Stdout`, `Stderr`, then one
/// `Exit` (or `Error`) as the last frame.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Stdin(Vec<u8>),
    StdinEof,
    /// Columns, rows.
    Resize(u16, u16),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command's exit code.
    Exit(i32),
    /// The command could not run or the connection to it broke.
    Error(String),
}

impl Frame {
    fn tag(&self) -> u8 {
        match self {
            Frame::Stdin(_) => 0x00,
            Frame::StdinEof => 0x01,
            Frame::Resize(..) => 0x02,
            Frame::Stdout(_) => 0x10,
            Frame::Stderr(_) => 0x11,
            Frame::Exit(_) => 0x12,
            Frame::Error(_) => 0x13,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let payload: Vec<u8> = match self {
            Frame::Stdin(b) | Frame::Stdout(b) | Frame::Stderr(b) => b.clone(),
            Frame::StdinEof => vec![],
            Frame::Resize(c, r) => [c.to_be_bytes(), r.to_be_bytes()].concat(),
            Frame::Exit(code) => code.to_be_bytes().to_vec(),
            Frame::Error(m) => m.as_bytes().to_vec(),
        };
        let mut out = Vec::with_capacity(5 + payload.len());
        out.push(self.tag());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Takes the first whole frame off `buf`; `None` until one has arrived.
    pub fn take(buf: &mut Vec<u8>) -> Result<Option<Frame>, String> {
        if buf.len() < 5 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(format!(
                "exec frame of {len} bytes (at most {MAX_FRAME}): not a berth exec stream"
            ));
        }
        if buf.len() < 5 + len {
            return Ok(None);
        }
        let tag = buf[0];
        let payload: Vec<u8> = buf.drain(..5 + len).skip(5).collect();
        let fixed = |n: usize| {
            if payload.len() == n {
                Ok(())
            } else {
                Err(format!(
                    "exec frame {tag:#04x} has {} bytes, not {n}",
                    payload.len()
                ))
            }
        };
        Ok(Some(match tag {
            0x00 => Frame::Stdin(payload),
            0x01 => Frame::StdinEof,
            0x02 => {
                fixed(4)?;
                Frame::Resize(
                    u16::from_be_bytes([payload[0], payload[1]]),
                    u16::from_be_bytes([payload[2], payload[3]]),
                )
            }
            0x10 => Frame::Stdout(payload),
            0x11 => Frame::Stderr(payload),
            0x12 => {
                fixed(4)?;
                Frame::Exit(i32::from_be_bytes([
                    payload[0], payload[1], payload[2], payload[3],
                ]))
            }
            0x13 => Frame::Error(String::from_utf8_lossy(&payload).into_owned()),
            other => return Err(format!("unknown exec frame type {other:#04x}")),
        }))
    }
}

/// The program's name of a command, for the audit record: its first word without a path, never
/// its arguments (which may carry secrets).
pub fn program_name(command: &[String]) -> String {
    command
        .first()
        .map(|p| p.rsplit('/').next().unwrap_or(p).to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, slot: Option<i64>, node: &str, state: &str) -> TaskInfo {
        TaskInfo {
            id: id.into(),
            name: format!("web.{}", slot.unwrap_or(0)),
            slot,
            node_id: node.into(),
            node: format!("host-{node}"),
            desired_state: if state == "running" {
                "running"
            } else {
                "shutdown"
            }
            .into(),
            state: state.into(),
            ..TaskInfo::default()
        }
    }

    #[test]
    fn frames_survive_a_round_trip_split_anywhere() {
        let frames = vec![
            Frame::Stdin(b"echo hi\n".to_vec()),
            Frame::StdinEof,
            Frame::Resize(120, 40),
            Frame::Stdout(vec![0, 1, 2, 255]),
            Frame::Stderr(vec![]),
            Frame::Exit(-3),
            Frame::Error("no such container".into()),
        ];
        let wire: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        // Fed one byte at a time, the decoder yields exactly the frames sent, in order.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for b in &wire {
            buf.push(*b);
            while let Some(f) = Frame::take(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_frames_are_refused_not_guessed() {
        let mut huge = vec![0x10];
        huge.extend_from_slice(&((MAX_FRAME as u32) + 1).to_be_bytes());
        assert!(Frame::take(&mut huge).unwrap_err().contains("at most"));
        let mut unknown = vec![0x7f, 0, 0, 0, 0];
        assert!(Frame::take(&mut unknown).unwrap_err().contains("unknown"));
        let mut short_exit = vec![0x12, 0, 0, 0, 1, 9];
        assert!(Frame::take(&mut short_exit).unwrap_err().contains("not 4"));
        let mut partial = Frame::Stdout(b"abc".to_vec()).encode();
        partial.pop();
        assert_eq!(Frame::take(&mut partial).unwrap(), None);
    }

    #[test]
    fn log_lines_are_whole_lines_with_their_timestamp_split_off() {
        let mut pending = Vec::new();
        assert!(split_log_lines(&mut pending, b"par", false).is_empty());
        assert_eq!(
            split_log_lines(&mut pending, b"tial\r\nnext\nrest", false),
            vec![(None, "partial".to_string()), (None, "next".to_string())]
        );
        assert_eq!(
            finish_log_lines(&mut pending, false),
            Some((None, "rest".to_string()))
        );
        assert_eq!(finish_log_lines(&mut pending, false), None);
        let got = split_log_lines(
            &mut pending,
            b"2026-11-30T09:00:00.123456789Z hello world\nnot-a-time x\n",
            true,
        );
        assert_eq!(
            got,
            vec![
                (
                    Some("2026-11-30T09:00:00.123456789Z".to_string()),
                    "hello world".to_string()
                ),
                (None, "not-a-time x".to_string())
            ]
        );
        let t = TaskInfo {
            id: "abcdefghijklmnop".into(),
            name: "web.2".into(),
            node: "node1".into(),
            ..TaskInfo::default()
        };
        assert_eq!(t.log_prefix(), "web.2.abcdefghijkl@node1");
        let line = LogLine {
            task: t.log_prefix(),
            stream: "stdout".into(),
            time: None,
            line: "hi".into(),
        };
        assert_eq!(line.render(), "web.2.abcdefghijkl@node1 | hi");
    }

    #[test]
    fn a_task_is_chosen_by_slot_by_id_or_the_first_running_local_one() {
        let tasks = vec![
            task("aaa111", Some(1), "remote", "running"),
            task("bbb222", Some(2), "local", "running"),
            task("bbb333", Some(3), "local", "failed"),
        ];
        assert_eq!(select_task(&tasks, None, "local").unwrap().id, "bbb222");
        assert_eq!(select_task(&tasks, None, "other").unwrap().id, "aaa111");
        assert_eq!(
            select_task(&tasks, Some("1"), "local").unwrap().id,
            "aaa111"
        );
        assert_eq!(
            select_task(&tasks, Some("aaa"), "local").unwrap().id,
            "aaa111"
        );
        assert!(select_task(&tasks, Some("3"), "local")
            .unwrap_err()
            .contains("no running task in slot 3"));
        assert!(select_task(&tasks, Some("bbb"), "local")
            .unwrap_err()
            .contains("starts 2 task ids"));
        assert!(select_task(&tasks, Some("bbb333"), "local")
            .unwrap_err()
            .contains("is failed"));
        assert!(select_task(&tasks, Some("zzz"), "local")
            .unwrap_err()
            .contains("no task with id `zzz`"));
        assert!(select_task(&tasks[2..], None, "local")
            .unwrap_err()
            .contains("no task of it is running"));
    }

    #[test]
    fn the_audit_names_the_program_never_its_arguments() {
        let cmd = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(program_name(&cmd(&["/bin/sh", "-c", "PASSWORD=x"])), "sh");
        assert_eq!(program_name(&cmd(&["psql"])), "psql");
        assert_eq!(program_name(&[]), "");
        assert_eq!(
            image_digest("berth-test/busybox:1@sha256:abc").as_deref(),
            Some("sha256:abc")
        );
        assert_eq!(image_digest("berth-test/busybox:1"), None);
    }
}
