//! Hot reload through real sockets: a steady load while the config file is reloaded 20
//! times (routes changing, one invalid config), with zero failed requests and every change
//! visible once its reload returns; listeners opening and closing; POST /reload.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fluxgate::Server;
use fluxgate_conf::Config;
use support::*;

fn config_text(up: std::net::SocketAddr, version: usize, extra_listener: bool) -> String {
    let mut t = format!(
        "[runtime]\nworkers = 2\nio = \"epoll\"\n[admin]\naddress = \"127.0.0.1:0\"\n\
         [[upstream]]\nname = \"app\"\nendpoints = [\"{up}\"]\n\
         [[listener]]\naddress = \"127.0.0.1:0\"\n\
         [[listener.route]]\npath = \"/version\"\nrespond = {{ status = 200, body = \"v{version}\" }}\n\
         [[listener.route]]\npath = \"/only-in-{version}\"\nrespond = {{ status = 200, body = \"here\" }}\n\
         [[listener.route]]\npath_prefix = \"/app/\"\nupstream = \"app\"\n"
    );
    if extra_listener {
        t.push_str("[[listener]]\naddress = \"127.0.0.1:0\"\nrespond = { status = 200, body = \"extra\" }\n");
    }
    t
}

#[test]
fn twenty_reloads_under_load_lose_nothing() {
    let up = upstream(Behavior::Echo);
    let dir = scratch("reload");
    let path = dir.join("fluxgate.toml");
    std::fs::write(&path, config_text(up.addr, 0, false)).unwrap();
    let fg = Server::start_from(Config::from_file(&path).unwrap(), Some(path.clone())).unwrap();
    let addr = fg.local_addrs()[0];
    let admin = fg.admin_addr().unwrap();

    // Steady load: keep-alive clients and new-connection clients, through the proxy path.
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..4)
        .map(|i| {
            let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut keep = RawClient::connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    let ok = if i % 2 == 0 {
                        keep.send(b"GET /app/x HTTP/1.1\r\nHost: x\r\n\r\n");
                        keep.read_response().is_some_and(|r| r.status == 200)
                    } else {
                        get(addr, "/app/y").status == 200
                    };
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    let body = |c: &mut RawClient| {
        c.send(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n");
        String::from_utf8(c.read_response().unwrap().body).unwrap()
    };
    let mut watcher = RawClient::connect(addr);
    assert_eq!(body(&mut watcher), "v0");
    let mut version = 0;
    for round in 1..=20 {
        if round == 11 {
            // An invalid config: refused, the running one carries on.
            std::fs::write(&path, "[[listener]]\naddress = \"nowhere\"\n").unwrap();
            let err = fg.reload_source().unwrap_err();
            assert!(err.contains("listener[0].address"), "{err}");
        } else {
            version = round;
            std::fs::write(&path, config_text(up.addr, version, false)).unwrap();
            fg.reload_source().unwrap();
        }
        // Visible at once, on a kept-alive connection and on a new one.
        assert_eq!(body(&mut watcher), format!("v{version}"), "round {round}");
        assert_eq!(get(addr, &format!("/only-in-{version}")).status, 200);
        if version > 1 {
            assert_eq!(get(addr, &format!("/only-in-{}", version - 1)).status, 404);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests during reloads"
    );
    assert!(done.load(Ordering::Relaxed) > 100);
    // The upstream's pool survived: its settings never changed.
    assert!(
        up.accepted() <= 12,
        "{} upstream connections",
        up.accepted()
    );

    let m = String::from_utf8(get(admin, "/metrics").body).unwrap();
    assert!(
        m.contains("fluxgate_config_reloads_total{result=\"ok\"} 19"),
        "{m}"
    );
    assert!(m.contains("fluxgate_config_reloads_total{result=\"failed\"} 1"));

    // A listener added by a reload opens; removed, it closes. POST /reload does the same.
    std::fs::write(&path, config_text(up.addr, version, true)).unwrap();
    let mut c = RawClient::connect(admin);
    c.send(b"POST /reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(c.read_response().unwrap().status, 200);
    let extra = fg.local_addrs()[1];
    assert_eq!(get(extra, "/").body, b"extra");
    std::fs::write(&path, config_text(up.addr, version, false)).unwrap();
    fg.reload_source().unwrap();
    assert_eq!(fg.local_addrs().len(), 1);
    assert!(eventually(Duration::from_secs(2), || {
        std::net::TcpStream::connect(extra).is_err()
    }));
    assert_eq!(get(addr, "/version").body, format!("v{version}").as_bytes());
    fg.shutdown();
}
