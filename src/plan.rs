//! What applying one config in place of another would change, for a person
//! to read before a reload (`portcullis plan`) and recorded after it (the
//! reload's audit record, the admin API's dry run): one [`Plan::between`],
//! rendered as text or JSON.
//!
//! Things are matched by name (listeners, routes, upstream groups) and
//! servers by group and address, as a reload matches the state it keeps,
//! so the plan says what the reload will keep and what it will start
//! afresh. Limits are compared as numbers: a smaller size, count, rate or
//! timeout is "tighten", a larger one "loosen"; a ladder step going from
//! shadow to enforce tightens. A change a reload cannot apply is marked
//! `restart`: the reload refuses it, with its path (the connection table's
//! caps and lists, the log, metrics and admin outputs).

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, ListenerConfig, ProtectMode, Rate, RouteConfig, UpstreamConfig};
use crate::routing::Router;

/// What a difference does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Add,
    Remove,
    Change,
    /// A limit or a protection made stricter.
    Tighten,
    /// A limit or a protection relaxed or removed.
    Loosen,
    /// A route no request can reach: every request it matches goes to
    /// another route.
    Unreachable,
    /// Cache entries go: the store is dropped or shrunk.
    Flush,
}

impl Action {
    fn word(self) -> &'static str {
        match self {
            Action::Add => "add",
            Action::Remove => "remove",
            Action::Change => "change",
            Action::Tighten => "tighten",
            Action::Loosen => "loosen",
            Action::Unreachable => "unreachable",
            Action::Flush => "flush",
        }
    }
}

/// One difference between two configs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Difference {
    pub action: Action,
    /// What it is about: `listener "public"`, `route "api"`, `server
    /// "app" 10.0.0.1:80`, or a config path such as `limits.max_uri_length`.
    pub subject: String,
    /// What changes: the fields, or `old -> new`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// A reload cannot apply it (the proxy must restart for it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
}

/// Every difference, in config order: listeners, routes, upstream groups,
/// limits and timeouts, protection, cache, the rest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub differences: Vec<Difference>,
}

impl Plan {
    /// What replacing `old` with `new` changes.
    pub fn between(old: &Config, new: &Config) -> Plan {
        let mut plan = Plan::default();
        plan.listeners(old, new);
        plan.routes(old, new);
        plan.upstreams(old, new);
        plan.limits(old, new);
        plan.protection(old, new);
        plan.cache(old, new);
        plan.rest(old, new);
        plan
    }

    pub fn is_empty(&self) -> bool {
        self.differences.is_empty()
    }

    /// The differences a reload cannot apply, by subject.
    pub fn restarts(&self) -> impl Iterator<Item = &Difference> {
        self.differences.iter().filter(|d| d.restart)
    }

    /// One line per difference, then a count.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for d in &self.differences {
            let _ = write!(out, "{:<12}{}", d.action.word(), d.subject);
            if !d.detail.is_empty() {
                let _ = write!(out, ": {}", d.detail);
            }
            if d.restart {
                out.push_str(" (restart needed)");
            }
            out.push('\n');
        }
        match self.differences.len() {
            0 => out.push_str("no changes\n"),
            1 => out.push_str("1 change\n"),
            n => {
                let _ = writeln!(out, "{n} changes");
            }
        }
        out
    }

    /// Adds a difference (the certificate part is added by the caller,
    /// which has the certificates loaded).
    pub fn push(&mut self, action: Action, subject: impl Into<String>, detail: impl Into<String>) {
        self.differences.push(Difference {
            action,
            subject: subject.into(),
            detail: detail.into(),
            restart: false,
        });
    }

    fn push_restart(&mut self, action: Action, subject: impl Into<String>, detail: impl Into<String>) {
        self.push(action, subject, detail);
        if let Some(last) = self.differences.last_mut() {
            last.restart = true;
        }
    }

    fn listeners(&mut self, old: &Config, new: &Config) {
        for l in &new.listeners {
            let subject = format!("listener {:?}", l.name);
            match old.listeners.iter().find(|o| o.name == l.name) {
                None => self.push(Action::Add, subject, format!("bind {}", addrs(l))),
                Some(o) if o != l => self.push(Action::Change, subject, listener_fields(o, l).join(", ")),
                Some(_) => {}
            }
        }
        for o in old
            .listeners
            .iter()
            .filter(|o| !new.listeners.iter().any(|l| l.name == o.name))
        {
            self.push(
                Action::Remove,
                format!("listener {:?}", o.name),
                format!("release {}", addrs(o)),
            );
        }
    }

    fn routes(&mut self, old: &Config, new: &Config) {
        for r in &new.routes {
            let subject = format!("route {:?}", r.name);
            match old.routes.iter().find(|o| o.name == r.name) {
                None => self.push(Action::Add, subject, describe_route(r, new)),
                Some(o) => {
                    let fields = route_fields(o, old, r, new);
                    if !fields.is_empty() {
                        self.push(Action::Change, subject.clone(), fields.join(", "));
                    }
                    self.rate_limit(&subject, o, r);
                }
            }
        }
        for o in old
            .routes
            .iter()
            .filter(|o| !new.routes.iter().any(|r| r.name == o.name))
        {
            self.push(Action::Remove, format!("route {:?}", o.name), "");
        }
        for (index, shadow) in unreachable(new) {
            let Some(route) = new.routes.get(index) else { continue };
            let by: Vec<String> = shadow
                .iter()
                .filter_map(|i| new.routes.get(*i))
                .map(|r| format!("{:?}", r.name))
                .collect();
            self.push(
                Action::Unreachable,
                format!("route {:?}", route.name),
                format!("every request it matches goes to route {}", by.join(", ")),
            );
        }
    }

    fn rate_limit(&mut self, subject: &str, old: &RouteConfig, new: &RouteConfig) {
        let subject = format!("{subject} rate_limit");
        match (&old.rate_limit, &new.rate_limit) {
            (None, Some(n)) => self.push(Action::Tighten, subject, format!("none -> {}", rate(&n.rate))),
            (Some(o), None) => self.push(Action::Loosen, subject, format!("{} -> none", rate(&o.rate))),
            (Some(o), Some(n)) if o.rate != n.rate => {
                self.push(
                    compare_rates(&o.rate, &n.rate),
                    subject,
                    format!("{} -> {}", rate(&o.rate), rate(&n.rate)),
                );
            }
            _ => {}
        }
    }

    fn upstreams(&mut self, old: &Config, new: &Config) {
        for u in &new.upstreams {
            let subject = format!("upstream {:?}", u.name);
            let Some(o) = old.upstreams.iter().find(|o| o.name == u.name) else {
                self.push(Action::Add, subject, format!("{} servers", u.servers.len()));
                continue;
            };
            let fields = upstream_fields(o, u);
            if !fields.is_empty() {
                self.push(Action::Change, subject, fields.join(", "));
            }
            self.servers(o, u);
        }
        for o in old
            .upstreams
            .iter()
            .filter(|o| !new.upstreams.iter().any(|u| u.name == o.name))
        {
            self.push(Action::Remove, format!("upstream {:?}", o.name), "");
        }
    }

    fn servers(&mut self, old: &UpstreamConfig, new: &UpstreamConfig) {
        let label = |s: &crate::config::ServerAddr| s.to_string();
        for s in &new.servers {
            let subject = format!("server {:?} {}", new.name, label(s));
            match old.servers.iter().find(|o| label(o) == label(s)) {
                None => self.push(Action::Add, subject, format!("weight {}", s.weight)),
                Some(o) if o.weight != s.weight => {
                    self.push(Action::Change, subject, format!("weight {} -> {}", o.weight, s.weight));
                }
                Some(_) => {}
            }
        }
        for o in old
            .servers
            .iter()
            .filter(|o| !new.servers.iter().any(|s| label(s) == label(o)))
        {
            self.push(Action::Remove, format!("server {:?} {}", old.name, label(o)), "");
        }
    }

    fn limits(&mut self, old: &Config, new: &Config) {
        let (a, b) = (&old.limits, &new.limits);
        let mut sizes = vec![
            (
                "limits.max_request_header_bytes",
                a.max_request_header_bytes as u64,
                b.max_request_header_bytes as u64,
            ),
            (
                "limits.max_header_count",
                a.max_header_count as u64,
                b.max_header_count as u64,
            ),
            (
                "limits.max_uri_length",
                a.max_uri_length as u64,
                b.max_uri_length as u64,
            ),
        ];
        sizes.push((
            "limits.max_request_body_bytes",
            a.max_request_body_bytes.unwrap_or(u64::MAX),
            b.max_request_body_bytes.unwrap_or(u64::MAX),
        ));
        for (path, o, n) in sizes {
            self.number(path, o, n, false);
        }
        let (a, b) = (&old.protect, &new.protect);
        let caps = [
            (
                "protect.max_connections",
                a.max_connections.map(|n| n as u64),
                b.max_connections.map(|n| n as u64),
            ),
            (
                "protect.max_connections_per_ip",
                a.max_connections_per_ip.map(u64::from),
                b.max_connections_per_ip.map(u64::from),
            ),
        ];
        for (path, o, n) in caps {
            self.number(path, o.unwrap_or(u64::MAX), n.unwrap_or(u64::MAX), true);
        }
        let (a, b) = (&old.timeouts, &new.timeouts);
        let timeouts = [
            ("timeouts.connect", a.connect, b.connect),
            ("timeouts.header_read", a.header_read, b.header_read),
            ("timeouts.keepalive_idle", a.keepalive_idle, b.keepalive_idle),
            (
                "timeouts.upstream_response_header",
                a.upstream_response_header,
                b.upstream_response_header,
            ),
            ("timeouts.request", a.request, b.request),
            ("timeouts.send", a.send, b.send),
            ("timeouts.tunnel_idle", a.tunnel_idle, b.tunnel_idle),
        ];
        for (path, o, n) in timeouts {
            if o != n {
                let action = if n < o { Action::Tighten } else { Action::Loosen };
                self.push(action, path, format!("{} -> {}", duration(o), duration(n)));
            }
        }
    }

    /// A limit where a smaller number is stricter; `u64::MAX` is "none".
    fn number(&mut self, path: &str, old: u64, new: u64, restart: bool) {
        if old == new {
            return;
        }
        let action = if new < old { Action::Tighten } else { Action::Loosen };
        let show = |n: u64| {
            if n == u64::MAX {
                "none".to_owned()
            } else {
                n.to_string()
            }
        };
        let detail = format!("{} -> {}", show(old), show(new));
        if restart {
            self.push_restart(action, path, detail);
        } else {
            self.push(action, path, detail);
        }
    }

    fn protection(&mut self, old: &Config, new: &Config) {
        let (a, b) = (&old.protect, &new.protect);
        self.step(
            "protect.adaptive",
            a.adaptive.as_ref().map(|s| s.mode),
            b.adaptive.as_ref().map(|s| s.mode),
        );
        if let (Some(o), Some(n)) = (&a.adaptive, &b.adaptive) {
            if o.mode == n.mode && o != n {
                self.push(Action::Change, "protect.adaptive", "settings (baselines start afresh)");
            }
        }
        self.step(
            "protect.bans",
            a.bans.as_ref().map(|s| s.mode),
            b.bans.as_ref().map(|s| s.mode),
        );
        self.step(
            "protect.load_shedding",
            a.load_shedding.as_ref().map(|s| s.mode),
            b.load_shedding.as_ref().map(|s| s.mode),
        );
        if a.new_connections_per_ip != b.new_connections_per_ip {
            let show = |r: &Option<Rate>| r.as_ref().map_or_else(|| "none".to_owned(), rate);
            let action = match (&a.new_connections_per_ip, &b.new_connections_per_ip) {
                (None, Some(_)) => Action::Tighten,
                (Some(_), None) => Action::Loosen,
                (Some(o), Some(n)) => compare_rates(o, n),
                (None, None) => Action::Change,
            };
            let detail = format!(
                "{} -> {}",
                show(&a.new_connections_per_ip),
                show(&b.new_connections_per_ip)
            );
            self.push_restart(action, "protect.new_connections_per_ip", detail);
        }
        let restart_only = [
            ("protect.allow / protect.deny", a.ip_filter == b.ip_filter),
            ("protect.evict_idle_after", a.evict_idle_after == b.evict_idle_after),
            ("protect.ipv6_prefix", a.ipv6_prefix == b.ipv6_prefix),
        ];
        for (path, same) in restart_only {
            if !same {
                self.push_restart(Action::Change, path, "");
            }
        }
        let others = [
            ("protect.challenge", a.challenge == b.challenge),
            (
                "protect.min_body_rate",
                a.min_body_rate == b.min_body_rate && a.body_rate_grace == b.body_rate_grace,
            ),
            (
                "protect.max_requests_per_connection",
                a.max_requests_per_connection == b.max_requests_per_connection,
            ),
            (
                "protect.h2_max_resets_per_second",
                a.h2_max_resets_per_second == b.h2_max_resets_per_second,
            ),
        ];
        for (path, same) in others {
            if !same {
                self.push(Action::Change, path, "");
            }
        }
    }

    /// A ladder step: off (`None`), shadow or enforce.
    fn step(&mut self, path: &str, old: Option<ProtectMode>, new: Option<ProtectMode>) {
        let rank = |m: Option<ProtectMode>| match m {
            None => 0,
            Some(ProtectMode::Shadow) => 1,
            Some(ProtectMode::Enforce) => 2,
        };
        let name = |m: Option<ProtectMode>| match m {
            None => "off",
            Some(ProtectMode::Shadow) => "shadow",
            Some(ProtectMode::Enforce) => "enforce",
        };
        if rank(old) != rank(new) {
            let action = if rank(new) > rank(old) {
                Action::Tighten
            } else {
                Action::Loosen
            };
            self.push(
                action,
                format!("{path}.mode"),
                format!("{} -> {}", name(old), name(new)),
            );
        }
    }

    fn cache(&mut self, old: &Config, new: &Config) {
        let caches = |c: &Config| c.routes.iter().any(|r| r.cache.is_some());
        match (caches(old), caches(new)) {
            (true, false) => self.push(Action::Flush, "cache", "no route caches any more: every entry goes"),
            (true, true) if new.cache.memory < old.cache.memory => self.push(
                Action::Flush,
                "cache.memory",
                format!(
                    "{} -> {}: the least recently used entries past the new budget go",
                    old.cache.memory, new.cache.memory
                ),
            ),
            (true, true) if new.cache != old.cache => self.push(Action::Change, "cache", cache_fields(old, new)),
            _ => {}
        }
    }

    fn rest(&mut self, old: &Config, new: &Config) {
        let sections = [
            ("server", old.server == new.server),
            ("request_id", old.request_id == new.request_id),
        ];
        for (path, same) in sections {
            if !same {
                self.push(Action::Change, path, "");
            }
        }
        let restart_only = [
            ("access_log", old.access_log == new.access_log),
            ("audit_log", old.audit_log == new.audit_log),
            ("metrics", old.metrics == new.metrics),
            ("admin", old.admin == new.admin),
        ];
        for (path, same) in restart_only {
            if !same {
                self.push_restart(Action::Change, path, "");
            }
        }
    }
}

/// The names of the fields that differ, from a list of fields.
macro_rules! fields {
    ($a:expr, $b:expr, $($field:ident),+ $(,)?) => {{
        let mut changed: Vec<&'static str> = Vec::new();
        $(
            if $a.$field != $b.$field {
                changed.push(stringify!($field));
            }
        )+
        changed
    }};
}

fn listener_fields(a: &ListenerConfig, b: &ListenerConfig) -> Vec<&'static str> {
    fields!(
        a,
        b,
        bind,
        protocol,
        tls,
        redirect_https_port,
        ip_filter,
        proxy_protocol
    )
}

fn route_fields(a: &RouteConfig, old: &Config, b: &RouteConfig, new: &Config) -> Vec<&'static str> {
    let mut changed = fields!(
        a,
        b,
        hosts,
        path,
        path_match,
        rewrite_prefix,
        preserve_host,
        allow_connect,
        raw_path,
        request_headers,
        response_headers,
        log_sample,
        ip_filter,
        challenge,
        cache,
    );
    let group = |r: &RouteConfig, c: &Config| c.upstreams.get(r.upstream).map(|u| u.name.clone());
    if group(a, old) != group(b, new) {
        changed.push("upstream");
    }
    // The rate limit has its own line; its key is a field.
    if a.rate_limit.as_ref().map(|r| &r.key) != b.rate_limit.as_ref().map(|r| &r.key)
        && a.rate_limit.is_some()
        && b.rate_limit.is_some()
    {
        changed.push("rate_limit.key");
    }
    changed
}

fn upstream_fields(a: &UpstreamConfig, b: &UpstreamConfig) -> Vec<&'static str> {
    fields!(
        a,
        b,
        protocol,
        pool_size,
        idle_timeout,
        resolve_interval,
        connect_timeout,
        response_header_timeout,
        tls,
        algorithm,
        sticky_cookie,
        health_check,
        outlier,
        slow_start,
        retry,
        per_try_timeout,
        max_requests,
        max_requests_per_server,
    )
}

fn cache_fields(old: &Config, new: &Config) -> String {
    let (a, b) = (&old.cache, &new.cache);
    fields!(
        a,
        b,
        memory,
        max_object_size,
        lock_timeout,
        heuristic_fraction,
        heuristic_max
    )
    .join(", ")
}

fn describe_route(r: &RouteConfig, config: &Config) -> String {
    let hosts: Vec<String> = r
        .hosts
        .iter()
        .map(|h| match h {
            crate::config::HostPattern::Exact(name) => name.clone(),
            crate::config::HostPattern::Wildcard(suffix) => format!("*{suffix}"),
        })
        .collect();
    let kind = match r.path_match {
        crate::config::PathMatch::Prefix => "prefix",
        crate::config::PathMatch::Exact => "exact",
    };
    let group = config.upstreams.get(r.upstream).map_or("?", |u| u.name.as_str());
    let host = if hosts.is_empty() {
        "any host".to_owned()
    } else {
        hosts.join(" ")
    };
    format!("{host} {} ({kind}) -> {group}", r.path)
}

fn addrs(l: &ListenerConfig) -> String {
    l.bind.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

fn rate(r: &Rate) -> String {
    format!("{}/{} burst {}", r.count, duration(r.period), r.burst)
}

/// Tighten when the new rate lets fewer requests through per second.
fn compare_rates(old: &Rate, new: &Rate) -> Action {
    let per_second = |r: &Rate| f64::from(r.count) / r.period.as_secs_f64().max(1e-9);
    let (o, n) = (per_second(old), per_second(new));
    if n < o || (n == o && new.burst < old.burst) {
        Action::Tighten
    } else if n > o || new.burst > old.burst {
        Action::Loosen
    } else {
        Action::Change
    }
}

fn duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else if ms % 60_000 != 0 || ms == 0 {
        format!("{}s", ms / 1000)
    } else if ms % 3_600_000 != 0 {
        format!("{}m", ms / 60_000)
    } else {
        format!("{}h", ms / 3_600_000)
    }
}

/// Routes of `config` that no request reaches, each with the routes that
/// take its requests: probed through the real router with the route's own
/// hosts (a wildcard by a name under it, no host by a name nothing else
/// claims) and paths (a prefix also by a path below it).
fn unreachable(config: &Config) -> Vec<(usize, Vec<usize>)> {
    let router = Router::with_case(&config.routes, config.server.path_case_insensitive);
    let mut out = Vec::new();
    for (index, route) in config.routes.iter().enumerate() {
        let hosts: Vec<Option<String>> = if route.hosts.is_empty() {
            vec![Some("portcullis-plan-probe.invalid".to_owned())]
        } else {
            route
                .hosts
                .iter()
                .map(|h| match h {
                    crate::config::HostPattern::Exact(name) => Some(name.clone()),
                    crate::config::HostPattern::Wildcard(suffix) => Some(format!("portcullis-plan-probe{suffix}")),
                })
                .collect()
        };
        let mut paths = vec![route.path.clone()];
        if route.path_match == crate::config::PathMatch::Prefix {
            let below = if route.path.ends_with('/') { "" } else { "/" };
            paths.push(format!("{}{below}portcullis-plan-probe", route.path));
        }
        let mut takers = Vec::new();
        let mut reached = false;
        for host in &hosts {
            for path in &paths {
                match router.route(host.as_deref(), path) {
                    Some(i) if i == index => reached = true,
                    Some(i) if !takers.contains(&i) => takers.push(i),
                    _ => {}
                }
            }
        }
        if !reached {
            out.push((index, takers));
        }
    }
    out
}

#[cfg(test)]
mod tests;
