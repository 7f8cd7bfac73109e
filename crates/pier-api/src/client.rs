//! The typed client of the API, used by the CLI and by tests.

use std::marker::PhantomData;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use pier_model::api::{
    AutoscaleRequest, AutoscaleView, ErrorBody, ExposeRequest, NodeLabelsRequest, NodeView,
    PodView, Problem, Readiness, ReplicaSetView, Resource, RollbackRequest, ScaleRequest,
    SetImageRequest, VersionInfo, WatchEvent,
};
use pier_model::{Endpoint, Name, Namespace, ReplicaSet, Service};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ApiError;

/// 30 s: above the server's own request timeout (10 s by default), so the
/// server's 504 with its reason arrives first.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A client of one agent's API.
#[derive(Clone)]
pub struct Client {
    /// `http://host:port`, no trailing slash.
    base: String,
    token: Option<String>,
    http: HttpClient<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

fn list_path(kind: Resource, ns: Option<&Namespace>) -> String {
    match ns {
        Some(ns) if kind.namespaced() => {
            format!("{}/namespaces/{ns}/{kind}", pier_model::api::PREFIX)
        }
        _ => format!("{}/{kind}", pier_model::api::PREFIX),
    }
}

fn object_path(kind: Resource, ns: &Namespace, name: &Name) -> String {
    if kind.namespaced() {
        format!("{}/namespaces/{ns}/{kind}/{name}", pier_model::api::PREFIX)
    } else {
        format!("{}/{kind}/{name}", pier_model::api::PREFIX)
    }
}

impl Client {
    /// `base_url` is `http://HOST:PORT` (a path is not allowed). `token` is
    /// sent as a bearer token.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Client, ApiError> {
        let bad = |why: &str| ApiError::BadUrl {
            url: base_url.to_owned(),
            why: why.to_owned(),
        };
        let uri: Uri = base_url
            .parse()
            .map_err(|_| bad("write it as http://HOST:PORT, e.g. http://127.0.0.1:7370"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(bad(
                    "the agent's API speaks plain HTTP; use http:// (and a token off loopback)",
                ));
            }
            _ => {
                return Err(bad(
                    "write it as http://HOST:PORT, e.g. http://127.0.0.1:7370",
                ));
            }
        }
        let Some(auth) = uri.authority() else {
            return Err(bad("it has no host"));
        };
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("give only http://HOST:PORT, with no path"));
        }
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_nodelay(true);
        Ok(Client {
            base: format!("http://{auth}"),
            token: token.filter(|t| !t.is_empty()),
            http: HttpClient::builder(TokioExecutor::new()).build(http),
        })
    }

    /// The `http://host:port` this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn transport_error(&self, e: hyper_util::client::legacy::Error) -> ApiError {
        // Find the I/O error under the client's wrappers, for a plain reason.
        let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
        let mut io = None;
        while let Some(s) = src {
            if let Some(ioe) = s.downcast_ref::<std::io::Error>() {
                io = Some(ioe);
                break;
            }
            src = s.source();
        }
        let reason = match io {
            Some(ioe) => match ioe.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                std::io::ErrorKind::TimedOut => "connect timed out".to_owned(),
                _ => ioe.to_string(),
            },
            None => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(x) = src {
                    s.push_str(": ");
                    s.push_str(&x.to_string());
                    src = x.source();
                }
                s
            }
        };
        if e.is_connect() {
            ApiError::Unreachable {
                url: self.base.clone(),
                reason,
            }
        } else {
            ApiError::Transport {
                url: self.base.clone(),
                reason,
            }
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Incoming), ApiError> {
        let uri = format!("{}{path}", self.base);
        let mut b = Request::builder().method(method).uri(&uri);
        if let Some(t) = &self.token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        let req = b
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiError::BadUrl {
                url: uri.clone(),
                why: e.to_string(),
            })?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| self.transport_error(e))?;
        Ok((resp.status(), resp.into_body()))
    }

    async fn read_all(&self, path: &str, body: Incoming) -> Result<Bytes, ApiError> {
        body.collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| ApiError::Transport {
                url: format!("{}{path}", self.base),
                reason: format!("reading the answer: {e}"),
            })
    }

    fn status_error(status: StatusCode, body: &[u8]) -> ApiError {
        let message = match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => e.error,
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    format!("the agent answered {status}")
                } else {
                    format!(
                        "the agent answered {status}: {}",
                        text.chars().take(300).collect::<String>()
                    )
                }
            }
        };
        ApiError::Status {
            status: status.as_u16(),
            message,
        }
    }

    /// One request, its JSON answer decoded; an error status becomes
    /// [`ApiError::Status`] with the server's message.
    async fn call<R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<R, ApiError> {
        let fut = async {
            let (status, b) = self.send(method, path, body).await?;
            let bytes = self.read_all(path, b).await?;
            if !status.is_success() {
                return Err(Self::status_error(status, &bytes));
            }
            serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
                path: path.to_owned(),
                reason: e.to_string(),
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, fut)
            .await
            .map_err(|_| ApiError::Timeout {
                url: self.base.clone(),
                secs: REQUEST_TIMEOUT.as_secs(),
            })?
    }

    async fn call_body<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<R, ApiError> {
        let b = serde_json::to_vec(body).map_err(|e| ApiError::Decode {
            path: path.to_owned(),
            reason: format!("encoding the request: {e}"),
        })?;
        self.call(method, path, Some(b)).await
    }

    async fn text(&self, path: &str) -> Result<(StatusCode, String), ApiError> {
        let (status, b) = self.send(Method::GET, path, None).await?;
        let bytes = self.read_all(path, b).await?;
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// A one-time login code for the dashboard (`pier dashboard`).
    pub async fn dashboard_login(&self) -> Result<pier_model::api::DashboardLogin, ApiError> {
        self.call_body(
            Method::POST,
            &format!("{}/dashboard/logins", pier_model::api::PREFIX),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn version(&self) -> Result<VersionInfo, ApiError> {
        self.call(
            Method::GET,
            &format!("{}/version", pier_model::api::PREFIX),
            None,
        )
        .await
    }

    /// `true` when `/healthz` answers 200.
    pub async fn healthz(&self) -> Result<bool, ApiError> {
        Ok(self.text("/healthz").await?.0 == StatusCode::OK)
    }

    /// `/readyz`: 200 or 503, both with the checks.
    pub async fn readyz(&self) -> Result<Readiness, ApiError> {
        let (status, body) = self.text("/readyz").await?;
        serde_json::from_str(&body).map_err(|_| Self::status_error(status, body.as_bytes()))
    }

    /// `/metrics`, Prometheus text.
    pub async fn metrics(&self) -> Result<String, ApiError> {
        let (status, body) = self.text("/metrics").await?;
        if status != StatusCode::OK {
            return Err(Self::status_error(status, body.as_bytes()));
        }
        Ok(body)
    }

    pub async fn problems(&self) -> Result<Vec<Problem>, ApiError> {
        self.call(
            Method::GET,
            &format!("{}/problems", pier_model::api::PREFIX),
            None,
        )
        .await
    }

    /// Any kind, as raw JSON (the CLI's `-o json` of whatever it is asked).
    /// `ns` `None` means every namespace.
    pub async fn list_raw(
        &self,
        kind: Resource,
        ns: Option<&Namespace>,
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        self.call(Method::GET, &list_path(kind, ns), None).await
    }

    pub async fn list_nodes(&self) -> Result<Vec<NodeView>, ApiError> {
        self.call(Method::GET, &list_path(Resource::Nodes, None), None)
            .await
    }
    pub async fn get_node(&self, name: &Name) -> Result<NodeView, ApiError> {
        self.call(
            Method::GET,
            &object_path(Resource::Nodes, &Namespace::default(), name),
            None,
        )
        .await
    }

    pub async fn list_replicasets(
        &self,
        ns: Option<&Namespace>,
    ) -> Result<Vec<ReplicaSetView>, ApiError> {
        self.call(Method::GET, &list_path(Resource::ReplicaSets, ns), None)
            .await
    }
    pub async fn get_replicaset(
        &self,
        ns: &Namespace,
        name: &Name,
    ) -> Result<ReplicaSetView, ApiError> {
        self.call(
            Method::GET,
            &object_path(Resource::ReplicaSets, ns, name),
            None,
        )
        .await
    }
    /// Creates the replica set in its own namespace; 409 if it exists.
    pub async fn create_replicaset(&self, rs: &ReplicaSet) -> Result<ReplicaSetView, ApiError> {
        self.call_body(
            Method::POST,
            &list_path(Resource::ReplicaSets, Some(&rs.namespace)),
            rs,
        )
        .await
    }
    pub async fn scale_replicaset(
        &self,
        ns: &Namespace,
        name: &Name,
        req: &ScaleRequest,
    ) -> Result<ReplicaSetView, ApiError> {
        let path = format!("{}/scale", object_path(Resource::ReplicaSets, ns, name));
        self.call_body(Method::PUT, &path, req).await
    }
    /// Autoscales the set (`Some`), or turns its autoscaling off (`None`).
    pub async fn autoscale_replicaset(
        &self,
        ns: &Namespace,
        name: &Name,
        req: Option<&AutoscaleRequest>,
    ) -> Result<ReplicaSetView, ApiError> {
        let path = format!("{}/autoscale", object_path(Resource::ReplicaSets, ns, name));
        match req {
            Some(r) => self.call_body(Method::PUT, &path, r).await,
            None => self.call(Method::DELETE, &path, None).await,
        }
    }
    pub async fn get_autoscale(
        &self,
        ns: &Namespace,
        name: &Name,
    ) -> Result<AutoscaleView, ApiError> {
        let path = format!("{}/autoscale", object_path(Resource::ReplicaSets, ns, name));
        self.call(Method::GET, &path, None).await
    }
    /// Replaces the replica set's spec; a changed template is a new
    /// revision, rolled out.
    pub async fn replace_replicaset(&self, rs: &ReplicaSet) -> Result<ReplicaSetView, ApiError> {
        self.call_body(
            Method::PUT,
            &object_path(Resource::ReplicaSets, &rs.namespace, &rs.name),
            rs,
        )
        .await
    }
    /// A new image for the template: a new revision, rolled out.
    pub async fn set_image(
        &self,
        ns: &Namespace,
        name: &Name,
        image: &str,
    ) -> Result<ReplicaSetView, ApiError> {
        let path = format!("{}/image", object_path(Resource::ReplicaSets, ns, name));
        let req = SetImageRequest {
            image: image.to_owned(),
        };
        self.call_body(Method::PUT, &path, &req).await
    }
    /// An earlier revision's template becomes the next revision.
    pub async fn rollback_replicaset(
        &self,
        ns: &Namespace,
        name: &Name,
        to_revision: Option<u64>,
    ) -> Result<ReplicaSetView, ApiError> {
        let path = format!("{}/rollback", object_path(Resource::ReplicaSets, ns, name));
        self.call_body(Method::POST, &path, &RollbackRequest { to_revision })
            .await
    }
    /// Sets (`Some`) and removes (`None`) labels of a node.
    pub async fn label_node(
        &self,
        node: &Name,
        labels: std::collections::BTreeMap<String, Option<String>>,
    ) -> Result<serde_json::Value, ApiError> {
        let path = format!(
            "{}/labels",
            object_path(Resource::Nodes, &Namespace::default(), node)
        );
        self.call_body(Method::PATCH, &path, &NodeLabelsRequest { labels })
            .await
    }
    pub async fn delete_replicaset(&self, ns: &Namespace, name: &Name) -> Result<(), ApiError> {
        self.call::<serde_json::Value>(
            Method::DELETE,
            &object_path(Resource::ReplicaSets, ns, name),
            None,
        )
        .await
        .map(drop)
    }

    /// Apply (`write`) or diff an application.
    pub async fn apply_app(
        &self,
        spec: &pier_model::app::AppSpec,
        write: bool,
    ) -> Result<pier_model::app::AppPlan, ApiError> {
        let path = format!(
            "{}/namespaces/{}/apps/{}/{}",
            pier_model::api::PREFIX,
            spec.namespace,
            spec.name,
            if write { "apply" } else { "diff" }
        );
        self.call_body(Method::POST, &path, spec).await
    }
    /// Delete an application and everything it owns.
    pub async fn delete_app(
        &self,
        ns: &Namespace,
        name: &Name,
    ) -> Result<pier_model::app::AppPlan, ApiError> {
        let path = format!("{}/namespaces/{ns}/apps/{name}", pier_model::api::PREFIX);
        self.call(Method::DELETE, &path, None).await
    }
    /// Applications, in one namespace or all.
    pub async fn list_apps(
        &self,
        ns: Option<&Namespace>,
    ) -> Result<Vec<pier_model::app::AppView>, ApiError> {
        let path = match ns {
            Some(ns) => format!("{}/namespaces/{ns}/apps", pier_model::api::PREFIX),
            None => format!("{}/apps", pier_model::api::PREFIX),
        };
        self.call(Method::GET, &path, None).await
    }

    pub async fn list_pods(&self, ns: Option<&Namespace>) -> Result<Vec<PodView>, ApiError> {
        self.call(Method::GET, &list_path(Resource::Pods, ns), None)
            .await
    }
    pub async fn get_pod(&self, ns: &Namespace, name: &Name) -> Result<PodView, ApiError> {
        self.call(Method::GET, &object_path(Resource::Pods, ns, name), None)
            .await
    }
    /// Deletes the pod's record; the supervisor replaces it.
    pub async fn delete_pod(&self, ns: &Namespace, name: &Name) -> Result<(), ApiError> {
        self.call::<serde_json::Value>(Method::DELETE, &object_path(Resource::Pods, ns, name), None)
            .await
            .map(drop)
    }

    pub async fn list_services(&self, ns: Option<&Namespace>) -> Result<Vec<Service>, ApiError> {
        self.call(Method::GET, &list_path(Resource::Services, ns), None)
            .await
    }
    pub async fn get_service(&self, ns: &Namespace, name: &Name) -> Result<Service, ApiError> {
        self.call(
            Method::GET,
            &object_path(Resource::Services, ns, name),
            None,
        )
        .await
    }
    /// Creates a service (with selector or static endpoints); the agent
    /// allocates its VIP and node ports.
    pub async fn create_service(&self, svc: &Service) -> Result<Service, ApiError> {
        self.call_body(
            Method::POST,
            &list_path(Resource::Services, Some(&svc.namespace)),
            svc,
        )
        .await
    }
    /// `pier expose rs`: a service whose selector is the replica set.
    pub async fn expose_replicaset(
        &self,
        ns: &Namespace,
        rs: &Name,
        req: &ExposeRequest,
    ) -> Result<Service, ApiError> {
        let path = format!("{}/expose", object_path(Resource::ReplicaSets, ns, rs));
        self.call_body(Method::POST, &path, req).await
    }
    pub async fn delete_service(&self, ns: &Namespace, name: &Name) -> Result<(), ApiError> {
        self.call::<serde_json::Value>(
            Method::DELETE,
            &object_path(Resource::Services, ns, name),
            None,
        )
        .await
        .map(drop)
    }

    pub async fn list_endpoints(&self, ns: Option<&Namespace>) -> Result<Vec<Endpoint>, ApiError> {
        self.call(Method::GET, &list_path(Resource::Endpoints, ns), None)
            .await
    }
    /// The endpoints of one service; 404 if the service does not exist.
    pub async fn endpoints_of(
        &self,
        ns: &Namespace,
        svc: &Name,
    ) -> Result<Vec<Endpoint>, ApiError> {
        self.call(
            Method::GET,
            &object_path(Resource::Endpoints, ns, svc),
            None,
        )
        .await
    }

    /// Watches a kind (`ns` `None`: every namespace; `name`: one object, or
    /// for endpoints one service). The objects that exist come first as
    /// `ADDED`.
    pub async fn watch<T: DeserializeOwned>(
        &self,
        kind: Resource,
        ns: Option<&Namespace>,
        name: Option<&Name>,
    ) -> Result<Watch<T>, ApiError> {
        let path = match name {
            Some(n) => object_path(kind, ns.unwrap_or(&Namespace::default()), n),
            None => list_path(kind, ns),
        } + "?watch=true";
        let (status, body) =
            tokio::time::timeout(REQUEST_TIMEOUT, self.send(Method::GET, &path, None))
                .await
                .map_err(|_| ApiError::Timeout {
                    url: self.base.clone(),
                    secs: REQUEST_TIMEOUT.as_secs(),
                })??;
        if !status.is_success() {
            let bytes = self.read_all(&path, body).await?;
            return Err(Self::status_error(status, &bytes));
        }
        Ok(Watch {
            body,
            buf: Vec::new(),
            path,
            _t: PhantomData,
        })
    }
}

/// An open watch: call [`Watch::next`] for each event.
pub struct Watch<T> {
    body: Incoming,
    buf: Vec<u8>,
    path: String,
    _t: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Watch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch").field("path", &self.path).finish()
    }
}

impl<T: DeserializeOwned> Watch<T> {
    /// The next event; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Result<WatchEvent<T>, ApiError>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                return Some(serde_json::from_slice(&line).map_err(|e| ApiError::Decode {
                    path: self.path.clone(),
                    reason: e.to_string(),
                }));
            }
            match self.body.frame().await {
                None => {
                    if self.buf.iter().all(|b| b.is_ascii_whitespace()) {
                        return None;
                    }
                    self.buf.push(b'\n');
                }
                Some(Err(e)) => {
                    return Some(Err(ApiError::Transport {
                        url: self.path.clone(),
                        reason: format!("the watch broke: {e}"),
                    }));
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
