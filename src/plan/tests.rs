//! `Plan::between` on pairs of configs, each rendering checked exactly.

use super::*;

/// A config with one listener, two routes and one group of two servers;
/// `edit` replaces text in it, `extra` is appended.
fn config(edits: &[(&str, &str)], extra: &str) -> Config {
    let mut text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
name = "api"
path = "/api"
upstream = "app"

[[routes]]
name = "site"
path = "/"
upstream = "app"

[upstreams.app]
servers = ["127.0.0.1:9001", "127.0.0.1:9002"]
"#
    .to_owned();
    for (from, to) in edits {
        assert!(text.contains(from), "{from}");
        text = text.replacen(from, to, 1);
    }
    text.push_str(extra);
    match Config::from_toml(&text, "plan test") {
        Ok(config) => config,
        Err(e) => panic!("{e}\n{text}"),
    }
}

fn plan(old: &Config, new: &Config) -> String {
    Plan::between(old, new).text()
}

#[test]
fn the_same_config_plans_nothing() {
    let c = config(&[], "");
    assert!(Plan::between(&c, &c).is_empty());
    assert_eq!(plan(&c, &c), "no changes\n");
}

#[test]
fn a_route_added_removed_and_changed() {
    let old = config(&[], "");
    let added = config(
        &[],
        "[[routes]]\nname = \"new\"\nhost = [\"a.example\", \"*.b.example\"]\npath = \"/new\"\npath_match = \"exact\"\nupstream = \"app\"\n",
    );
    assert_eq!(
        plan(&old, &added),
        "add         route \"new\": a.example *.b.example /new (exact) -> app\n1 change\n"
    );
    assert_eq!(plan(&added, &old), "remove      route \"new\"\n1 change\n");
    let changed = config(
        &[(
            "path = \"/api\"",
            "path = \"/v2\"\npreserve_host = false\nrequest_headers = { set = { x = \"1\" } }",
        )],
        "",
    );
    assert_eq!(
        plan(&old, &changed),
        "change      route \"api\": path, preserve_host, request_headers\n1 change\n"
    );
}

#[test]
fn a_route_moved_to_another_group() {
    let old = config(&[], "[upstreams.other]\nservers = [\"127.0.0.1:9100\"]\n");
    let new = config(
        &[(
            "path = \"/api\"\nupstream = \"app\"",
            "path = \"/api\"\nupstream = \"other\"",
        )],
        "[upstreams.other]\nservers = [\"127.0.0.1:9100\"]\n",
    );
    assert_eq!(plan(&old, &new), "change      route \"api\": upstream\n1 change\n");
}

#[test]
fn servers_added_removed_and_reweighted() {
    let old = config(&[], "");
    let new = config(
        &[(
            "servers = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]",
            "servers = [{ address = \"127.0.0.1:9001\", weight = 5 }, \"127.0.0.1:9003\"]",
        )],
        "",
    );
    assert_eq!(
        plan(&old, &new),
        "change      server \"app\" 127.0.0.1:9001: weight 1 -> 5\n\
         add         server \"app\" 127.0.0.1:9003: weight 1\n\
         remove      server \"app\" 127.0.0.1:9002\n3 changes\n"
    );
}

#[test]
fn group_settings_and_new_groups() {
    let old = config(&[], "");
    let new = config(
        &[(
            "servers = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]",
            "servers = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\nalgorithm = \"least_requests\"\nconnect_timeout = \"2s\"",
        )],
        "[upstreams.spare]\nservers = [\"127.0.0.1:9200\"]\n",
    );
    assert_eq!(
        plan(&old, &new),
        "change      upstream \"app\": connect_timeout, algorithm\n\
         add         upstream \"spare\": 1 servers\n2 changes\n"
    );
}

#[test]
fn rate_limits_tighten_and_loosen() {
    let old = config(&[], "");
    let limited = config(
        &[(
            "path = \"/api\"",
            "path = \"/api\"\nrate_limit = { rate = \"10/s\", burst = 20 }",
        )],
        "",
    );
    let stricter = config(
        &[(
            "path = \"/api\"",
            "path = \"/api\"\nrate_limit = { rate = \"5/s\", burst = 20 }",
        )],
        "",
    );
    assert_eq!(
        plan(&old, &limited),
        "tighten     route \"api\" rate_limit: none -> 10/1s burst 20\n1 change\n"
    );
    assert_eq!(
        plan(&limited, &stricter),
        "tighten     route \"api\" rate_limit: 10/1s burst 20 -> 5/1s burst 20\n1 change\n"
    );
    assert_eq!(
        plan(&stricter, &old),
        "loosen      route \"api\" rate_limit: 5/1s burst 20 -> none\n1 change\n"
    );
}

#[test]
fn limits_and_timeouts_say_which_way_and_the_connection_caps_need_a_restart() {
    let old = config(&[], "");
    let new = config(
        &[],
        "[limits]\nmax_uri_length = 4096\n[timeouts]\nheader_read = \"5s\"\nrequest = \"20m\"\n",
    );
    assert_eq!(
        plan(&old, &new),
        "tighten     limits.max_uri_length: 8192 -> 4096\n\
         tighten     timeouts.header_read: 15s -> 5s\n\
         loosen      timeouts.request: 15m -> 20m\n3 changes\n"
    );
    let plan = Plan::between(&old, &new);
    assert_eq!(plan.restarts().count(), 0, "listeners and limits apply on reload");
    let capped = config(&[], "[protect]\nmax_connections = 100\n");
    let plan = Plan::between(&old, &capped);
    let restarts: Vec<&str> = plan.restarts().map(|d| d.subject.as_str()).collect();
    assert_eq!(restarts, ["protect.max_connections"]);
}

#[test]
fn ladder_steps_switched_on_off_and_between_modes() {
    let old = config(&[], "[protect.bans]\nmode = \"shadow\"\n");
    let new = config(
        &[],
        "[protect.bans]\nmode = \"enforce\"\n[protect.load_shedding]\nmode = \"shadow\"\n",
    );
    assert_eq!(
        plan(&old, &new),
        "tighten     protect.bans.mode: shadow -> enforce\n\
         tighten     protect.load_shedding.mode: off -> shadow\n2 changes\n"
    );
    assert_eq!(
        plan(&new, &config(&[], "")),
        "loosen      protect.bans.mode: enforce -> off\n\
         loosen      protect.load_shedding.mode: shadow -> off\n2 changes\n"
    );
}

#[test]
fn listeners_bound_released_and_changed() {
    let old = config(&[], "");
    let new = config(
        &[(
            "bind = \"127.0.0.1:8080\"",
            "bind = \"127.0.0.1:8081\"\nprotocol = \"http1\"",
        )],
        "[[listeners]]\nname = \"extra\"\nbind = \"127.0.0.1:8090\"\n",
    );
    let text = plan(&old, &new);
    assert_eq!(
        text,
        "change      listener \"public\": bind, protocol\n\
         add         listener \"extra\": bind 127.0.0.1:8090\n2 changes\n"
    );
    assert_eq!(
        plan(&new, &old),
        "change      listener \"public\": bind, protocol\n\
         remove      listener \"extra\": release 127.0.0.1:8090\n2 changes\n"
    );
}

#[test]
fn cache_changes_that_flush_entries() {
    let route = "[[routes]]\nname = \"static\"\npath = \"/static\"\nupstream = \"app\"\ncache = true\n";
    let old = config(&[], &format!("{route}[cache]\nmemory = \"64MiB\"\n"));
    let smaller = config(&[], &format!("{route}[cache]\nmemory = \"32MiB\"\n"));
    assert_eq!(
        plan(&old, &smaller),
        "flush       cache.memory: 67108864 -> 33554432: the least recently used entries past the new budget go\n1 change\n"
    );
    let larger = config(
        &[],
        &format!("{route}[cache]\nmemory = \"128MiB\"\nlock_timeout = \"1s\"\n"),
    );
    assert_eq!(
        plan(&old, &larger),
        "change      cache: memory, lock_timeout\n1 change\n"
    );
    assert_eq!(
        plan(&old, &config(&[], "")),
        "remove      route \"static\"\nflush       cache: no route caches any more: every entry goes\n2 changes\n"
    );
}

#[test]
fn a_route_shadowed_by_another_is_unreachable() {
    // With case-insensitive paths, /API and /api are the same path: the
    // first declared takes every request.
    let old = config(&[], "[server]\npath_case = \"insensitive\"\n");
    let new = config(
        &[],
        "[server]\npath_case = \"insensitive\"\n[[routes]]\nname = \"shouting\"\npath = \"/API\"\nupstream = \"app\"\n",
    );
    assert_eq!(
        plan(&old, &new),
        "add         route \"shouting\": any host /API (prefix) -> app\n\
         unreachable route \"shouting\": every request it matches goes to route \"api\"\n2 changes\n"
    );
}

#[test]
fn log_outputs_need_a_restart_and_the_json_says_so() {
    let old = config(&[], "");
    let new = config(&[], "[metrics]\nlisten = \"127.0.0.1:9100\"\n");
    let plan = Plan::between(&old, &new);
    assert_eq!(plan.text(), "change      metrics (restart needed)\n1 change\n");
    let json = serde_json::to_string(&plan).unwrap_or_default();
    assert_eq!(
        json,
        r#"{"differences":[{"action":"change","subject":"metrics","restart":true}]}"#
    );
}
