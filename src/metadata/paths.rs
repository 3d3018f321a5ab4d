//! What a guest may ask the metadata service, and the answers: the EC2
//! (IMDSv1/v2) and NoCloud paths, as pure functions of one VM's data. The
//! asking VM's identity is decided by the transport (`server`), never here
//! and never from the request: whatever a path, query or header says, only
//! the `GuestData` given is ever read.

use axum::http::{HeaderMap, Method, StatusCode};
use serde_json::json;

use super::token::{TokenCheck, Tokens};
use super::GuestData;

/// The API versions an EC2 client may put before `meta-data/` (cloud-init's
/// Ec2 datasource asks `2009-04-04` and a few later dates, then `latest`).
pub const VERSIONS: [&str; 6] = [
    "1.0",
    "2009-04-04",
    "2016-09-02",
    "2018-09-24",
    "2021-03-23",
    "latest",
];

/// IMDSv2 headers.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Longest token lifetime AWS allows (6 h).
pub const MAX_TTL: u64 = 21_600;

/// One answer of the service.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// `text/plain` (listings, values, user-data, NoCloud YAML).
    Text(String),
    /// `application/json` (the instance identity document).
    Json(serde_json::Value),
    /// A new IMDSv2 token and its lifetime in seconds.
    Token(String, u64),
    /// An error: status, stable code, detail.
    Error(StatusCode, &'static str, String),
}

impl Reply {
    fn not_found() -> Self {
        Reply::Error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found: this is the guest metadata service (EC2 paths under \
             /latest/, NoCloud under /nocloud/)"
                .into(),
        )
    }
}

/// The request as this module sees it.
pub struct Ask<'a> {
    pub method: &'a Method,
    /// The raw path, without the query string, not percent-decoded.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// What an answer means for bookkeeping: the guest read its meta-data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    MetaData,
    Other,
}

/// Splits a path into its segments; `None` for anything that is not a
/// plain path (empty inner segments, `.`/`..`, percent-escapes): such
/// paths name nothing here.
fn segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Some(Vec::new());
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let plain = segs.iter().all(|s| {
        !s.is_empty()
            && *s != "."
            && *s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.=:".contains(&b))
    });
    plain.then_some(segs)
}

fn lines(items: &[String]) -> String {
    items.join("\n")
}

/// Answers one request for the VM `data`.
pub fn answer(ask: &Ask<'_>, data: &GuestData, tokens: &Tokens) -> (Reply, Fetch) {
    let Some(segs) = segments(ask.path) else {
        return (Reply::not_found(), Fetch::Other);
    };
    let get = *ask.method == Method::GET || *ask.method == Method::HEAD;
    // IMDSv2: a token, once shown, must be valid for this VM.
    if ask.method == Method::PUT && segs == ["latest", "api", "token"] {
        return (put_token(ask.headers, data, tokens), Fetch::Other);
    }
    if let Some(t) = ask.headers.get(TOKEN_HEADER) {
        match tokens.check(t.to_str().unwrap_or(""), &data.id) {
            TokenCheck::Valid => {}
            TokenCheck::Invalid => {
                return (
                    Reply::Error(
                        StatusCode::UNAUTHORIZED,
                        "unauthorized",
                        "X-aws-ec2-metadata-token is not a valid token of this instance \
                         (expired or unknown): PUT /latest/api/token for a new one"
                            .into(),
                    ),
                    Fetch::Other,
                )
            }
        }
    }
    let reply = match segs.as_slice() {
        [] => Some(Reply::Text(VERSIONS.join("\n"))),
        ["nocloud", rest @ ..] => nocloud(rest, data),
        [version, rest @ ..] if VERSIONS.contains(version) => ec2(rest, data),
        _ => None,
    };
    let Some(reply) = reply else {
        return (Reply::not_found(), Fetch::Other);
    };
    if !get {
        return (
            Reply::Error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Only GET (and PUT /latest/api/token) are served".into(),
            ),
            Fetch::Other,
        );
    }
    let fetch = match segs.as_slice() {
        [_, "meta-data", ..] => Fetch::MetaData,
        _ => Fetch::Other,
    };
    (reply, fetch)
}

fn put_token(headers: &HeaderMap, data: &GuestData, tokens: &Tokens) -> Reply {
    // As AWS: a token request that went through a proxy is refused, so a
    // proxy inside the guest cannot hand tokens to others.
    if headers.contains_key("x-forwarded-for") {
        return Reply::Error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Token requests with X-Forwarded-For are refused".into(),
        );
    }
    let ttl = headers
        .get(TTL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|t| (1..=MAX_TTL).contains(t));
    match ttl {
        Some(ttl) => Reply::Token(tokens.issue(&data.id, ttl), ttl),
        None => Reply::Error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!(
                "X-aws-ec2-metadata-token-ttl-seconds must be a whole number from 1 to {MAX_TTL}"
            ),
        ),
    }
}

/// The EC2 tree below a version: `meta-data/...`, `user-data`, `dynamic/...`.
fn ec2(rest: &[&str], d: &GuestData) -> Option<Reply> {
    let text = |s: String| Some(Reply::Text(s));
    match rest {
        [] => {
            let mut items = vec!["dynamic".to_string(), "meta-data".to_string()];
            if d.user_data.is_some() {
                items.push("user-data".into());
            }
            text(lines(&items))
        }
        ["user-data"] => d.user_data.clone().map(Reply::Text),
        ["dynamic"] => text("instance-identity/".into()),
        ["dynamic", "instance-identity"] => text("document".into()),
        ["dynamic", "instance-identity", "document"] => Some(Reply::Json(json!({
            "instanceId": d.id.as_str(),
            "privateIp": d.local_ip,
            "architecture": "x86_64",
            "instanceType": "vman",
            "imageId": "vman",
            "region": "vman",
            "availabilityZone": "vman",
            "version": "2017-09-30",
        }))),
        ["meta-data", key @ ..] => meta_data(key, d),
        _ => None,
    }
}

fn meta_data(key: &[&str], d: &GuestData) -> Option<Reply> {
    let text = |s: &str| Some(Reply::Text(s.to_owned()));
    match key {
        [] => {
            let mut items: Vec<String> = ["hostname", "instance-id", "local-hostname"]
                .map(String::from)
                .into();
            if d.local_ip.is_some() {
                items.push("local-ipv4".into());
            }
            items.extend(["mac".into(), "network/".into()]);
            if !d.ssh_keys.is_empty() {
                items.push("public-keys/".into());
            }
            Some(Reply::Text(lines(&items)))
        }
        ["instance-id"] => text(d.id.as_str()),
        ["hostname"] | ["local-hostname"] => text(&d.hostname),
        ["local-ipv4"] => d.local_ip.as_deref().and_then(text),
        ["mac"] => text(&d.mac),
        ["public-keys"] if !d.ssh_keys.is_empty() => Some(Reply::Text(lines(
            &(0..d.ssh_keys.len())
                .map(|i| format!("{i}=key{i}"))
                .collect::<Vec<_>>(),
        ))),
        ["public-keys", n] => key_index(n, d).map(|_| Reply::Text("openssh-key".into())),
        ["public-keys", n, "openssh-key"] => key_index(n, d).map(|k| Reply::Text(k.to_owned())),
        ["network"] => text("interfaces/"),
        ["network", "interfaces"] => text("macs/"),
        ["network", "interfaces", "macs"] => Some(Reply::Text(format!("{}/", d.mac))),
        ["network", "interfaces", "macs", mac, rest @ ..] if *mac == d.mac => match rest {
            [] => Some(Reply::Text(if d.local_ip.is_some() {
                "local-ipv4s\nmac".into()
            } else {
                "mac".into()
            })),
            ["mac"] => text(&d.mac),
            ["local-ipv4s"] => d.local_ip.as_deref().and_then(text),
            _ => None,
        },
        _ => None,
    }
}

/// The key at index `n` (a decimal without sign or leading zeros).
fn key_index<'a>(n: &str, d: &'a GuestData) -> Option<&'a str> {
    if n.len() > 1 && n.starts_with('0') {
        return None;
    }
    let i: usize = n.parse().ok()?;
    d.ssh_keys.get(i).map(String::as_str)
}

/// A YAML scalar written as a JSON string (YAML is a superset of JSON), so
/// no value can break out of its line.
fn yaml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// NoCloud (`ds=nocloud-net;s=http://169.254.169.254/nocloud/`): cloud-init
/// appends `meta-data`, `user-data`, `vendor-data` (and newer versions
/// `network-config`) to the seed URL.
///
/// `network-config` is not served (404): every vman network gives the
/// guest's one NIC its address by DHCP, which is exactly cloud-init's
/// fallback configuration, and a served one would have to match the NIC
/// the image names; cloud-init treats a missing one as "use the fallback".
fn nocloud(rest: &[&str], d: &GuestData) -> Option<Reply> {
    let keys_yaml = |indent: &str| {
        d.ssh_keys
            .iter()
            .map(|k| format!("{indent}- {}\n", yaml_str(k)))
            .collect::<String>()
    };
    match rest {
        [] => Some(Reply::Text("meta-data\nuser-data\nvendor-data".into())),
        ["meta-data"] => {
            let mut s = format!(
                "instance-id: {}\nlocal-hostname: {}\n",
                yaml_str(d.id.as_str()),
                yaml_str(&d.hostname)
            );
            if !d.ssh_keys.is_empty() {
                s.push_str("public-keys:\n");
                s.push_str(&keys_yaml("  "));
            }
            Some(Reply::Text(s))
        }
        ["user-data"] => Some(Reply::Text(match &d.user_data {
            Some(u) => u.clone(),
            None => {
                let mut s = format!(
                    "#cloud-config\nhostname: {}\npreserve_hostname: false\n",
                    yaml_str(&d.hostname)
                );
                if !d.ssh_keys.is_empty() {
                    s.push_str("ssh_authorized_keys:\n");
                    s.push_str(&keys_yaml("  "));
                }
                s
            }
        })),
        ["vendor-data"] => Some(Reply::Text("#cloud-config\n".into())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Name;

    fn vm() -> GuestData {
        GuestData {
            id: Name::parse("id", "vm-a").expect("name"),
            hostname: "alpha".into(),
            user_data: None,
            ssh_keys: vec!["ssh-ed25519 AAAA a@b".into(), "ssh-rsa BBBB c@d".into()],
            mac: "52:54:00:12:34:56".into(),
            local_ip: Some("169.254.169.15".into()),
        }
    }

    fn get(path: &str, d: &GuestData) -> Reply {
        let tokens = Tokens::default();
        let headers = HeaderMap::new();
        answer(
            &Ask {
                method: &Method::GET,
                path,
                headers: &headers,
            },
            d,
            &tokens,
        )
        .0
    }

    fn text(s: &str) -> Reply {
        Reply::Text(s.into())
    }

    #[test]
    fn ec2_paths_answer_this_vm() {
        let d = vm();
        for v in VERSIONS {
            assert_eq!(
                get(&format!("/{v}/meta-data/instance-id"), &d),
                text("vm-a")
            );
        }
        assert_eq!(get("/latest/meta-data/hostname", &d), text("alpha"));
        assert_eq!(get("/latest/meta-data/local-hostname/", &d), text("alpha"));
        assert_eq!(
            get("/latest/meta-data/local-ipv4", &d),
            text("169.254.169.15")
        );
        assert_eq!(
            get("/latest/meta-data/public-keys", &d),
            text("0=key0\n1=key1")
        );
        assert_eq!(
            get("/latest/meta-data/public-keys/1/", &d),
            text("openssh-key")
        );
        assert_eq!(
            get("/latest/meta-data/public-keys/1/openssh-key", &d),
            text("ssh-rsa BBBB c@d")
        );
        assert_eq!(
            get(
                "/latest/meta-data/network/interfaces/macs/52:54:00:12:34:56/local-ipv4s",
                &d
            ),
            text("169.254.169.15")
        );
        assert!(
            matches!(get("/latest/meta-data/", &d), Reply::Text(t) if t.contains("public-keys/"))
        );
        assert!(matches!(
            get("/latest/user-data", &d),
            Reply::Error(StatusCode::NOT_FOUND, ..)
        ));
        let doc = get("/latest/dynamic/instance-identity/document", &d);
        assert!(matches!(doc, Reply::Json(j) if j["instanceId"] == "vm-a"));
    }

    #[test]
    fn tricks_and_unknown_paths_are_404() {
        let d = vm();
        for p in [
            "/vms",
            "/vms/vm-b/metadata",
            "/health",
            "/latest/meta-data/../../vms",
            "/latest//meta-data/hostname",
            "/latest/meta-data/%2e%2e/hostname",
            "/latest/meta-data/public-keys/2/openssh-key",
            "/latest/meta-data/public-keys/01/openssh-key",
            "/latest/meta-data/network/interfaces/macs/52:54:00:00:00:01/mac",
            "/2099-01-01/meta-data/hostname",
            "/nocloud/network-config",
            "latest/meta-data",
            "",
        ] {
            assert!(
                matches!(
                    get(p, &d),
                    Reply::Error(StatusCode::NOT_FOUND, "not_found", _)
                ),
                "{p}"
            );
        }
    }

    #[test]
    fn nocloud_without_user_data_makes_a_cloud_config() {
        let mut d = vm();
        let Reply::Text(md) = get("/nocloud/meta-data", &d) else {
            panic!("meta-data")
        };
        assert_eq!(
            md,
            "instance-id: \"vm-a\"\nlocal-hostname: \"alpha\"\npublic-keys:\n  - \"ssh-ed25519 AAAA a@b\"\n  - \"ssh-rsa BBBB c@d\"\n"
        );
        let Reply::Text(ud) = get("/nocloud/user-data", &d) else {
            panic!("user-data")
        };
        assert!(
            ud.starts_with("#cloud-config\nhostname: \"alpha\"\n"),
            "{ud}"
        );
        assert!(ud.contains("ssh_authorized_keys:\n  - \"ssh-ed25519 AAAA a@b\"\n"));
        d.user_data = Some("#!/bin/sh\necho hi\n".into());
        assert_eq!(get("/nocloud/user-data", &d), text("#!/bin/sh\necho hi\n"));
        assert_eq!(get("/nocloud/vendor-data", &d), text("#cloud-config\n"));
    }

    fn with(
        method: Method,
        path: &str,
        hs: &[(&str, &str)],
        tokens: &Tokens,
        d: &GuestData,
    ) -> Reply {
        let mut headers = HeaderMap::new();
        for (k, v) in hs {
            headers.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                v.parse().expect("value"),
            );
        }
        answer(
            &Ask {
                method: &method,
                path,
                headers: &headers,
            },
            d,
            tokens,
        )
        .0
    }

    #[test]
    fn imdsv2_tokens() {
        let (d, tokens) = (vm(), Tokens::default());
        let Reply::Token(t, 60) = with(
            Method::PUT,
            "/latest/api/token",
            &[(TTL_HEADER, "60")],
            &tokens,
            &d,
        ) else {
            panic!("token")
        };
        assert_eq!(
            with(
                Method::GET,
                "/latest/meta-data/hostname",
                &[(TOKEN_HEADER, &t)],
                &tokens,
                &d
            ),
            text("alpha")
        );
        assert!(matches!(
            with(
                Method::GET,
                "/latest/meta-data/hostname",
                &[(TOKEN_HEADER, "nope")],
                &tokens,
                &d
            ),
            Reply::Error(StatusCode::UNAUTHORIZED, ..)
        ));
        // Another VM's token is no token here.
        let mut other = vm();
        other.id = Name::parse("id", "vm-b").expect("name");
        assert!(matches!(
            with(
                Method::GET,
                "/latest/meta-data/hostname",
                &[(TOKEN_HEADER, &t)],
                &tokens,
                &other
            ),
            Reply::Error(StatusCode::UNAUTHORIZED, ..)
        ));
        for bad in ["0", "21601", "-1", "x", ""] {
            assert!(
                matches!(
                    with(
                        Method::PUT,
                        "/latest/api/token",
                        &[(TTL_HEADER, bad)],
                        &tokens,
                        &d
                    ),
                    Reply::Error(StatusCode::BAD_REQUEST, ..)
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            with(Method::PUT, "/latest/api/token", &[], &tokens, &d),
            Reply::Error(StatusCode::BAD_REQUEST, ..)
        ));
        assert!(matches!(
            with(
                Method::PUT,
                "/latest/api/token",
                &[(TTL_HEADER, "60"), ("x-forwarded-for", "1.2.3.4")],
                &tokens,
                &d
            ),
            Reply::Error(StatusCode::FORBIDDEN, ..)
        ));
        assert!(matches!(
            with(Method::POST, "/latest/meta-data/hostname", &[], &tokens, &d),
            Reply::Error(StatusCode::METHOD_NOT_ALLOWED, ..)
        ));
    }
}
