//! The order journal across a real crash: a child process appends and commits orders as fast
//! as it can, telling the parent what each commit made durable, and is killed with SIGKILL
//! mid-stream; what it reported committed must come back, exactly, and what it reported
//! settled must not.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use fluxgate::journal::{Journal, Settings};

const CHILD_ENV: &str = "FLUXGATE_JOURNAL_CHILD_DIR";

fn settings(dir: std::path::PathBuf) -> Settings {
    Settings {
        dir,
        // Small segments, so the crash also meets rotation and removal.
        segment_size: 64 << 10,
    }
}

/// The child's side (run only when the parent starts this binary with the env var set):
/// groups of orders appended and committed; the even-numbered ones settled in the next
/// commit.
#[test]
#[ignore = "the crash test's child process"]
fn journal_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let run: u32 = std::env::var("FLUXGATE_JOURNAL_RUN")
        .unwrap()
        .parse()
        .unwrap();
    let (mut j, _) = Journal::open(settings(dir.into())).unwrap();
    let mut out = std::io::stdout().lock();
    let mut to_settle = Vec::new();
    for group in 0u32.. {
        let mut appended = Vec::new();
        for i in 0..16 {
            let id = format!("run{run}-order{}", group * 16 + i);
            let seq = j.append(id.as_bytes());
            appended.push((seq, id));
        }
        let settled = std::mem::take(&mut to_settle);
        for (seq, _) in &settled {
            j.settle(*seq);
        }
        j.commit().unwrap();
        // Durable now: say so.
        for (seq, id) in &appended {
            writeln!(out, "committed {seq} {id}").unwrap();
        }
        for (seq, id) in &settled {
            writeln!(out, "settled {seq} {id}").unwrap();
        }
        out.flush().unwrap();
        to_settle.extend(appended.into_iter().step_by(2));
    }
}

#[test]
fn orders_reported_committed_survive_sigkill_exactly_once_and_settled_ones_do_not() {
    let dir = std::env::temp_dir().join(format!("fluxgate-journal-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut committed = BTreeSet::new();
    let mut settled = BTreeSet::new();
    for run in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "journal_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &dir)
            .env("FLUXGATE_JOURNAL_RUN", run.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        // Kill it at a different point each run, somewhere in a stream of commits.
        while seen < 3000 + run * 1111 {
            let line = lines.next().expect("the child runs").unwrap();
            let mut words = line.split(' ');
            match (words.next(), words.next(), words.next()) {
                (Some("committed"), Some(_), Some(id)) => {
                    committed.insert(id.to_owned());
                    seen += 1;
                }
                (Some("settled"), Some(_), Some(id)) => {
                    settled.insert(id.to_owned());
                }
                _ => {}
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let (j, r) = Journal::open(settings(dir.clone())).unwrap();
        let back: Vec<String> = r
            .unsettled
            .iter()
            .map(|(_, p)| String::from_utf8(p.to_vec()).unwrap())
            .collect();
        let back_set: BTreeSet<_> = back.iter().cloned().collect();
        assert_eq!(back.len(), back_set.len(), "an order came back twice");
        // The child settles the even-numbered orders a commit later, which the parent may
        // not have read about before the kill: the odd-numbered ones are never settled, so
        // every one reported committed must be back.
        for id in committed.difference(&settled) {
            let n: u32 = id.rsplit("order").next().unwrap().parse().unwrap();
            assert!(
                n % 2 == 0 || back_set.contains(id),
                "run {run}: {id} was committed and is lost"
            );
        }
        for id in &settled {
            assert!(
                !back_set.contains(id),
                "run {run}: {id} was settled and came back"
            );
        }
        // Whatever else came back was appended by a child (committed, not yet reported).
        assert!(back.iter().all(|id| id.starts_with("run")));
        assert_eq!(j.unsettled(), back.len());
    }
}
