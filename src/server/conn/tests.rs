//! The connection's timers under paused tokio time: each fires at its
//! configured instant, measured by the clock the watchdog itself reads.

use super::*;

fn timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        header_read: Duration::from_secs(10),
        body_read: Duration::from_secs(30),
        keepalive_idle: Duration::from_secs(60),
        upstream_response_header: Duration::from_secs(30),
        request: Duration::from_secs(300),
        send: Duration::from_secs(20),
        tunnel_idle: Duration::from_secs(600),
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_request_head_is_due_one_header_timeout_after_accept() {
    let state = ConnState::new(None, &timeouts());
    let started = Instant::now();
    assert_eq!(state.expired(&timeouts()).await, Expiry::HeaderTimeout);
    assert_eq!(started.elapsed(), Duration::from_secs(10));
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_expires_at_the_idle_timeout_not_the_header_timeout() {
    let state = ConnState::new(None, &timeouts());
    drop(InFlight::new(&state, false));
    let started = Instant::now();
    assert_eq!(state.expired(&timeouts()).await, Expiry::Idle);
    assert_eq!(started.elapsed(), Duration::from_secs(60));
}

#[tokio::test(start_paused = true)]
async fn the_header_timer_runs_from_the_first_byte_of_the_next_head() {
    let state = ConnState::new(None, &timeouts());
    drop(InFlight::new(&state, false));
    tokio::time::advance(Duration::from_secs(30)).await;
    state.on_read();
    let started = Instant::now();
    assert_eq!(state.expired(&timeouts()).await, Expiry::HeaderTimeout);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(10),
        "from the byte, not from idle"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_is_cut_at_its_deadline_once_its_head_is_out() {
    let state = ConnState::new(None, &timeouts());
    let mut request = InFlight::new(&state, false);
    tokio::time::advance(Duration::from_secs(100)).await;
    request.arm_deadline();
    let started = Instant::now();
    assert_eq!(state.expired(&timeouts()).await, Expiry::RequestTimeout);
    assert_eq!(
        started.elapsed(),
        Duration::from_secs(200),
        "300 s from the request's start"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stalled_write_is_cut_after_the_send_timeout_and_progress_resets_it() {
    let state = ConnState::new(None, &timeouts());
    let _request = InFlight::new(&state, false);
    state.on_write_pending();
    tokio::time::advance(Duration::from_secs(15)).await;
    state.on_write_progress();
    state.on_write_pending();
    let started = Instant::now();
    assert_eq!(state.expired(&timeouts()).await, Expiry::SendTimeout);
    assert_eq!(started.elapsed(), Duration::from_secs(20));
    // The drain's own watch sees the same stall at once.
    let at = Instant::now();
    state.stalled(timeouts().send).await;
    assert_eq!(at.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn resets_are_counted_per_second() {
    let state = ConnState::new(None, &timeouts());
    for _ in 0..10 {
        state.count_reset(10);
    }
    tokio::time::advance(Duration::from_millis(1000)).await;
    // A new second: ten more are still within the limit.
    for _ in 0..10 {
        state.count_reset(10);
    }
    let aborted = tokio::time::timeout(Duration::from_millis(1), state.abort.notified()).await;
    assert!(aborted.is_err(), "ten per second is the limit, not past it");
    state.count_reset(10);
    let aborted = tokio::time::timeout(Duration::from_millis(1), state.abort.notified()).await;
    assert!(aborted.is_ok(), "the eleventh in one second aborts");
}
