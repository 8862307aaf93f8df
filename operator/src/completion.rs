//! `berth completion bash|zsh|fish`: the shell script clap_complete generates for berth's
//! subcommands and flags, plus a few lines per shell that complete kinds, object names and context
//! names by running the hidden `berth __complete -- WORDS... CURRENT`, which asks the API server
//! (with the usual connection settings) and prints one candidate per line.
//!
//! Install: `berth completion bash > /etc/bash_completion.d/berth` (or `source <(berth
//! completion bash)` in ~/.bashrc); zsh: `source <(berth completion zsh)` in ~/.zshrc after
//! `compinit`; fish: `berth completion fish > ~/.config/fish/completions/berth.fish`.

use crate::cli::CliResult;
use crate::Conn;
use berth_api_types::Kind;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Calls `__complete` with the words before the cursor (the command's own name left out) and
/// the word being completed; when it prints nothing, the generated completion runs.
const BASH: &str = r#"
_berth_objects() {
    local cur="${COMP_WORDS[COMP_CWORD]}" candidates
    candidates="$("${COMP_WORDS[0]}" __complete -- "${COMP_WORDS[@]:1:COMP_CWORD-1}" "$cur" 2>/dev/null)"
    if [[ -n "$candidates" ]]; then
        COMPREPLY=($(compgen -W "$candidates" -- "$cur"))
        return 0
    fi
    _berth "$@"
}
complete -F _berth_objects -o bashdefault -o default berth
"#;

const ZSH: &str = r#"
_berth_objects() {
    local -a candidates
    candidates=("${(@f)$(${words[1]} __complete -- "${(@)words[2,CURRENT-1]}" "${words[CURRENT]}" 2>/dev/null)}")
    candidates=(${candidates:#})
    if (( ${#candidates} )); then
        compadd -a candidates
    else
        _berth "$@"
    fi
}
compdef _berth_objects berth
"#;

const FISH: &str = r#"
function __berth_objects
    set -l words (commandline -opc)
    set -l cmd $words[1]
    set -e words[1]
    $cmd __complete -- $words (commandline -ct) 2>/dev/null
end
function __berth_objects_wanted
    set -l candidates (__berth_objects)
    test (count $candidates) -gt 0
end
complete -c berth -f -n __berth_objects_wanted -a '(__berth_objects)'
"#;

/// The whole script for a shell.
pub fn script(shell: Shell, cmd: &mut clap::Command) -> String {
    let (generator, glue) = match shell {
        Shell::Bash => (clap_complete::Shell::Bash, BASH),
        Shell::Zsh => (clap_complete::Shell::Zsh, ZSH),
        Shell::Fish => (clap_complete::Shell::Fish, FISH),
    };
    let mut out = Vec::new();
    clap_complete::generate(generator, cmd, "berth", &mut out);
    let mut text = String::from_utf8_lossy(&out).into_owned();
    text.push_str(glue);
    text
}

/// What the word under the cursor should be.
#[derive(Debug, PartialEq, Eq)]
pub enum Wanted {
    Kinds,
    /// Names of a kind; `qualified`: as `KIND/NAME`, with the kind as typed.
    Names {
        kind: Kind,
        typed_kind: String,
        qualified: bool,
    },
    Contexts,
    Nothing,
}

/// Flags that take a value as the next word (the value is not a positional argument).
const VALUE_FLAGS: &[&str] = &[
    "-o",
    "--output",
    "-l",
    "--selector",
    "--context",
    "--url",
    "--token",
    "--token-file",
    "--ca",
    "--kind",
    "--limit",
    "-f",
    "--filename",
    "--timeout",
    "--to-revision",
    "--since",
    "--from-literal",
    "--from-file",
    "--label",
    "--for",
    "--replicas",
    "--task",
    "--tail",
];

/// Subcommands whose positionals are `KIND NAME...` (or `KIND/NAME...`), and how many names
/// they take (`None`: any number).
fn takes_objects(sub: &[&str]) -> Option<Option<usize>> {
    match sub {
        ["get"] | ["delete"] | ["wait"] => Some(None),
        ["describe"] | ["events"] | ["edit"] | ["label"] | ["scale"] => Some(Some(1)),
        ["rollout", "status" | "history" | "undo" | "restart" | "pause" | "resume"] => {
            Some(Some(1))
        }
        _ => None,
    }
}

/// Subcommands whose first positional is a Service's name, without a kind (`logs web`).
fn takes_a_service(sub: &str) -> bool {
    matches!(sub, "logs" | "ps" | "exec")
}

/// Decides from the words before the cursor (`words`, without the program's name) and the word
/// being typed (`current`).
pub fn wanted(words: &[String], current: &str) -> Wanted {
    if words.last().is_some_and(|w| w == "--context") {
        return Wanted::Contexts;
    }
    if words.last().is_some_and(|w| w == "--kind") {
        return Wanted::Kinds;
    }
    let mut positionals: Vec<&str> = Vec::new();
    let mut skip_value = false;
    for w in words {
        if skip_value {
            skip_value = false;
        } else if w.starts_with('-') {
            skip_value = VALUE_FLAGS.contains(&w.as_str());
        } else {
            positionals.push(w);
        }
    }
    // The subcommand is one word, or two for `rollout ...`.
    let sub_len = if positionals.first() == Some(&"rollout") {
        2
    } else {
        1
    };
    if positionals.len() < sub_len {
        return Wanted::Nothing;
    }
    if sub_len == 1 && takes_a_service(positionals[0]) {
        // After `--`, the words are the command to run in the task: nothing of berth's.
        return if positionals.len() == 1 && !words.iter().any(|w| w == "--") {
            Wanted::Names {
                kind: Kind::Service,
                typed_kind: "service".into(),
                qualified: false,
            }
        } else {
            Wanted::Nothing
        };
    }
    let Some(max_names) = takes_objects(&positionals[..sub_len]) else {
        return Wanted::Nothing;
    };
    let args = &positionals[sub_len..];
    if let Some((k, _)) = current.split_once('/') {
        if args.iter().all(|a| a.contains('/')) {
            if let Some(kind) = Kind::parse_loose(k) {
                return Wanted::Names {
                    kind,
                    typed_kind: k.to_string(),
                    qualified: true,
                };
            }
        }
        return Wanted::Nothing;
    }
    match args {
        [] => Wanted::Kinds,
        [k, names @ ..] if !k.contains(',') && !k.contains('/') => {
            match (Kind::parse_loose(k), max_names) {
                (Some(_), Some(max)) if names.len() >= max => Wanted::Nothing,
                (Some(kind), _) => Wanted::Names {
                    kind,
                    typed_kind: k.to_string(),
                    qualified: false,
                },
                (None, _) => Wanted::Nothing,
            }
        }
        _ => Wanted::Nothing,
    }
}

/// `berth __complete -- WORDS... CURRENT`: prints the candidates, one a line; prints nothing
/// (and succeeds) when it cannot tell or cannot reach the server, so the shell falls back.
pub async fn complete(conn: &Conn, words: &[String]) -> CliResult {
    let (current, before) = match words.split_last() {
        Some((c, b)) => (c.as_str(), b),
        None => ("", &[][..]),
    };
    // A `--context X` typed on the line counts, as it will when the command runs.
    let mut conn = conn.clone();
    if let Some(i) = before.iter().position(|w| w == "--context") {
        conn.context = before.get(i + 1).cloned().or(conn.context);
    }
    match wanted(before, current) {
        Wanted::Nothing => {}
        Wanted::Kinds => {
            for k in Kind::ALL {
                println!("{}", k.plural());
            }
        }
        Wanted::Contexts => {
            let env = |k: &str| std::env::var(k).ok();
            if let Ok(file) =
                crate::client_config::config_path(&env).and_then(|p| crate::client_config::load(&p))
            {
                for c in file.contexts {
                    println!("{}", c.name);
                }
            }
        }
        Wanted::Names {
            kind,
            typed_kind,
            qualified,
        } => {
            let Ok(client) = crate::cli::client(&conn) else {
                return Ok(());
            };
            if let Ok(objects) = client.list_objects(kind).await {
                for o in objects {
                    if qualified {
                        println!("{typed_kind}/{}", o.metadata.name);
                    } else {
                        println!("{}", o.metadata.name);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn names(kind: Kind, typed: &str, qualified: bool) -> Wanted {
        Wanted::Names {
            kind,
            typed_kind: typed.into(),
            qualified,
        }
    }

    #[test]
    fn what_each_position_completes() {
        assert_eq!(wanted(&w(""), "ge"), Wanted::Nothing);
        assert_eq!(wanted(&w("get"), ""), Wanted::Kinds);
        assert_eq!(wanted(&w("get -o wide"), ""), Wanted::Kinds);
        assert_eq!(
            wanted(&w("get services"), "w"),
            names(Kind::Service, "services", false)
        );
        assert_eq!(
            wanted(&w("delete svc a b"), ""),
            names(Kind::Service, "svc", false)
        );
        assert_eq!(
            wanted(&w("get"), "service/w"),
            names(Kind::Service, "service", true)
        );
        assert_eq!(
            wanted(&w("rollout status service"), ""),
            names(Kind::Service, "service", false)
        );
        assert_eq!(wanted(&w("describe service web"), ""), Wanted::Nothing);
        assert_eq!(wanted(&w("get services,networks"), ""), Wanted::Nothing);
        assert_eq!(wanted(&w("apply -f"), ""), Wanted::Nothing);
        assert_eq!(wanted(&w("get --context"), ""), Wanted::Contexts);
        assert_eq!(wanted(&w("events --kind"), ""), Wanted::Kinds);
        assert_eq!(
            wanted(&w("get -l app=x services"), ""),
            names(Kind::Service, "services", false)
        );
        // The day-2 commands: a kind and a name, or a Service's name alone.
        assert_eq!(
            wanted(&w("rollout restart service"), ""),
            names(Kind::Service, "service", false)
        );
        assert_eq!(
            wanted(&w("scale service"), "w"),
            names(Kind::Service, "service", false)
        );
        assert_eq!(
            wanted(&w("scale service web --replicas"), ""),
            Wanted::Nothing
        );
        assert_eq!(
            wanted(&w("logs -f"), ""),
            names(Kind::Service, "service", false)
        );
        assert_eq!(
            wanted(&w("exec --task 1"), "w"),
            names(Kind::Service, "service", false)
        );
        assert_eq!(wanted(&w("exec web -it --"), ""), Wanted::Nothing);
        assert_eq!(wanted(&w("ps web"), ""), Wanted::Nothing);
    }

    #[test]
    fn every_shell_gets_the_subcommands_and_the_name_completer() {
        use clap::CommandFactory;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = script(shell, &mut crate::Cli::command());
            for needle in ["apply", "describe", "__complete", "_berth_objects"] {
                let needle = if matches!(shell, Shell::Fish) && needle == "_berth_objects" {
                    "__berth_objects"
                } else {
                    needle
                };
                assert!(text.contains(needle), "{shell:?} lacks {needle}");
            }
        }
    }
}
