//! The command line: `check` on broken configs (every error, with its path,
//! exit code 2), on a valid one (one line, exit 0), `--version`, `--help`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn portcullis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis")
}

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("portcullis.toml");
    std::fs::write(&path, text).expect("write config");
    let out = portcullis(&["check", "-c", path.to_str().expect("utf-8 path")]);
    let stderr = String::from_utf8_lossy(&out.stderr).replace(path.to_str().expect("path"), "FILE");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

const VALID_TAIL: &str = r#"
[[listeners]]
bind = "127.0.0.1:0"

[[routes]]
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:9"]
"#;

/// Each broken config and the exact error lines `check` must print.
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "false-positive defences (issue 18)",
        "[limits]\nbuffer_request_body = \"100MiB\"\nrequest_buffer_memory = \"1KiB\"\n[timeouts]\nbody_read = \"0s\"\n[protect.adaptive]\nlearn = \"2h\"\nmax_rate = 0\ntrust_after = \"1ms\"\n[protect.bans]\nnever_ban = [\"nope\"]\nmax_per_minute = 0\n",
        &[
            "limits.buffer_request_body: must be at most 64MiB (larger bodies stream)",
            "limits.request_buffer_memory: must be at least buffer_request_body and at most 1TiB",
            "protect.adaptive.learn: must be at most 1h (0s judges from the first window)",
            "protect.adaptive.max_rate: must be at least 1 request per second",
            "protect.adaptive.trust_after: must be between the window and 1h",
            "protect.bans.max_per_minute: must be between 1 and 1000000, found 0",
            "protect.bans.never_ban[0]: invalid IP address or CIDR \"nope\"",
            "timeouts.body_read: must be at least 1ms",
        ],
    ),
    (
        "protection sections",
        "[protect]\nmax_connections = 0\nmax_connections_per_ip = 2000000\nnew_connections_per_ip = \"fast\"\ndeny = [\"not-an-ip\"]\nallow = \"10.0.0.0/33\"\nmin_body_rate = \"fast\"\nmax_requests_per_connection = 0\n[protect.challenge]\ncookie = \"bad name\"\nlifetime = \"1s\"\n[protect.adaptive]\nmode = \"auto\"\nwindow = \"1ms\"\n[[routes]]\nupstream = \"app\"\nchallenge = \"sometimes\"\ndeny = [\"1.2.3.4/40\"]\n[routes.rate_limit]\nburst = 0\nkey = \"ip_prefix:99\"\n[[routes]]\npath = \"/x\"\nupstream = \"app\"\n[routes.rate_limit]\nrate = \"10/fortnight\"\n",
        &[
            "protect.adaptive.mode: unknown value \"auto\", expected one of \"off\", \"shadow\", \"enforce\"",
            "protect.adaptive.window: must be between 100ms and 5m",
            "protect.allow: invalid IP address or CIDR \"10.0.0.0/33\"",
            "protect.challenge.cookie: \"bad name\" is not a cookie name (letters, digits, '_', '-', '.')",
            "protect.challenge.lifetime: must be at least 1m",
            "protect.deny[0]: invalid IP address or CIDR \"not-an-ip\"",
            "protect.max_connections: must be between 1 and 10000000, found 0",
            "protect.max_connections_per_ip: must be between 1 and 1000000, found 2000000",
            "protect.max_requests_per_connection: must be at least 1",
            "protect.min_body_rate: \"fast\" is not a byte rate such as \"1KiB/s\"",
            "protect.new_connections_per_ip: \"fast\" is not a rate such as \"100/s\", \"6000/min\" or \"20/h\"",
            "routes[0].challenge: expected true, false or \"attack\", found \"sometimes\"",
            "routes[0].deny[0]: invalid IP address or CIDR \"1.2.3.4/40\"",
            "routes[0].rate_limit.burst: must be between 1 and 1000000000, found 0",
            "routes[0].rate_limit.key: unknown key \"ip_prefix:99\", expected \"client_ip\", \"ip_prefix:BITS\" (IPv4 bits; IPv6 uses /64), \"ip_prefix:V4BITS:V6BITS\", \"header:NAME\" or \"cookie:NAME\"",
            "routes[0].rate_limit.rate: required: a rate such as \"100/s\"",
            "routes[1].rate_limit.rate: \"10/fortnight\" is not a rate such as \"100/s\", \"6000/min\" or \"20/h\"",
        ],
    ),
    (
        "protection ladder sections",
        "[protect]\nh2_max_resets_per_second = 0\nh2_max_concurrent_streams = 200000\nevict_idle_after = \"soon\"\n[protect.load_shedding]\nmode = \"on\"\nmin_limit = 50\nmax_limit = 10\ntolerance = 0.5\nreserve = 1.5\nretry_after = \"0s\"\n[protect.bans]\nstrikes = 0\nwindow = \"0s\"\nmax_tracked = 5\n[protect.adaptive]\nsuspect_burst = 3\n[[listeners]]\nbind = \"127.0.0.1:0\"\nproxy_protocol = true\ndeny = [\"nope\"]\n",
        &[
            "listeners[0].deny[0]: invalid IP address or CIDR \"nope\"",
            "listeners[0].proxy_protocol: needs server.trusted_proxies: the load balancers allowed to send the header",
            "protect.adaptive.suspect_burst: needs suspect_rate",
            "protect.bans.max_tracked: must be between 100 and 10000000, found 5",
            "protect.bans.strikes: must be between 1 and 1000000, found 0",
            "protect.bans.window: must be between 1s and 7d",
            "protect.evict_idle_after: invalid duration \"soon\": expected a number then a unit, like \"5s\"",
            "protect.h2_max_concurrent_streams: must be between 1 and 100000, found 200000",
            "protect.h2_max_resets_per_second: must be between 1 and 1000000, found 0",
            "protect.load_shedding.min_limit: must not exceed max_limit (50 > 10)",
            "protect.load_shedding.mode: unknown value \"on\", expected one of \"off\", \"shadow\", \"enforce\"",
            "protect.load_shedding.reserve: must be a number from 0 to 0.9",
            "protect.load_shedding.retry_after: must be between 1s and 1h",
            "protect.load_shedding.tolerance: must be a number from 1 to 100",
        ],
    ),
    (
        "cache sections",
        "[cache]\nmemory = \"10KiB\"\nmax_object_size = 0\nlock_timeout = \"2m\"\nheuristic_fraction = 2.5\nheuristic_max = \"long\"\nsize = 1\n[[routes]]\nupstream = \"app\"\n[routes.cache]\nquery = \"shuffle\"\nignore_params = [\"a=b\"]\nkey_headers = [\"bad header\"]\nkey_cookies = [\"x;y\"]\nstale_if_error = \"soon\"\nexpose_tags = \"yes\"\nttl = 5\n[[routes]]\nupstream = \"app\"\npath = \"/b\"\ncache = 1\n",
        &[
            "cache.heuristic_fraction: must be between 0 and 1, found 2.5",
            "cache.heuristic_max: invalid duration \"long\": expected a number then a unit, like \"5s\"",
            "cache.lock_timeout: must be at most 60s",
            "cache.max_object_size: must be more than 0",
            "cache.memory: must be at least 1MiB, found 10240 bytes",
            "cache.size: unknown key, expected one of: heuristic_fraction, heuristic_max, lock_timeout, max_object_size, memory",
            "routes[0].cache.expose_tags: expected a boolean, found string",
            "routes[0].cache.ignore_params[0]: \"a=b\" is not a query parameter name",
            "routes[0].cache.key_cookies[0]: \"x;y\" is not a cookie name",
            "routes[0].cache.key_headers[0]: \"bad header\" is not a header name",
            "routes[0].cache.query: unknown value \"shuffle\", expected one of \"keep\", \"sort\", \"ignore\"",
            "routes[0].cache.stale_if_error: invalid duration \"soon\": expected a number then a unit, like \"5s\"",
            "routes[0].cache.ttl: unknown key, expected one of: credentials, expose_tags, ignore_client_no_cache, ignore_params, key_cookies, key_headers, query, stale_if_error, store_set_cookie",
            "routes[1].cache: expected a table, found integer",
        ],
    ),
    (
        "cache object size over half the memory",
        "[cache]\nmemory = \"4MiB\"\nmax_object_size = \"3MiB\"\n",
        &["cache.max_object_size: must be at most half of memory (2097152 bytes)"],
    ),
    (
        "observability sections",
        "[access_log]\nformat = \"xml\"\nfields = [\"time\", \"bogus\"]\nbuffer_records = 0\nredact_headers = [\"bad header\"]\ndestination = \"\"\n[request_id]\ntraceparent = \"make\"\nheader = \"x id\"\n[audit_log]\ncheckpoint_every = 0\n[metrics]\nlisten = \"nowhere\"\npath = \"metrics\"\n[[routes]]\nupstream = \"app\"\nlog_sample = 0\n",
        &[
            "access_log.buffer_records: must be between 1 and 1048576, found 0",
            "access_log.destination: expected \"stdout\", \"off\" or a file path",
            "access_log.fields[1]: unknown field \"bogus\", expected one of: time, request_id, trace_id, client_ip, peer_ip, method, scheme, host, path, query, protocol, status, bytes_in, bytes_out, duration_ms, upstream_header_ms, upstream, server, route, retries, cache, protection, tls_version, tls_cipher, user_agent, referer, error, complete, headers",
            "access_log.format: unknown value \"xml\", expected one of \"json\", \"common\", \"combined\"",
            "access_log.redact_headers[0]: \"bad header\" is not a header name",
            "audit_log.checkpoint_every: must be at least 1",
            "audit_log.path: required: the audit log file",
            "metrics.listen: \"nowhere\" is not an address such as \"127.0.0.1:9090\"",
            "metrics.path: \"metrics\" must start with \"/\" and have no spaces",
            "request_id.header: \"x id\" is not a header name",
            "request_id.traceparent: unknown value \"make\", expected one of \"pass\", \"create\"",
            "routes[0].log_sample: must be between 1 and 1000000, found 0",
        ],
    ),
    (
        "syntax error",
        "listeners = [\n",
        &["FILE:1:14: TOML syntax error: unclosed array, expected `]`"],
    ),
    (
        "missing sections",
        "",
        &[
            "listeners: at least one listener is required, such as [[listeners]] bind = \"0.0.0.0:8080\"",
            "routes: at least one route is required, such as [[routes]] upstream = \"app\"",
        ],
    ),
    (
        "misspelt key",
        "[[listeners]]\nbnd = \"127.0.0.1:8080\"\n[[routes]]\nupstream = \"app\"\n[upstreams.app]\nservers = [\"127.0.0.1:9\"]\n",
        &[
            "listeners[0].bind: required: the address to listen on, such as \"0.0.0.0:8080\"",
            "listeners[0].bnd: unknown key (did you mean \"bind\"?)",
        ],
    ),
    (
        "unknown top-level key",
        "colour = \"blue\"\n",
        &[
            "colour: unknown key, expected one of: access_log, admin, audit_log, cache, limits, listeners, metrics, protect, request_id, routes, server, timeouts, upstreams",
        ],
    ),
    (
        "wrong type",
        "[limits]\nmax_header_count = \"many\"\n",
        &["limits.max_header_count: invalid size \"many\": expected a number then a unit, like \"64KiB\""],
    ),
    (
        "unknown upstream",
        "[[routes]]\nupstream = \"app\"\n[[routes]]\nupstream = \"app\"\npath = \"/x\"\n[[routes]]\npath = \"/api\"\nupstream = \"api\"\n",
        &["routes[2].upstream: unknown upstream \"api\" (defined: \"app\")"],
    ),
    (
        "duplicate listener address",
        "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[[listeners]]\nbind = [\"127.0.0.1:8081\", \"127.0.0.1:8080\"]\n",
        &["listeners[1].bind[1]: address 127.0.0.1:8080 is already used by listeners[0].bind"],
    ),
    (
        "bad listen address and protocol",
        "[[listeners]]\nbind = \"localhost:80\"\nprotocol = \"h3\"\n",
        &[
            "listeners[0].bind: invalid socket address \"localhost:80\", expected IP:port such as \"0.0.0.0:8080\" or \"[::]:8080\"",
            "listeners[0].protocol: unknown value \"h3\", expected one of \"auto\", \"http1\", \"h2c\"",
        ],
    ),
    (
        "impossible timeouts",
        "[timeouts]\nconnect = \"5x\"\nheader_read = \"0s\"\nrequest = 30\nkeepalive_idle = \"0.5ms\"\nsend = \"0ms\"\ntunnel_idle = \"1x\"\n",
        &[
            "timeouts.connect: invalid duration \"5x\": unknown unit \"x\" (use ms, s, m, h or d)",
            "timeouts.header_read: must be at least 1ms",
            "timeouts.keepalive_idle: must be at least 1ms",
            "timeouts.request: expected a string, found integer",
            "timeouts.send: must be at least 1ms",
            "timeouts.tunnel_idle: invalid duration \"1x\": unknown unit \"x\" (use ms, s, m, h or d)",
        ],
    ),
    (
        "limits out of range",
        "[limits]\nmax_request_header_bytes = \"10MiB\"\nmax_uri_length = -1\n",
        &[
            "limits.max_request_header_bytes: must be between 1KiB and 1MiB, found 10MiB",
            "limits.max_uri_length: must not be negative, found -1",
        ],
    ),
    (
        "bad upstream servers",
        "[upstreams.app]\nservers = [\"10.0.0.1\", \"bad host:80\", \"10.0.0.2:0\"]\nprotocol = \"http3\"\n[upstreams.none]\nservers = []\n",
        &[
            "upstreams.app.protocol: unknown value \"http3\", expected one of \"http1\", \"h2c\", \"h2\"",
            "upstreams.app.servers[0]: invalid server \"10.0.0.1\": missing port, expected host:port such as \"10.0.0.1:8080\"",
            "upstreams.app.servers[1]: invalid server \"bad host:80\": \"bad host\" is neither an IP address nor a DNS name",
            "upstreams.app.servers[2]: invalid server \"10.0.0.2:0\": port 0 is not a server port",
            "upstreams.none.servers: must list at least one server",
        ],
    ),
    (
        "bad route fields",
        "[[routes]]\nhost = \"*.example.com:80\"\npath = \"api\"\nupstream = \"app\"\n[[routes]]\nupstream = \"app\"\npath_match = \"exact\"\nrewrite_prefix = \"/x\"\nrequest_headers = { set = { \"bad header\" = \"x\" } }\n",
        &[
            "routes[0].host: invalid host \"*.example.com:80\": a route host must not include a port",
            "routes[0].path: \"api\" must start with \"/\"",
            "routes[1].request_headers.set.\"bad header\": invalid header name \"bad header\"",
            "routes[1].rewrite_prefix: only applies to path_match = \"prefix\"",
        ],
    ),
    (
        "duplicate route",
        "[[routes]]\nupstream = \"app\"\npath = \"/a\"\n[[routes]]\nupstream = \"app\"\npath = \"/a\"\n",
        &["routes[1]: same host, path and path_match as routes[0]: it could never match"],
    ),
    (
        "duplicate route name",
        "[[routes]]\nname = \"api\"\nupstream = \"app\"\npath = \"/a\"\n[[routes]]\nname = \"api\"\nupstream = \"app\"\npath = \"/b\"\n",
        &[
            "routes[1].name: \"api\" is also the name of routes[0]: route names must be unique (logs, metrics and reloads refer to a route by its name)",
        ],
    ),
    (
        "bad method names",
        "[server]\nallowed_methods = [\"get\", \"\"]\n",
        &[
            "server.allowed_methods: must allow at least one method",
            "server.allowed_methods[0]: \"get\" is not a method name (upper-case letters, '-' and '_')",
            "server.allowed_methods[1]: \"\" is not a method name (upper-case letters, '-' and '_')",
        ],
    ),
    (
        "trusted line too long",
        "[protect.load_shedding]\ntrusted_wait = \"2m\"\n",
        &["protect.load_shedding.trusted_wait: must be at most 1m"],
    ),
    (
        "unknown framing choice",
        "[server]\nconflicting_framing = \"lenient\"\n",
        &["server.conflicting_framing: unknown value \"lenient\", expected one of \"reject\", \"chunked\""],
    ),
    (
        "untrusted proxy list",
        "[server]\ntrusted_proxies = [\"10.0.0.0/33\", \"::1\", 7]\n",
        &[
            "server.trusted_proxies[0]: invalid IP address or CIDR \"10.0.0.0/33\"",
            "server.trusted_proxies[2]: expected a string, found integer",
        ],
    ),
];

/// Adds a valid listener, route and upstream where a case has none, so
/// each case shows only its own errors.
fn with_missing_sections(config: &str) -> String {
    let mut text = config.to_owned();
    let parts = [
        ("[[listeners]]", "[[listeners]]\nbind = \"127.0.0.1:0\"\n"),
        ("[[routes]]", "[[routes]]\nupstream = \"app\"\n"),
        ("[upstreams.", "[upstreams.app]\nservers = [\"127.0.0.1:9\"]\n"),
    ];
    for (marker, section) in parts {
        if !config.contains(marker) {
            text.push('\n');
            text.push_str(section);
        }
    }
    text
}

#[test]
fn check_reports_every_error_with_its_path() {
    for (what, config, expected) in CASES {
        let text = match *what {
            "syntax error" | "missing sections" => (*config).to_owned(),
            _ => with_missing_sections(config),
        };
        let (code, stdout, stderr) = check(&text);
        assert_eq!(code, 2, "{what}: exit code\n{stderr}");
        assert_eq!(stdout, "", "{what}: nothing on stdout");
        let mut lines: Vec<&str> = stderr.lines().collect();
        let summary = lines.pop().unwrap_or("");
        assert_eq!(
            summary,
            format!("FILE: {} error(s)", expected.len()),
            "{what}:\n{stderr}"
        );
        assert_eq!(lines, expected.to_vec(), "{what}");
    }
}

#[test]
fn check_accepts_a_valid_config_with_one_line() {
    let (code, stdout, stderr) = check(VALID_TAIL);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.ends_with(": ok (1 listener(s), 1 route(s), 1 upstream(s))\n"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1);
}

#[test]
fn check_reports_an_unresolvable_upstream_name() {
    let (code, _, stderr) = check(&VALID_TAIL.replace("127.0.0.1:9", "no-such-host.invalid:80"));
    assert_eq!(code, 2);
    assert!(
        stderr.starts_with("upstreams.app.servers[0]: cannot resolve \"no-such-host.invalid:80\""),
        "{stderr}"
    );
}

#[test]
fn check_on_a_missing_file_names_it() {
    let out = portcullis(&["check", "-c", "/nonexistent/portcullis.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("/nonexistent/portcullis.toml: cannot read config file:"),
        "{stderr}"
    );
}

#[test]
fn the_examples_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).expect("examples dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = portcullis(&["check", "-c", path.to_str().expect("path")]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "expected example configs in examples/");
}

#[test]
fn version_and_help() {
    let out = portcullis(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("portcullis {}", env!("CARGO_PKG_VERSION"))
    );
    let out = portcullis(&["--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for sub in ["run", "check", "demo"] {
        assert!(help.contains(sub), "{help}");
    }
}

#[test]
fn run_refuses_an_invalid_config_without_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[listeners]]\nbind = \"nope\"\n").expect("write");
    let out = portcullis(&["run", "-c", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("listeners[0].bind: invalid socket address \"nope\""),
        "{stderr}"
    );
}

#[test]
fn check_reports_log_directories_that_do_not_exist_and_bad_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let short_key = dir.path().join("short.key");
    std::fs::write(&short_key, "tiny").expect("write key");
    let config = format!(
        "{VALID_TAIL}\n[access_log]\ndestination = \"/nonexistent/logs/access.log\"\n[audit_log]\npath = \"/nonexistent/audit/audit.jsonl\"\nhmac_key_file = {:?}\n",
        short_key.display().to_string()
    );
    let (code, _, stderr) = check(&config);
    assert_eq!(code, 2, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines[..3],
        [
            "access_log.destination: directory /nonexistent/logs does not exist",
            "audit_log.path: directory /nonexistent/audit does not exist",
            format!(
                "audit_log.hmac_key_file: {}: HMAC key too short (4 bytes; at least 16)",
                short_key.display()
            )
            .as_str(),
        ]
    );
}

#[test]
fn run_fails_clearly_when_a_log_file_cannot_be_opened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("portcullis.toml");
    // A directory where the log file should be: opening it for writing fails.
    let config = format!(
        "{VALID_TAIL}\n[access_log]\ndestination = {:?}\n",
        dir.path().display().to_string()
    );
    std::fs::write(&path, config).expect("write");
    let out = portcullis(&["run", "-c", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: cannot open access log: Is a directory",
            dir.path().display()
        )),
        "{stderr}"
    );
}

#[test]
fn plan_exits_0_for_nothing_1_for_changes_2_for_an_invalid_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let base = "[[listeners]]\nbind = \"127.0.0.1:8080\"\n[[routes]]\nname = \"site\"\npath = \"/\"\nupstream = \"app\"\n[upstreams.app]\nservers = [\"127.0.0.1:9001\"]\n";
    let old = write("old.toml", base);
    let same = write("same.toml", base);
    let more = write(
        "more.toml",
        &base.replace("[\"127.0.0.1:9001\"]", "[\"127.0.0.1:9001\", \"127.0.0.1:9002\"]"),
    );
    let broken = write(
        "broken.toml",
        &base.replace("upstream = \"app\"", "upstream = \"nowhere\""),
    );

    let out = portcullis(&["plan", &same, "--against", &old]);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
        (Some(0), "no changes\n")
    );
    let out = portcullis(&["plan", &more, "--against", &old]);
    assert_eq!(
        (out.status.code(), String::from_utf8_lossy(&out.stdout).as_ref()),
        (
            Some(1),
            "add         server \"app\" 127.0.0.1:9002: weight 1\n1 change\n"
        )
    );
    let out = portcullis(&["plan", &more, "--against", &old, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["differences"][0]["action"], "add");
    let out = portcullis(&["plan", &broken, "--against", &old]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("routes[0].upstream"),
        "{out:?}"
    );
    let out = portcullis(&["plan", &old]);
    assert_eq!(out.status.code(), Some(2), "--against or --admin is required");
}
