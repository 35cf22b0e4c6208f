//! The admin page (`GET /` on the admin listener), loaded in headless Chromium (Debian's
//! `chromium`, installed by scripts/deps.sh): it renders every section from `/status`
//! without a console error, and the screenshot shows each section's colour bar.

mod support;

use std::process::Command;

use fluxgate_conf::IoMode;
use support::{get, scratch};

/// The accent colour of each section's bar (as in admin.html), by section id.
const SECTIONS: [(&str, [u8; 3]); 5] = [
    ("listeners", [0x1f, 0x77, 0xb4]),
    ("routes", [0x2c, 0xa0, 0x2c]),
    ("upstreams", [0xff, 0x7f, 0x0e]),
    ("policy", [0x94, 0x67, 0xbd]),
    ("feeds", [0xd6, 0x27, 0x28]),
];

fn chromium(dir: &std::path::Path, extra: &[&str], url: &str) -> std::process::Output {
    Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=7000",
            "--window-size=1280,1400",
        ])
        .arg(format!("--user-data-dir={}", dir.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs (scripts/deps.sh installs it)")
}

/// Pixels of `rgb` in the PNG at `path`.
fn pixels_of(path: &std::path::Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = match info.color_type {
        png::ColorType::Rgba => 4,
        png::ColorType::Rgb => 3,
        other => panic!("screenshot in {other:?}"),
    };
    buf[..info.buffer_size()]
        .chunks_exact(step)
        .filter(|p| p[..3] == rgb)
        .count()
}

#[test]
fn the_admin_page_renders_every_section_in_chromium() {
    let up = support::upstream(support::Behavior::Echo);
    let canary = support::upstream(support::Behavior::Echo);
    let fg = support::start(
        &format!(
            "[admin]\naddress = \"127.0.0.1:0\"\n\
             [[feed]]\nname = \"md\"\n\
             [[listener]]\naddress = \"127.0.0.1:0\"\n\
             [[listener.route]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"u\"\n\
             [[listener.route]]\nname = \"shop\"\npath_prefix = \"/shop\"\n\
             split = {{ targets = [{{ upstream = \"u\", weight = 90 }}, {{ upstream = \"c\", weight = 10, canary = true }}], rollback = {{ error_rate = 0.5 }} }}\n\
             [[listener.route]]\nname = \"ticks\"\npath = \"/md\"\nfeed = {{ name = \"md\", role = \"subscribe\" }}\n\
             [[upstream]]\nname = \"u\"\nendpoints = [\"{}\"]\n\
             [upstream.breaker]\nconsecutive_failures = 5\n\
             [[upstream]]\nname = \"c\"\nendpoints = [\"{}\"]\n",
            up.addr, canary.addr
        ),
        IoMode::Epoll,
    );
    let addr = fg.local_addrs()[0];
    for _ in 0..20 {
        assert_eq!(get(addr, "/api/x").status, 200);
        assert_eq!(get(addr, "/shop").status, 200);
    }
    let admin = fg.admin_addr().unwrap();
    let page = get(admin, "/");
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let status = get(admin, "/status");
    assert_eq!(status.header("content-type"), Some("application/json"));
    let s: serde_json::Value = serde_json::from_slice(&status.body).expect("JSON");
    assert_eq!(s["listeners"][0]["routes"][0]["by_class"][1], 20);
    assert_eq!(s["upstreams"][0]["breaker"]["state"], "closed");
    assert_eq!(s["canaries"][0]["state"], "active");
    assert_eq!(s["feeds"][0]["name"], "md");

    let dir = scratch("admin-page");
    let url = format!("http://{admin}/");
    let dom = chromium(&dir.join("profile-dom"), &["--dump-dom"], &url);
    let html = String::from_utf8_lossy(&dom.stdout);
    let log = String::from_utf8_lossy(&dom.stderr);
    assert!(html.contains("data-errors=\"0\""), "{html}");
    let updates: u32 = html
        .split("data-updates=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        updates >= 2,
        "the page refreshed itself ({updates} updates): {html}"
    );
    for (id, _) in SECTIONS {
        assert!(html.contains(&format!("<section id=\"{id}\"")), "{id}");
    }
    for text in [
        "api",
        "→ u",
        "split u:90 c:10",
        "closed",
        "active",
        "md",
        &up.addr.to_string(),
    ] {
        assert!(html.contains(text), "{text:?} not rendered: {html}");
    }
    assert!(
        html.contains(&format!(
            "<span id=\"summary\">v{}",
            env!("CARGO_PKG_VERSION")
        )),
        "the summary reads /status: {html}"
    );
    assert!(
        !log.contains("Uncaught") && !log.contains(":ERROR:CONSOLE"),
        "{log}"
    );

    let shot = dir.join("admin.png");
    let out = chromium(
        &dir.join("profile-shot"),
        &[&format!("--screenshot={}", shot.display())],
        &url,
    );
    assert!(shot.exists(), "{}", String::from_utf8_lossy(&out.stderr));
    for (id, rgb) in SECTIONS {
        // Each bar is 40x14 plus an 8 px border down the section's height.
        let n = pixels_of(&shot, rgb);
        assert!(
            n > 500,
            "section {id}: {n} pixels of its colour in the screenshot"
        );
    }
    fg.shutdown();
}
