//! Weighted splits of a route's traffic between upstream targets (`[listener.route.split]`):
//! a forced target (a tester's header or cookie names it), else a sticky bucket per user
//! (`CRC32(user key + "YYYY-MM-DD") % 100`, so a user stays on one target for the UTC day
//! and the buckets move at midnight), else a weighted draw.

use fluxgate_conf::Split;

/// Days since 1970-01-01, UTC, of `now`.
pub fn day_of(now: std::time::SystemTime) -> i64 {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    secs.div_euclid(86_400)
}

/// `YYYY-MM-DD` of a day since the epoch (the proleptic Gregorian calendar).
pub fn date(day: i64) -> [u8; 10] {
    let (y, m, d) = fluxgate_wire::date::civil(day);
    let mut out = [b'0'; 10];
    let y = y.clamp(0, 9999) as u32;
    for (i, v) in [
        (0, y / 1000),
        (1, y / 100 % 10),
        (2, y / 10 % 10),
        (3, y % 10),
    ] {
        out[i] = b'0' + v as u8;
    }
    out[4] = b'-';
    out[5] = b'0' + (m / 10) as u8;
    out[6] = b'0' + (m % 10) as u8;
    out[7] = b'-';
    out[8] = b'0' + (d / 10) as u8;
    out[9] = b'0' + (d % 10) as u8;
    out
}

/// A user's bucket on `day`, 0 to 99.
pub fn bucket(user: &[u8], day: i64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(user);
    h.update(&date(day));
    h.finalize() % 100
}

/// The target (index into `split.targets`) of one request: the one `forced` names, else
/// the one `user`'s bucket falls in on `day`, else the one the draw `random` falls in;
/// `weight(i)` is target i's weight now (a rolled-back canary's is 0).
pub fn pick(
    split: &Split,
    weight: impl Fn(usize) -> u32,
    forced: Option<&[u8]>,
    user: Option<&[u8]>,
    day: i64,
    random: u64,
) -> usize {
    if let Some(f) = forced {
        if let Some(i) = split.targets.iter().position(|t| t.name.as_bytes() == f) {
            return i;
        }
    }
    let total: u64 = (0..split.targets.len()).map(|i| u64::from(weight(i))).sum();
    // A point in [0, total): the bucket scaled to the weights, or the draw.
    let at = match user {
        Some(u) => u64::from(bucket(u, day)) * total / 100,
        None => random % total.max(1),
    };
    let mut upto = 0;
    for i in 0..split.targets.len() {
        upto += u64::from(weight(i));
        if at < upto {
            return i;
        }
    }
    split.targets.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use fluxgate_conf::SplitTarget;

    fn split() -> Split {
        let t = |name: &str, weight| SplitTarget {
            upstream: 0,
            name: name.into(),
            weight,
            canary: false,
        };
        Split {
            targets: vec![t("v1", 70), t("v2", 25), t("v3", 5)],
            sticky: None,
            force: None,
            rollback: None,
        }
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(&date(0), b"1970-01-01");
        assert_eq!(&date(20_424), b"2025-12-02");
        assert_eq!(&date(19_782), b"2024-02-29");
        assert_eq!(&date(11_016), b"2000-02-29");
        let dec2 = std::time::UNIX_EPOCH + std::time::Duration::from_secs(20_424 * 86_400 + 86_399);
        assert_eq!(day_of(dec2), 20_424);
    }

    #[test]
    fn buckets_hold_for_a_day_and_move_across_days() {
        let s = split();
        let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
        let on = |day| -> Vec<usize> {
            users
                .iter()
                .map(|u| {
                    pick(
                        &s,
                        |i| s.targets[i].weight,
                        None,
                        Some(u.as_bytes()),
                        day,
                        0,
                    )
                })
                .collect()
        };
        let (d1, d2) = (on(20_424), on(20_425));
        assert_eq!(d1, on(20_424), "the same day, the same targets");
        let moved = d1.iter().zip(&d2).filter(|(a, b)| a != b).count();
        assert!(moved > 2_000, "only {moved} users moved at midnight");
        for day in [d1, d2] {
            let mut n = [0usize; 3];
            day.iter().for_each(|&t| n[t] += 1);
            // 70 / 25 / 5 of 10,000, within 2 points.
            for (got, want) in n.iter().zip([7_000, 2_500, 500]) {
                assert!(got.abs_diff(want) < 200, "{n:?}");
            }
        }
    }

    #[test]
    fn a_forced_target_wins_and_draws_follow_the_weights() {
        let s = split();
        assert_eq!(
            pick(
                &s,
                |i| s.targets[i].weight,
                Some(b"v3"),
                Some(b"anyone"),
                1,
                0
            ),
            2
        );
        assert_eq!(
            pick(&s, |i| s.targets[i].weight, Some(b"nope"), None, 1, 0),
            0
        );
        let mut n = [0usize; 3];
        for r in 0..100u64 {
            n[pick(&s, |i| s.targets[i].weight, None, None, 1, r)] += 1;
        }
        assert_eq!(n, [70, 25, 5]);
        // A target at weight 0 gets nothing; its share goes where `weight` puts it.
        let moved = |i: usize| [75, 25, 0][i];
        for r in 0..100u64 {
            assert_ne!(pick(&s, moved, None, None, 1, r), 2);
        }
    }
}
