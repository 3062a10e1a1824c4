//! The README's promises, checked by running what it says.
//!
//! "Try it": the command in the README's first shell block is run as
//! written, then changed the way the text says (each flag and value is
//! taken from the README's backquoted spans), and every decision, status and
//! rule the text names is compared with what palisadectl answers.
//!
//! "Command line": no two agents that could run side by side on one machine
//! share an admin port.

use std::collections::BTreeMap;
use std::process::Command;

use serde_json::Value;

const README: &str = include_str!("../../README.md");

/// The text of the section that starts with the heading `title`.
fn section(title: &str) -> &'static str {
    let start = README
        .find(&format!("\n## {title}"))
        .unwrap_or_else(|| panic!("README has no section {title:?}"));
    let rest = &README[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// The contents of the `sh` code blocks of `text`, in order.
fn shell_blocks(text: &str) -> Vec<&str> {
    text.split("```sh\n")
        .skip(1)
        .map(|b| b.split("\n```").next().expect("closed block"))
        .collect()
}

/// Shell words of one command line: backslash-newline joins lines, single
/// quotes group (all the README uses).
fn words(command: &str) -> Vec<String> {
    let joined = command.replace("\\\n", " ");
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in joined.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(!quoted, "unbalanced quote in {command:?}");
    if in_word {
        words.push(word);
    }
    words
}

/// The backquoted spans of `text`, in order.
fn spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// `text` with each paragraph and list item on one line (wrapped lines
/// joined by a space), paragraphs separated by an empty line.
fn unwrap(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            out.push_str("\n\n");
        } else if line.starts_with("- ") || out.ends_with('\n') || out.is_empty() {
            out.push('\n');
            out.push_str(line);
        } else {
            out.push(' ');
            out.push_str(line);
        }
    }
    out
}

/// The prose from `marker` to the end of its paragraph or list item
/// (wrapping ignored).
fn after(text: &str, marker: &str) -> String {
    let text = unwrap(text);
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("README no longer says {marker:?}"));
    let rest = &text[at + marker.len()..];
    rest[..rest.find('\n').unwrap_or(rest.len())].to_owned()
}

/// `palisadectl ARGS --output json` from the repository root.
fn simulate(args: &[String]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_palisadectl"))
        .args(args)
        .args(["--output", "json"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run palisadectl");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// `args` with the flag-and-value `from` (e.g. `--path /x`) replaced by `to`.
fn replace(args: &[String], from: &str, to: &str) -> Vec<String> {
    let from = words(from);
    let to = words(to);
    let at = args
        .windows(from.len())
        .position(|w| w == from.as_slice())
        .unwrap_or_else(|| panic!("{from:?} is not in the README's command {args:?}"));
    [&args[..at], &to, &args[at + from.len()..]].concat()
}

/// Asserts `got` is `decision`, and, when given, `status` and a rule ending
/// in `/rule`.
fn assert_verdict(got: &Value, decision: &str, status: Option<&str>, rule: &str, what: &str) {
    assert_eq!(got["decision"], decision, "{what}: {got}");
    if let Some(status) = status {
        assert_eq!(got["status"].to_string(), status, "{what}: {got}");
    }
    let actual = got["rule"].as_str().unwrap_or_default();
    assert!(
        actual.ends_with(&format!("/{rule}")),
        "{what}: rule {actual:?}, README says {rule:?}"
    );
}

#[test]
fn try_it_decides_as_the_readme_says() {
    let text = section("Try it");
    let blocks = shell_blocks(text);
    let command = words(blocks.first().expect("a command in Try it"));
    let prefix = ["cargo", "run", "-p", "palisadectl", "--"];
    assert_eq!(command[..prefix.len()], prefix, "{command:?}");
    let base: Vec<String> = command[prefix.len()..].to_vec();

    // "… normalizes the encoded path (`/admin/users`) … the rule that
    // decided: `deny`, `403`, `admin-area/deny/not-admins`."
    let normalized = after(text, "normalizes the encoded path");
    let normalized = spans(&normalized)[0];
    let promised = after(text, "the rule that decided:");
    let promised = spans(&promised);
    let [decision, status, rule] = promised[..3] else {
        panic!("{promised:?}")
    };
    let got = simulate(&base);
    assert_eq!(got["normalizedPath"], normalized, "{got}");
    assert_verdict(&got, decision, Some(status), rule, "the README's command");

    // "Either change turns it into `allow`:"
    let changed = after(text, "Either change turns it into");
    let changed = spans(&changed)[0];
    assert_ne!(changed, decision, "the README promises a change");

    // "- drop the path trick, `--path /orders/admin/users`: … (`read-orders/allow/anyone`)"
    let item = after(text, "- drop the path trick, ");
    let s = spans(&item);
    let flag = s[0];
    let flag_name = words(flag)[0].clone();
    let old = base
        .iter()
        .position(|w| *w == flag_name)
        .map(|i| format!("{} '{}'", base[i], base[i + 1]))
        .expect("the command has the flag");
    let rule = s.iter().find(|s| s.contains("/allow/")).expect("a rule");
    let got = simulate(&replace(&base, &old, flag));
    assert_verdict(&got, changed, None, rule, "without the path trick");

    // "- replace `--claim roles=viewer` with `--claim roles=orders-admin`:
    //   … (`admin-area/allow/admins`). Adding `--claim roles=orders-admin`
    //   next to the viewer role is not enough"
    let item = after(text, "- replace ");
    let s = spans(&item);
    let (from, to) = (s[0], s[1]);
    let rule = s.iter().find(|s| s.contains("/allow/")).expect("a rule");
    let got = simulate(&replace(&base, from, to));
    assert_verdict(&got, changed, None, rule, "with the admin role instead");

    let added = after(&item, "Adding ");
    let added = spans(&added)[0];
    assert!(
        item.contains("is not enough"),
        "the README no longer says adding is not enough: {item}"
    );
    let got = simulate(&[base.clone(), words(added)].concat());
    assert_verdict(
        &got,
        decision,
        Some(status),
        promised[2],
        "with the admin role added",
    );
}

#[test]
fn agents_side_by_side_do_not_share_an_admin_port() {
    let text = section("Command line");
    let mut by_admin: BTreeMap<String, Vec<Vec<String>>> = BTreeMap::new();
    for block in shell_blocks(text) {
        let joined = block.replace("\\\n", " ");
        for line in joined.lines().filter(|l| !l.trim_start().starts_with('#')) {
            let command = words(line.split(" #").next().unwrap_or_default());
            let agent = command.first().is_some_and(|w| w == "palisade-agent")
                && command
                    .get(1)
                    .is_some_and(|w| w == "run" || w == "identity");
            // Transparent mode runs in the pod's own network namespace.
            if !agent || command.iter().any(|w| w == "--transparent") {
                continue;
            }
            let admin = command
                .iter()
                .position(|w| w == "--admin")
                .map_or("0.0.0.0:15020".to_owned(), |i| command[i + 1].clone());
            by_admin.entry(admin).or_default().push(command);
        }
    }
    assert!(
        by_admin.values().map(Vec::len).sum::<usize>() >= 5,
        "{by_admin:#?}"
    );
    // Agents sharing an admin port are the same agent shown two ways: they
    // also share their listener (`--inbound`/`--outbound` LISTEN), so they
    // could not run side by side anyway.
    let listen = |command: &[String]| -> Option<String> {
        let i = command
            .iter()
            .position(|w| w == "--inbound" || w == "--outbound")?;
        Some(command[i + 1].split('=').next()?.to_owned())
    };
    for (admin, commands) in &by_admin {
        let first = listen(&commands[0]);
        for other in &commands[1..] {
            assert!(
                first.is_some() && listen(other) == first,
                "two agents on admin {admin} could run side by side:\n{:?}\n{other:?}",
                commands[0]
            );
        }
    }
}
