//! The detector's algorithms on synthetic traffic; no clock, no I/O.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use super::*;

/// A well-mixed hash of `i` (splitmix64), standing in for a client or a
/// signature hash.
fn h(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn settings() -> Settings {
    Settings {
        window: 1.0,
        baseline_tau: 30.0,
        learn: 10.0,
        trust_generation: 5,
        ..Settings::default()
    }
}

/// A normal window: `rate` requests from 200 returning clients, varied
/// signatures, with cookies.
fn normal_window(d: &mut Detector, rate: u64, offset: u64) {
    for i in 0..rate {
        d.observe(Sample {
            client: h(1_000_000 + (i + offset) % 200),
            signature: h(2_000_000 + (i * 7 + offset) % 40),
            has_cookie: true,
            route: None,
        });
    }
}

/// Twenty normal windows at 100 requests/s.
fn warmed() -> Detector {
    let mut d = Detector::new(settings());
    for w in 0..20 {
        normal_window(&mut d, 100, w);
        let (v, t) = d.tick();
        assert!(t.is_none());
        if w > 0 {
            assert_eq!(v.kind, Kind::Normal, "{v:?}");
        }
    }
    d
}

#[test]
fn ewma_converges_to_a_steady_rate() {
    let mut e = Ewma::new(10.0);
    assert!(!e.is_warm());
    e.update(100.0, 1.0);
    assert_eq!(e.value(), 100.0, "the first sample is taken as is");
    for _ in 0..100 {
        e.update(200.0, 1.0);
    }
    assert!((e.value() - 200.0).abs() < 0.01, "{}", e.value());
    // One second of a time constant of 10 s moves about 9.5% of the way.
    let mut f = Ewma::new(10.0);
    f.update(0.0, 1.0);
    f.update(100.0, 1.0);
    assert!((f.value() - 9.516).abs() < 0.01, "{}", f.value());
}

#[test]
fn heavy_hitters_are_found_in_bounded_memory_among_a_million_keys() {
    let mut s = SpaceSaving::new(64);
    for i in 0..1_000_000u64 {
        s.observe(h(i));
        // Five heavy keys, each 2% of the traffic.
        if i % 10 == 0 {
            s.observe(h(10_000_000 + (i / 10) % 5));
        }
    }
    assert_eq!(s.len(), 64, "never more counters than the capacity");
    let top: Vec<u64> = s.top(5).into_iter().map(|(k, _)| k).collect();
    for heavy in 0..5 {
        assert!(top.contains(&h(10_000_000 + heavy)), "heavy key {heavy} found");
    }
    assert_eq!(s.total(), 1_100_000);
}

#[test]
fn hyperloglog_estimates_distinct_counts_within_a_few_percent() {
    for n in [100u64, 10_000, 200_000] {
        let mut hll = Hll::default();
        for i in 0..n {
            hll.add(h(i));
            hll.add(h(i)); // repeats do not count
        }
        let e = hll.estimate();
        let error = (e - n as f64).abs() / n as f64;
        assert!(error < 0.08, "{n}: estimated {e:.0} ({:.1}% off)", error * 100.0);
    }
}

#[test]
fn the_memory_trusts_only_calm_visits_of_two_generations_never_a_spike() {
    let mut m = Memory::new(3);
    m.insert(h(1));
    assert!(!m.is_returning(h(1)), "new for the whole window it first appears in");
    m.commit(true);
    assert!(m.is_returning(h(1)));
    assert!(!m.is_trusted(h(1)), "one visit earns no trust");
    assert!(!m.is_returning(h(2)));
    // Two more calm windows: the same generation, still no trust.
    for _ in 0..2 {
        m.insert(h(1));
        m.commit(true);
    }
    assert!(!m.is_trusted(h(1)), "visits within one generation earn no trust");
    m.insert(h(1));
    m.commit(true);
    assert!(m.is_trusted(h(1)), "seen again a generation later: trusted");

    // A client seen once in calm, then part of a spike, then calm again a
    // generation later: tainted, never trusted.
    let mut m = Memory::new(1);
    m.insert(h(5));
    m.commit(true);
    m.insert(h(5));
    m.commit(false);
    m.insert(h(5));
    m.commit(true);
    assert!(m.is_returning(h(5)));
    assert!(!m.is_trusted(h(5)), "a spike's client earns no trust");
    // A client trusted before the spike keeps its trust.
    let mut m = Memory::new(1);
    for _ in 0..2 {
        m.insert(h(6));
        m.commit(true);
    }
    assert!(m.is_trusted(h(6)));
    m.insert(h(6));
    m.commit(false);
    assert!(m.is_trusted(h(6)), "trust earned before a spike is kept");

    // Trust decays: after TRUST_GENERATIONS generations without a visit.
    for _ in 0..TRUST_GENERATIONS {
        m.commit(true);
    }
    assert!(!m.is_trusted(h(6)) && !m.is_returning(h(6)), "forgotten");

    // False positives at 100k entries: 3 hashes in 2^20 bits give about
    // (1 - e^(-0.3))^3 = 1.7%, a small bias in the "new clients" share.
    let mut g = Memory::new(100);
    for i in 0..100_000 {
        g.insert(h(i));
    }
    g.commit(true);
    let false_positives = (1_000_000..1_010_000).filter(|i| g.is_returning(h(*i))).count();
    assert!(false_positives < 250, "{false_positives} false positives in 10,000");
}

#[test]
fn a_flash_crowd_of_varied_clients_is_legitimate() {
    let mut d = warmed();
    // 1,000 requests/s from 2,000 new clients, varied signatures, some with
    // cookies (returning visitors among them).
    for w in 0..5 {
        for i in 0..1000u64 {
            d.observe(Sample {
                client: h(5_000_000 + (w * 1000 + i) % 2000),
                signature: h(6_000_000 + i % 300),
                has_cookie: i % 3 == 0,
                route: None,
            });
        }
        let (v, t) = d.tick();
        assert_eq!(v.kind, Kind::FlashCrowd, "{v:?}");
        assert!(t.is_none(), "a flash crowd never enters attack mode");
        assert!(v.reasons[1].starts_with("flash crowd"), "{:?}", v.reasons);
    }
    assert!(!d.in_attack());
}

#[test]
fn eight_sources_at_a_high_rate_are_an_attack() {
    let mut d = warmed();
    let mut entered = None;
    for w in 0..3 {
        normal_window(&mut d, 100, w);
        for i in 0..2000u64 {
            d.observe(Sample {
                client: h(7_000_000 + i % 8),
                signature: h(8_000_000 + i % 20),
                has_cookie: false,
                route: None,
            });
        }
        let (v, t) = d.tick();
        assert_eq!(v.kind, Kind::Attack, "{v:?}");
        assert!(
            v.reasons.iter().any(|r| r.starts_with("few sources")),
            "{:?}",
            v.reasons
        );
        assert!(v.top_sources_share > 0.9);
        for k in 0..8 {
            assert!(
                v.top_sources.contains(&h(7_000_000 + k)),
                "the offending sources are named"
            );
        }
        if t.is_some() {
            entered = Some((w, t));
        }
    }
    let (window, transition) = entered.expect("entered attack mode");
    assert_eq!(window, 1, "after two attack windows (hysteresis)");
    assert!(matches!(transition, Some(Transition::Entered(ref reasons)) if reasons.len() >= 2));
    assert!(d.in_attack());
}

#[test]
fn two_hundred_sources_with_one_signature_are_an_attack() {
    let mut d = warmed();
    for w in 0..2 {
        normal_window(&mut d, 100, w);
        for i in 0..2000u64 {
            d.observe(Sample {
                client: h(9_000_000 + i % 200),
                signature: h(42),
                has_cookie: false,
                route: None,
            });
        }
        let (v, _) = d.tick();
        assert_eq!(v.kind, Kind::Attack, "{v:?}");
        assert!(
            v.reasons.iter().any(|r| r.starts_with("one signature")),
            "{:?}",
            v.reasons
        );
        assert!(
            v.reasons.iter().any(|r| r.starts_with("new clients without cookies")),
            "{:?}",
            v.reasons
        );
        assert!(
            !v.reasons.iter().any(|r| r.starts_with("few sources")),
            "200 sources are not few"
        );
    }
    assert!(d.in_attack());
}

#[test]
fn hysteresis_needs_consecutive_windows_both_ways() {
    let mut d = warmed();
    let flood = |d: &mut Detector| {
        for i in 0..2000u64 {
            d.observe(Sample {
                client: h(7_000_000 + i % 4),
                signature: h(1),
                has_cookie: false,
                route: None,
            });
        }
    };
    // One attack window, then calm: no attack mode.
    flood(&mut d);
    assert_eq!(d.tick().0.kind, Kind::Attack);
    normal_window(&mut d, 100, 0);
    assert!(d.tick().1.is_none());
    assert!(!d.in_attack());
    // Two in a row: attack mode.
    flood(&mut d);
    assert!(d.tick().1.is_none());
    flood(&mut d);
    assert!(matches!(d.tick().1, Some(Transition::Entered(_))));
    // Calm windows interrupted by an attack window start the count again.
    for _ in 0..5 {
        normal_window(&mut d, 100, 0);
        assert!(d.tick().1.is_none());
    }
    flood(&mut d);
    assert!(d.tick().1.is_none(), "still in attack mode");
    for i in 0..6 {
        normal_window(&mut d, 100, 0);
        let (_, t) = d.tick();
        if i < 5 {
            assert!(t.is_none(), "calm window {i}");
        } else {
            assert_eq!(t, Some(Transition::Left), "left after six calm windows");
        }
    }
    assert!(!d.in_attack());
}

#[test]
fn the_baseline_does_not_learn_from_attacks() {
    let mut d = warmed();
    let before = d.last_verdict().map(|v| v.baseline).unwrap_or(0.0);
    for _ in 0..20 {
        for i in 0..5000u64 {
            d.observe(Sample {
                client: h(7_000_000 + i % 8),
                signature: h(1),
                has_cookie: false,
                route: None,
            });
        }
        d.tick();
    }
    normal_window(&mut d, 100, 0);
    let (v, _) = d.tick();
    assert!(
        (v.baseline - before).abs() < 5.0,
        "baseline {} moved from {before}",
        v.baseline
    );
}

#[test]
fn quiet_traffic_is_never_a_spike() {
    let mut d = Detector::new(settings());
    // Below min_rate, even from one source, nothing is classified.
    for _ in 0..10 {
        for _ in 0..40 {
            d.observe(Sample {
                client: h(1),
                signature: h(1),
                has_cookie: false,
                route: None,
            });
        }
        assert_eq!(d.tick().0.kind, Kind::Normal);
    }
}

#[test]
fn an_ordinary_client_beside_a_few_heavy_sources_is_not_a_suspect() {
    let mut d = warmed();
    // 8 heavy sources and one client at the typical rate (100/s over 200
    // clients = 0.5/s; this one sends 2 in the window).
    for i in 0..2000u64 {
        d.observe(Sample {
            client: h(7_000_000 + i % 8),
            signature: h(1),
            has_cookie: false,
            route: None,
        });
    }
    for _ in 0..2 {
        d.observe(Sample {
            client: h(1_000_000),
            signature: h(2_000_000),
            has_cookie: true,
            route: None,
        });
    }
    let (v, _) = d.tick();
    assert_eq!(v.kind, Kind::Attack);
    assert_eq!(v.top_sources.len(), 8, "{:?}", v.top_sources);
    assert!(
        !v.top_sources.contains(&h(1_000_000)),
        "the ordinary client is not named"
    );
}

/// A window of the two-route site below: `busy` requests/s on route 0
/// from 500 returning clients and 10/s on the small route 1 (the login
/// page) from 50 of them, plus `attack` requests from 8 sources on route
/// 1.
fn two_route_window(d: &mut Detector, busy: u64, attack: u64, offset: u64) {
    for i in 0..busy {
        d.observe(Sample {
            client: h(1_000_000 + (i + offset) % 500),
            signature: h(2_000_000 + (i * 7 + offset) % 40),
            has_cookie: true,
            route: Some(0),
        });
    }
    for i in 0..10 {
        d.observe(Sample {
            client: h(1_000_000 + (i * 10 + offset) % 50),
            signature: h(3_000_000 + i % 3),
            has_cookie: true,
            route: Some(1),
        });
    }
    for i in 0..attack {
        d.observe(Sample {
            client: h(9_000_000 + i % 8),
            signature: h(3_000_000),
            has_cookie: false,
            route: Some(1),
        });
    }
}

#[test]
fn an_attack_on_one_small_route_is_seen_although_the_global_rate_barely_moves() {
    let mut d = Detector::with_routes(settings(), vec!["site".into(), "login".into()]);
    for w in 0..20 {
        two_route_window(&mut d, 1000, 0, w);
        let (v, t) = d.tick();
        assert_ne!(v.kind, Kind::Attack, "window {w}: {:?}", v.reasons);
        assert!(t.is_none());
    }
    // 8 sources send 240 requests/s to the login route: the whole site
    // goes from 1,010 to 1,250 requests/s (no spike), the route from 10
    // to 250.
    two_route_window(&mut d, 1000, 240, 100);
    let (v, t) = d.tick();
    assert_eq!(v.kind, Kind::Attack, "{:?}", v.reasons);
    assert!(t.is_none(), "enter_after is 2");
    assert!(
        v.reasons.iter().any(|r| r.starts_with("route login: few sources")),
        "{:?}",
        v.reasons
    );
    assert!(
        v.rate < 3.0 * v.baseline,
        "globally no spike: {} vs {}",
        v.rate,
        v.baseline
    );
    assert_eq!(v.top_sources.len(), 8, "the attackers, found on the route");
    two_route_window(&mut d, 1000, 240, 101);
    let (_, t) = d.tick();
    assert!(matches!(t, Some(Transition::Entered(_))));

    // The same numbers with only the global judgement: nothing seen.
    let mut global_only = Detector::new(settings());
    for w in 0..20 {
        two_route_window(&mut global_only, 1000, 0, w);
        global_only.tick();
    }
    two_route_window(&mut global_only, 1000, 240, 100);
    assert_eq!(global_only.tick().0.kind, Kind::Normal);
}

#[test]
fn a_flash_crowd_on_one_route_is_not_an_attack() {
    let mut d = Detector::with_routes(settings(), vec!["site".into(), "sale".into()]);
    for w in 0..20 {
        two_route_window(&mut d, 200, 0, w);
        d.tick();
    }
    // 3,000 new visitors with cookies and varied requests on the sale page.
    for i in 0..3000u64 {
        d.observe(Sample {
            client: h(5_000_000 + i),
            signature: h(6_000_000 + i % 300),
            has_cookie: true,
            route: Some(1),
        });
    }
    two_route_window(&mut d, 200, 0, 100);
    let (v, t) = d.tick();
    assert_eq!(v.kind, Kind::FlashCrowd, "{:?}", v.reasons);
    assert!(t.is_none());
}

/// One window of the cold start: 55 requests/s from six clients,
/// 45 of them from one browser-like client with a cookie.
fn heavy_client_window(d: &mut Detector) {
    for i in 0..55u64 {
        d.observe(Sample {
            client: if i < 45 { h(500) } else { h(501 + i % 5) },
            signature: h(600 + i % 7),
            has_cookie: true,
            route: None,
        });
    }
}

#[test]
fn a_cold_start_under_steady_traffic_learns_and_is_never_an_attack() {
    let mut d = Detector::new(Settings {
        learn: 10.0,
        ..settings()
    });
    for w in 0..60 {
        heavy_client_window(&mut d);
        let (v, t) = d.tick();
        assert_eq!(v.kind, Kind::Normal, "window {w}: {v:?}");
        assert!(t.is_none());
        assert_eq!(
            v.learning,
            w < 10,
            "the first 10 windows are learned from, not judged (window {w})"
        );
    }
    assert!(!d.in_attack());
}

#[test]
fn learn_zero_judges_from_the_first_window_and_max_rate_judges_while_learning() {
    // With learn = 0 the same cold start is judged at once (the old
    // behaviour, which the operator must ask for).
    let mut d = Detector::new(Settings {
        learn: 0.0,
        ..settings()
    });
    for i in 0..200u64 {
        d.observe(Sample {
            client: h(i % 4),
            signature: h(9),
            has_cookie: false,
            route: None,
        });
    }
    assert_eq!(d.tick().0.kind, Kind::Attack);
    // While learning, only the ceiling makes a spike.
    let mut d = Detector::new(Settings {
        learn: 100.0,
        max_rate: Some(150.0),
        ..settings()
    });
    for i in 0..140u64 {
        d.observe(Sample {
            client: h(i % 4),
            signature: h(9),
            has_cookie: false,
            route: None,
        });
    }
    assert_eq!(d.tick().0.kind, Kind::Normal, "under the ceiling: learned");
    for i in 0..2_000u64 {
        d.observe(Sample {
            client: h(100 + i % 4),
            signature: h(9),
            has_cookie: false,
            route: None,
        });
    }
    let (v, _) = d.tick();
    assert_eq!(v.kind, Kind::Attack, "{v:?}");
    assert!(
        v.reasons[0].contains("above max_rate 150/s while learning"),
        "{:?}",
        v.reasons
    );
}

#[test]
fn a_heavy_client_seen_before_a_flood_is_never_a_suspect() {
    let mut d = Detector::new(settings());
    // Learned: 200 ordinary clients plus one heavy client (an API partner)
    // sending 60 requests a window.
    for w in 0..30 {
        normal_window(&mut d, 100, w);
        for _ in 0..60 {
            d.observe(Sample {
                client: h(777),
                signature: h(778),
                has_cookie: false,
                route: None,
            });
        }
        let (v, _) = d.tick();
        assert_eq!(v.kind, Kind::Normal, "window {w}: {v:?}");
    }
    // The partner alone sending what it always sent is never a sign, even
    // when the rest of the traffic is quiet and its share is 100%.
    for _ in 0..5 {
        for _ in 0..60 {
            d.observe(Sample {
                client: h(777),
                signature: h(778),
                has_cookie: false,
                route: None,
            });
        }
        let (v, _) = d.tick();
        assert_ne!(v.kind, Kind::Attack, "{v:?}");
    }
    // A flood from 8 new sources: an attack, and the partner, still at
    // its usual rate, is not among the suspects.
    let mut entered = false;
    for w in 0..3 {
        normal_window(&mut d, 100, w);
        for _ in 0..60 {
            d.observe(Sample {
                client: h(777),
                signature: h(778),
                has_cookie: false,
                route: None,
            });
        }
        for i in 0..2000u64 {
            d.observe(Sample {
                client: h(7_000_000 + i % 8),
                signature: h(8_000_000 + i % 20),
                has_cookie: false,
                route: None,
            });
        }
        let (v, t) = d.tick();
        assert_eq!(v.kind, Kind::Attack, "{v:?}");
        assert!(!v.top_sources.contains(&h(777)), "the partner is no suspect: {v:?}");
        assert_eq!(v.top_sources.len(), 8, "{v:?}");
        entered |= t.is_some();
    }
    assert!(entered);
    // The same partner sending ten times its usual rate is a suspect.
    for _ in 0..600 {
        d.observe(Sample {
            client: h(777),
            signature: h(778),
            has_cookie: false,
            route: None,
        });
    }
    normal_window(&mut d, 100, 0);
    let (v, _) = d.tick();
    assert!(v.top_sources.contains(&h(777)), "a changed client is a suspect: {v:?}");
}

#[test]
fn a_rebuilt_detector_keeps_what_the_old_one_learned() {
    let old = {
        let mut d = Detector::with_routes(settings(), vec!["a".into(), "b".into()]);
        for w in 0..20 {
            normal_window(&mut d, 100, w);
            d.tick();
        }
        d
    };
    let mut d = Detector::with_routes(settings(), vec!["b".into(), "c".into()]);
    d.carry_over(&old);
    assert!(d.global.learned(&d.settings), "the whole proxy's traffic stays learned");
    assert!((d.global.baseline.value() - old.global.baseline.value()).abs() < 1e-9);
    assert!(d.routes[0].learned(&d.settings) == old.routes[1].learned(&old.settings));
    assert!(!d.routes[1].learned(&d.settings), "a new route learns from scratch");
    assert!(d.is_returning(h(1_000_000)), "returning clients are remembered");
}
