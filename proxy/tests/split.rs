//! Weighted and sticky splits through sockets: three test upstreams behind one route, the
//! shares counted at the upstreams.

mod support;

use fluxgate_conf::IoMode;
use support::{upstream, Behavior, RawClient};

fn gateway(extra: &str, ups: &[&support::Upstream]) -> fluxgate::Handle {
    let mut text = format!(
        "[[listener]]\naddress = \"127.0.0.1:0\"\n[[listener.route]]\npath_prefix = \"/\"\n\
         split = {{ targets = [{{ upstream = \"v1\", weight = 70 }}, {{ upstream = \"v2\", weight = 25 }}, \
         {{ upstream = \"v3\", weight = 5 }}]{extra} }}\n"
    );
    for (i, u) in ups.iter().enumerate() {
        text += &format!(
            "[[upstream]]\nname = \"v{}\"\nendpoints = [\"{}\"]\n",
            i + 1,
            u.addr
        );
    }
    support::start(&text, IoMode::Epoll)
}

fn counts(ups: &[&support::Upstream]) -> Vec<usize> {
    ups.iter().map(|u| u.requests()).collect()
}

fn get(c: &mut RawClient, headers: &str) {
    c.send(format!("GET / HTTP/1.1\r\nhost: t\r\n{headers}\r\n").as_bytes());
    assert_eq!(c.read_response().expect("an answer").status, 200);
}

#[test]
fn sticky_users_split_70_25_5_stay_put_and_a_header_forces_the_canary() {
    let (a, b, c) = (
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
    );
    let ups = [&a, &b, &c];
    let fg = gateway(
        ", sticky_header = \"x-user\", force_cookie = \"canary\"",
        &ups,
    );
    let mut client = RawClient::connect(fg.local_addrs()[0]);
    for i in 0..10_000 {
        get(&mut client, &format!("x-user: user-{i}\r\n"));
    }
    let n = counts(&ups);
    // 70 / 25 / 5 of 10,000 users, within 2 points each.
    for (got, want) in n.iter().zip([7_000usize, 2_500, 500]) {
        assert!(got.abs_diff(want) < 200, "{n:?}");
    }
    // A user comes back to the same upstream, request after request.
    for i in 0..30 {
        let before = counts(&ups);
        for _ in 0..5 {
            get(&mut client, &format!("x-user: user-{i}\r\n"));
        }
        let moved: Vec<usize> = counts(&ups)
            .iter()
            .zip(&before)
            .map(|(a, b)| a - b)
            .collect();
        assert!(moved.contains(&5), "user-{i} spread over {moved:?}");
    }
    // The tester's cookie names the canary, whatever the user's bucket.
    let before = counts(&ups);
    for i in 0..50 {
        get(
            &mut client,
            &format!("x-user: user-{i}\r\ncookie: a=1; canary=v3\r\n"),
        );
    }
    let after = counts(&ups);
    assert_eq!(after[2] - before[2], 50, "{before:?} -> {after:?}");
    fg.shutdown();
}

#[test]
fn without_a_user_key_requests_are_drawn_by_weight() {
    let (a, b, c) = (
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
        upstream(Behavior::Echo),
    );
    let ups = [&a, &b, &c];
    let fg = gateway("", &ups);
    let mut client = RawClient::connect(fg.local_addrs()[0]);
    for _ in 0..5_000 {
        get(&mut client, "");
    }
    let n = counts(&ups);
    for (got, want) in n.iter().zip([3_500usize, 1_250, 250]) {
        assert!(got.abs_diff(want) < 150, "{n:?}");
    }
    fg.shutdown();
}
