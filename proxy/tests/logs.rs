//! The gateway's own log lines, from the binary's stderr: every level in JSON, the text
//! format under a `FLUXGATE_LOG` filter, and repeats bounded per place in the code.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{dead_addr, eventually, scratch, spawn, Running};

const LIMIT: Duration = Duration::from_secs(10);

/// A config: `/ok` answered by the gateway, `/down` forwarded to an address nobody serves
/// (one failure ejects it), and `log` as the `[log]` section.
fn config(dir: &std::path::Path, dead: std::net::SocketAddr, log: &str) -> std::path::PathBuf {
    let path = dir.join("fluxgate.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\npath = \"/ok\"\nrespond = {{ status = 200, body = \"ok\" }}\n\
             [[listener.route]]\npath = \"/down\"\nupstream = \"dead\"\n\
             [[upstream]]\nname = \"dead\"\nendpoints = [\"{dead}\"]\n\
             passive = {{ consecutive_failures = 1, ejection = \"30s\" }}\n\
             [log]\n{log}\n"
        ),
    )
    .unwrap();
    path
}

fn request(g: &Running, raw: &str) -> String {
    let mut s = TcpStream::connect(g.addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn get(g: &Running, path: &str) -> String {
    request(
        g,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
}

fn lines(g: &Running) -> Vec<String> {
    g.log.lock().unwrap().clone()
}

fn signal(g: &Running, name: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{name}"), &g.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn stop(mut g: Running) {
    let _ = g.child.kill();
    let _ = g.child.wait();
}

#[test]
fn json_lines_come_at_every_level_with_their_fields() {
    let dir = scratch("logs-json");
    let dead = dead_addr();
    let path = config(&dir, dead.addr, "level = \"trace\"\nformat = \"json\"");
    let g = spawn(&["run", "-c", path.to_str().unwrap(), "--workers", "1"]);
    assert!(get(&g, "/ok").starts_with("HTTP/1.1 200"));
    assert!(get(&g, "/down").starts_with("HTTP/1.1 502"));
    assert!(request(&g, "NOT HTTP\r\n\r\n").starts_with("HTTP/1.1 400"));
    // A reload of a config that does not parse is refused, and says so as an error.
    std::fs::write(&path, "[[listener]]\naddress = \"nowhere\"\n").unwrap();
    signal(&g, "HUP");
    let want = |level: &str, message: &str| {
        let level = level.to_owned();
        let message = message.to_owned();
        move |v: &serde_json::Value| {
            v["level"] == level.as_str()
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(message.as_str()))
        }
    };
    let found = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        lines(&g)
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| pred(v))
    };
    assert!(
        eventually(LIMIT, || found(&want("ERROR", "reload refused")).is_some()),
        "{:#?}",
        lines(&g)
    );
    let every: Vec<serde_json::Value> = lines(&g)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(every
        .iter()
        .all(|v| v["timestamp"].is_string() && v["target"].is_string()));
    let listening = found(&want("INFO", "listening on")).expect("an info line");
    assert_eq!(listening["target"], "fluxgate::run");
    let ejected = found(&want("WARN", "endpoint ejected")).expect("a warning");
    assert_eq!(ejected["upstream"], "dead");
    assert_eq!(ejected["endpoint"], dead.addr.to_string());
    let failed = found(&want("DEBUG", "upstream exchange failed")).expect("a debug line");
    assert_eq!(failed["route"], "route1");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains(&dead.addr.to_string()),
        "{failed}"
    );
    let refused = found(&want("INFO", "request refused")).expect("a refusal");
    assert_eq!(
        (&refused["target"], &refused["status"]),
        (&"fluxgate::refusal".into(), &400.into())
    );
    assert_eq!(refused["client"], "127.0.0.1");
    let answered = found(&want("TRACE", "answered")).expect("a trace line");
    assert_eq!(answered["status"], 200);
    let error = found(&want("ERROR", "reload refused")).unwrap();
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("listener[0].address"),
        "{error}"
    );
    stop(g);
}

#[test]
fn text_lines_follow_the_environment_filter() {
    let dir = scratch("logs-text");
    let dead = dead_addr();
    let path = config(&dir, dead.addr, "level = \"trace\"");
    // FLUXGATE_LOG wins over [log] level: warnings and errors only.
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fluxgate"));
    cmd.env(
        "FLUXGATE_LOG",
        "warn,fluxgate::run=info,fluxgate::refusal=info",
    );
    let g = support::spawn_command(
        cmd,
        &["run", "-c", path.to_str().unwrap(), "--workers", "1"],
    );
    assert!(get(&g, "/down").starts_with("HTTP/1.1 502"));
    assert!(request(&g, "NOT HTTP\r\n\r\n").starts_with("HTTP/1.1 400"));
    assert!(eventually(LIMIT, || lines(&g)
        .iter()
        .any(|l| l.contains("request refused"))));
    let text = lines(&g);
    let rest = &text[..];
    let warn = rest
        .iter()
        .find(|l| l.contains("endpoint ejected"))
        .expect("the warning");
    // TIME  LEVEL target: message key=value ...
    let re = regex::Regex::new(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z +WARN fluxgate::upstream::pool: endpoint ejected after consecutive failures upstream=dead endpoint=127\.0\.0\.1:\d+ ejected_for=30s$").unwrap();
    assert!(re.is_match(warn), "{warn}");
    assert!(
        rest.iter()
            .any(|l| l.contains(" INFO fluxgate::refusal: request refused")),
        "{rest:#?}"
    );
    assert!(
        !rest
            .iter()
            .any(|l| l.contains(" DEBUG ") || l.contains(" TRACE ")),
        "{rest:#?}"
    );
    stop(g);
}

#[test]
fn repeats_past_the_bound_are_counted_in_one_line() {
    let dir = scratch("logs-repeats");
    let dead = dead_addr();
    let path = config(&dir, dead.addr, "repeats = 5");
    let g = spawn(&["run", "-c", path.to_str().unwrap(), "--workers", "1"]);
    let sent = 200;
    let started = std::time::Instant::now();
    for _ in 0..sent {
        assert!(request(&g, "NOT HTTP\r\n\r\n").starts_with("HTTP/1.1 400"));
    }
    let seconds = started.elapsed().as_secs() + 1;
    let suppressed = |g: &Running| -> u64 {
        lines(g)
            .iter()
            .filter(|l| {
                l.contains("repeated log lines suppressed") && l.contains("of=fluxgate::refusal")
            })
            .map(|l| {
                let n = l.split("suppressed=").nth(1).unwrap();
                n.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum()
    };
    let logged = || {
        lines(&g)
            .iter()
            .filter(|l| l.contains("request refused"))
            .count() as u64
    };
    assert!(
        eventually(LIMIT, || logged() + suppressed(&g) == sent),
        "{} logged, {} suppressed, of {sent}",
        logged(),
        suppressed(&g)
    );
    assert!(
        logged() <= 5 * (seconds + 1),
        "{} lines in {seconds} s",
        logged()
    );
    assert!(suppressed(&g) > 0);
    stop(g);
}
