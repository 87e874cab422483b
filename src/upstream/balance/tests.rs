//! Table-driven tests of the balancing algorithms, with a seeded generator.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use super::*;

fn candidates(weights: &[u32]) -> Vec<Candidate> {
    weights
        .iter()
        .enumerate()
        .map(|(index, &weight)| Candidate {
            index,
            weight,
            in_flight: 0,
            latency_us: 1000.0,
        })
        .collect()
}

/// Runs `picks` picks with `concurrency` requests outstanding: each step
/// finishes one outstanding request chosen at random, then picks a server
/// for a new one. Servers with equal speed; latencies as given.
fn simulate(algorithm: &Algorithm, weights: &[u32], latencies: &[f64], picks: usize, concurrency: usize) -> Vec<usize> {
    let mut rng = Rng::seeded(42);
    let mut cands = candidates(weights);
    for (c, l) in cands.iter_mut().zip(latencies) {
        c.latency_us = *l;
    }
    let mut rr = RoundRobinState::default();
    let ring = Ring::default();
    let mut outstanding: Vec<usize> = Vec::new();
    let mut counts = vec![0usize; weights.len()];
    for _ in 0..picks {
        if outstanding.len() >= concurrency {
            // A slower server finishes its requests less often.
            loop {
                let i = rng.below(outstanding.len() as u64) as usize;
                let server = outstanding[i];
                let min_latency = latencies.iter().cloned().fold(f64::MAX, f64::min);
                let p = min_latency / latencies[server];
                if (rng.below(1_000_000) as f64) < p * 1_000_000.0 {
                    outstanding.swap_remove(i);
                    cands[server].in_flight -= 1;
                    break;
                }
            }
        }
        let chosen = pick(algorithm, &cands, Some(&mut rr), &ring, None, &mut rng).expect("a server");
        cands[chosen].in_flight += 1;
        outstanding.push(chosen);
        counts[chosen] += 1;
    }
    counts
}

fn assert_shares(name: &str, counts: &[usize], weights: &[u32], tolerance: f64) {
    let total: usize = counts.iter().sum();
    let weight_total: u32 = weights.iter().sum();
    for (i, (&count, &weight)) in counts.iter().zip(weights).enumerate() {
        let share = count as f64 / total as f64;
        let expected = f64::from(weight) / f64::from(weight_total);
        eprintln!(
            "{name}: server {i} weight {weight}: {:.4} (expected {expected:.4})",
            share
        );
        assert!(
            (share - expected).abs() <= tolerance,
            "{name}: server {i} got {share:.4}, expected {expected:.4} +- {tolerance}"
        );
    }
}

#[test]
fn distributions_follow_the_weights_over_100k_picks() {
    let weights = [5, 3, 1, 1];
    let equal = [1000.0; 4];
    let table: &[(&str, Algorithm, f64)] = &[
        ("round_robin", Algorithm::RoundRobin, 0.001),
        ("random", Algorithm::Random, 0.01),
        ("least_requests", Algorithm::LeastRequests, 0.03),
        ("p2c_ewma", Algorithm::P2cEwma, 0.05),
    ];
    for (name, algorithm, tolerance) in table {
        let counts = simulate(algorithm, &weights, &equal, 100_000, 40);
        assert_shares(name, &counts, &weights, *tolerance);
    }
}

#[test]
fn smooth_round_robin_has_no_bursts() {
    // nginx's smooth weighted round robin, weights 5,1,1.
    let cands = candidates(&[5, 1, 1]);
    let mut rr = RoundRobinState::default();
    let mut rng = Rng::seeded(1);
    let ring = Ring::default();
    let sequence: Vec<usize> = (0..700)
        .map(|_| pick(&Algorithm::RoundRobin, &cands, Some(&mut rr), &ring, None, &mut rng).expect("pick"))
        .collect();
    assert_eq!(&sequence[..7], &[0, 0, 1, 0, 2, 0, 0]);
    let longest = sequence
        .chunk_by(|a, b| a == b)
        .map(|run| run.len())
        .max()
        .expect("runs");
    // Within a cycle the heavy server never runs more than twice; across a
    // cycle boundary (a a | a a) four, against five in a row for plain WRR.
    assert_eq!(longest, 4);
    assert_eq!(sequence.iter().filter(|&&s| s == 0).count(), 500);
}

#[test]
fn least_requests_prefers_the_idle_server_and_breaks_ties_at_random() {
    let mut cands = candidates(&[1, 1, 1]);
    cands[0].in_flight = 3;
    cands[1].in_flight = 0;
    cands[2].in_flight = 0;
    let mut rng = Rng::seeded(7);
    let mut seen = [0usize; 3];
    for _ in 0..1000 {
        seen[least_requests(&cands, &mut rng)] += 1;
    }
    assert_eq!(seen[0], 0);
    assert!(seen[1] > 400 && seen[2] > 400, "{seen:?}");
    // Weight-aware: weight 4 with 3 in flight (score 1) beats weight 1 with 1 (score 2).
    let mut cands = candidates(&[4, 1]);
    cands[0].in_flight = 3;
    cands[1].in_flight = 1;
    assert_eq!(least_requests(&cands, &mut rng), 0);
}

#[test]
fn p2c_prefers_the_faster_of_two_servers() {
    let counts = simulate(&Algorithm::P2cEwma, &[1, 1], &[1000.0, 5000.0], 10_000, 20);
    let fast_share = counts[0] as f64 / 10_000.0;
    eprintln!("p2c: fast server share {fast_share:.3} with a 5x latency gap");
    assert!(fast_share > 0.75, "fast server share {fast_share}");
}

#[test]
fn consistent_hash_remaps_only_the_removed_servers_keys() {
    let ids: Vec<(String, u32)> = (0..10).map(|i| (format!("10.0.0.{i}:80"), 1)).collect();
    let full = Ring::new(&ids);
    let keys: Vec<u64> = (0..100_000u32).map(|k| hash64(&k.to_le_bytes())).collect();
    let before: Vec<usize> = keys
        .iter()
        .map(|&k| full.lookup(k, |_| true).expect("server"))
        .collect();

    // Removing server 3 (as an unusable server, or from the config: same ring
    // positions for everyone else) moves exactly its keys.
    let after: Vec<usize> = keys
        .iter()
        .map(|&k| full.lookup(k, |s| s != 3).expect("server"))
        .collect();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert!(before.iter().zip(&after).all(|(b, a)| b == a || *b == 3));
    let fraction = moved as f64 / keys.len() as f64;
    eprintln!("remove 1 of 10: {fraction:.4} of keys moved");
    assert!((fraction - 0.10).abs() < 0.03, "moved {fraction}");

    let mut without: Vec<(String, u32)> = ids.clone();
    without.remove(3);
    let rebuilt = Ring::new(&without);
    let map_back = |s: usize| if s >= 3 { s + 1 } else { s };
    let after_rebuild: Vec<usize> = keys
        .iter()
        .map(|&k| map_back(rebuilt.lookup(k, |_| true).expect("server")))
        .collect();
    assert_eq!(
        after, after_rebuild,
        "skipping a server equals removing it from the ring"
    );

    // Adding an eleventh server moves keys only onto it, about 1/11 of them.
    let mut more = ids.clone();
    more.push(("10.0.0.10:80".into(), 1));
    let bigger = Ring::new(&more);
    let grown: Vec<usize> = keys
        .iter()
        .map(|&k| bigger.lookup(k, |_| true).expect("server"))
        .collect();
    assert!(before.iter().zip(&grown).all(|(b, g)| b == g || *g == 10));
    let fraction = grown.iter().filter(|&&g| g == 10).count() as f64 / keys.len() as f64;
    eprintln!("add 1 to 10: {fraction:.4} of keys moved");
    assert!((fraction - 1.0 / 11.0).abs() < 0.03, "moved {fraction}");
}

#[test]
fn request_hash_keys() {
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("alice"));
    headers.insert("cookie", http::HeaderValue::from_static("a=1; session=\"xyz\"; b=2"));
    let ip: IpAddr = "192.0.2.7".parse().expect("ip");
    let mapped: IpAddr = "::ffff:192.0.2.7".parse().expect("ip");
    assert_eq!(
        request_hash(&HashKey::ClientIp, ip, &headers, "/"),
        request_hash(&HashKey::ClientIp, mapped, &headers, "/")
    );
    assert_eq!(
        request_hash(
            &HashKey::Header(http::HeaderName::from_static("x-user")),
            ip,
            &headers,
            "/"
        ),
        Some(hash64(b"alice"))
    );
    assert_eq!(
        request_hash(&HashKey::Cookie("session".into()), ip, &headers, "/"),
        Some(hash64(b"xyz"))
    );
    assert_eq!(request_hash(&HashKey::Cookie("none".into()), ip, &headers, "/"), None);
    assert_eq!(request_hash(&HashKey::Path, ip, &headers, "/a"), Some(hash64(b"/a")));
    assert_eq!(cookie(&headers, "b"), Some("2"));
}

#[test]
fn rng_below_is_roughly_uniform() {
    let mut rng = Rng::seeded(99);
    let mut buckets = [0u32; 10];
    for _ in 0..100_000 {
        buckets[rng.below(10) as usize] += 1;
    }
    assert!(buckets.iter().all(|&b| (9_500..=10_500).contains(&b)), "{buckets:?}");
}
