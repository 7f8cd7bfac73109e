//! Where the CLI finds the agent and its token.
//!
//! The server: `--server`/`PIER_SERVER`, else the config's `[api] listen`,
//! else `http://127.0.0.1:7370`. The config: `--config`/`PIER_CONFIG`,
//! else `/etc/pier/pier.toml` if it exists, else the defaults.
//!
//! The token: `PIER_TOKEN`, else the config's `[api] token`, else the
//! agent's token file `<data_dir>/api-token`, read only when the server is
//! this host's (a loopback address or the config's listen address), so
//! this host's token is never sent to another host.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::daemon::config::Config;

/// The config the packaged agent runs with.
pub const DEFAULT_CONFIG: &str = "/etc/pier/pier.toml";

/// The agent the CLI talks to, and how it authenticates.
#[derive(Debug, Clone)]
pub struct Conn {
    pub server: String,
    pub token: Option<String>,
    /// Why no token was found, with what to do; shown on a 401.
    pub token_problem: Option<String>,
    /// A config the user named that could not be used: a usage error.
    pub config_error: Option<String>,
}

fn host_of_url(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let auth = rest.split('/').next()?;
    let host = if let Some(r) = auth.strip_prefix('[') {
        r.split(']').next()?
    } else {
        auth.rsplit_once(':').map(|(h, _)| h).unwrap_or(auth)
    };
    Some(host.to_ascii_lowercase())
}

impl Conn {
    pub fn find(server: Option<String>, config: Option<PathBuf>) -> Conn {
        let explicit = config.is_some();
        let path = config.or_else(|| {
            let p = PathBuf::from(DEFAULT_CONFIG);
            p.exists().then_some(p)
        });
        let mut config_error = None;
        let mut config_problem = None;
        let cfg = match &path {
            None => Config::default(),
            Some(p) => match Config::load(p) {
                Ok(c) => c,
                Err(e) if explicit => {
                    config_error = Some(format!("--config: {e}"));
                    Config::default()
                }
                Err(e) => {
                    config_problem = Some(e.0);
                    Config::default()
                }
            },
        };
        let listen = cfg.api.listen;
        let server = server.unwrap_or_else(|| {
            let ip = if listen.ip().is_unspecified() {
                IpAddr::from([127, 0, 0, 1])
            } else {
                listen.ip()
            };
            format!("http://{}", std::net::SocketAddr::new(ip, listen.port()))
        });
        let (token, token_problem) = Self::token(&server, &cfg, listen.ip(), config_problem);
        Conn {
            server,
            token,
            token_problem,
            config_error,
        }
    }

    fn token(
        server: &str,
        cfg: &Config,
        listen: IpAddr,
        config_problem: Option<String>,
    ) -> (Option<String>, Option<String>) {
        if let Ok(t) = std::env::var("PIER_TOKEN")
            && !t.is_empty()
        {
            return (Some(t), None);
        }
        if let Some(t) = &cfg.api.token {
            return (Some(t.clone()), None);
        }
        let local = host_of_url(server).is_some_and(|h| {
            h == "localhost"
                || h.parse::<IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback() || ip == listen)
        });
        if !local {
            return (
                None,
                Some(format!(
                    "{server} is not this host's agent, so its token is not read from this host; set PIER_TOKEN to that agent's token (in its data dir, api-token)"
                )),
            );
        }
        match pier_api::token::read(&cfg.network.data_dir) {
            Ok(t) => (Some(t), None),
            Err(e) => {
                let mut p = e.0;
                if let Some(c) = config_problem {
                    p = format!("{p} (the config {DEFAULT_CONFIG} was not used: {c})");
                }
                (None, Some(p))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_hosts() {
        assert_eq!(
            host_of_url("http://127.0.0.1:7370").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(host_of_url("http://[::1]:7370").as_deref(), Some("::1"));
        assert_eq!(
            host_of_url("http://LocalHost:1").as_deref(),
            Some("localhost")
        );
        assert_eq!(host_of_url("https://x"), None);
    }
}
