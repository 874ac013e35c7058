//! Where an upstream's endpoints are: each configured URL names one host, and a host name
//! may stand for several addresses (a Kubernetes headless Service, compose `--scale`), each
//! of which is an endpoint of its own. Names are resolved at start and every
//! `proxy.dns_refresh_ms` after; endpoints come and go as the answer changes.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};

use async_trait::async_trait;
use hyper::header::HeaderValue;
use hyper::http::uri::Authority;

/// An upstream URL, parsed: `http://host[:port][/path]`.
#[derive(Clone, Debug)]
pub struct EndpointUrl {
    /// As configured, without a trailing slash: for logs.
    pub base: String,
    pub host: Host,
    pub port: u16,
    /// The `Host` header the upstream is sent: the URL's authority.
    pub host_header: HeaderValue,
    /// Path of the URL (empty, or starting with `/`), put in front of every request path.
    pub path: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    /// Resolved at start and again every refresh interval.
    Name(String),
}

#[derive(Debug, thiserror::Error)]
#[error("upstream url {0:?} must look like http://host[:port][/path]")]
pub struct InvalidUrl(String);

impl EndpointUrl {
    pub fn parse(url: &str) -> Result<Self, InvalidUrl> {
        let invalid = || InvalidUrl(url.to_owned());
        let base = url.trim_end_matches('/');
        let rest = base.strip_prefix("http://").ok_or_else(invalid)?;
        let (authority, path) = rest.find('/').map_or((rest, ""), |slash| rest.split_at(slash));
        let parsed = authority.parse::<Authority>().map_err(|_| invalid())?;
        let host = Some(parsed.host()).filter(|h| !h.is_empty() && !authority.contains('@')).ok_or_else(invalid)?;
        let port = match parsed.port_u16() {
            Some(port) => port,
            None if authority.len() == host.len() => 80,
            None => return Err(invalid()),
        };
        if path.contains(['?', '#']) {
            return Err(invalid());
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let host = match bare.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) => Host::Name(host.to_ascii_lowercase()),
        };
        Ok(Self {
            base: base.to_owned(),
            host,
            port,
            host_header: HeaderValue::from_str(authority).map_err(|_| invalid())?,
            path: path.to_owned(),
        })
    }

    pub fn is_named(&self) -> bool {
        matches!(self.host, Host::Name(_))
    }
}

/// Turns a host name into addresses. The gateway uses the system's resolver; tests give
/// their own, to change the answer as a DNS server would.
#[async_trait]
pub trait Resolve: Send + Sync + 'static {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// `getaddrinfo`, through Tokio: what `/etc/hosts`, `/etc/resolv.conf` and the cluster's
/// DNS say, every address of the name.
pub struct SystemResolver;

#[async_trait]
impl Resolve for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok(tokio::net::lookup_host((host, port)).await?.collect())
    }
}

/// One URL's addresses, or why the lookup failed (then the URL keeps its last addresses).
pub async fn addresses(url: &EndpointUrl, resolver: &dyn Resolve) -> io::Result<BTreeSet<SocketAddr>> {
    match &url.host {
        Host::Ip(ip) => Ok(BTreeSet::from([SocketAddr::new(*ip, url.port)])),
        Host::Name(name) => {
            let found: BTreeSet<SocketAddr> = resolver.resolve(name, url.port).await?.into_iter().collect();
            if found.is_empty() {
                return Err(io::Error::new(io::ErrorKind::NotFound, format!("{name} has no addresses")));
            }
            Ok(found)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_are_parsed_once_and_bad_ones_refused() {
        let url = EndpointUrl::parse("http://127.0.0.1:8081/").unwrap();
        assert_eq!((url.host.clone(), url.port, url.path.as_str()), (Host::Ip([127, 0, 0, 1].into()), 8081, ""));
        assert_eq!(url.host_header, "127.0.0.1:8081");
        let url = EndpointUrl::parse("http://Data-Service/base/").unwrap();
        assert_eq!((url.host.clone(), url.port, url.path.as_str()), (Host::Name("data-service".into()), 80, "/base"));
        assert_eq!(url.host_header, "Data-Service");
        let url = EndpointUrl::parse("http://[::1]:9/").unwrap();
        assert_eq!(url.host, Host::Ip("::1".parse().unwrap()));
        for bad in
            ["https://tls.example", "127.0.0.1:8081", "http://", "http://user@host", "http://h/p?q=1", "http://h:x"]
        {
            assert!(EndpointUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn an_address_is_its_own_answer_and_a_name_asks_the_resolver() {
        struct Two;
        #[async_trait]
        impl Resolve for Two {
            async fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
                assert_eq!(host, "svc");
                Ok(vec![SocketAddr::from(([10, 0, 0, 2], port)), SocketAddr::from(([10, 0, 0, 1], port))])
            }
        }
        let literal = EndpointUrl::parse("http://10.1.1.1:80").unwrap();
        assert_eq!(addresses(&literal, &Two).await.unwrap().len(), 1);
        let named = EndpointUrl::parse("http://svc:8081").unwrap();
        let found: Vec<_> = addresses(&named, &Two).await.unwrap().into_iter().collect();
        assert_eq!(found, vec![SocketAddr::from(([10, 0, 0, 1], 8081)), SocketAddr::from(([10, 0, 0, 2], 8081))]);
    }
}
