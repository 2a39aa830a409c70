//! A double of the Kubernetes API server, served over plain HTTP on a
//! loopback port, for running the operator and the proxies as real processes
//! without a cluster. Point `KUBECONFIG` at [`ApiServer::write_kubeconfig`].
//!
//! What it does, as the real API server does it:
//! - `get`, `list`, `create`, `update` (PUT, with resourceVersion checks:
//!   409 Conflict on a stale one), `delete`, and `watch` (`watch=true`,
//!   newline-delimited JSON events from a `resourceVersion`, or from the
//!   current state when none is given; `timeoutSeconds`), on the core types
//!   the operator and the proxy use (see `store::builtin_types`) and on every
//!   custom resource whose CustomResourceDefinition was created;
//! - `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, exists, `!`) and
//!   `fieldSelector` (`metadata.name`, `metadata.namespace`); a watch sends
//!   an object entering a watch's selection is ADDED, one leaving it DELETED;
//! - PATCH as server-side apply (`application/apply-patch+yaml`, with
//!   `fieldManager` and `force`: a manager's applied fields replace the ones
//!   it applied before, fields of other managers stay; without `force`, a
//!   field another manager applied with another value is a 409 conflict) and
//!   as merge patch (`application/merge-patch+json`; a strategic merge patch
//!   is taken as a merge patch); an unchanged object keeps its
//!   resourceVersion and makes no watch event;
//! - the `/status` subresource (the main resource ignores `status`, and
//!   `metadata.generation` counts changes outside metadata and status);
//! - validation of custom resources against the CRD's `openAPIV3Schema`
//!   (pruning, defaults, types, required, enums, patterns, bounds, then the
//!   CEL rules), with 422 Invalid like the real server;
//! - finalizers, namespace deletion, and garbage collection of objects whose
//!   ownerReferences name a deleted owner (when the owner goes, or at once
//!   for an object written after its owner went; background, or orphaning
//!   with `propagationPolicy: Orphan`);
//! - `Lease` objects for leader election and `Event`s (both are plain objects here);
//! - authentication by the kubeconfig's token ([`ApiServer::write_kubeconfig`]
//!   for an administrator, [`ApiServer::write_service_account_kubeconfig`]
//!   for a service account) and RBAC for service accounts: what the Roles
//!   bound to them allow, `resourceNames` included;
//! - an audit of every request with its client (User-Agent) and verb, to
//!   count a controller's requests: [`ApiServer::calls`], [`ApiServer::writes`];
//! - fault injection for tests: [`ApiServer::fail_watches`].
//!
//! What it does not do: scheduling, a kubelet, controllers (no ReplicaSets or
//! Pods come from a Deployment: the e2e harness starts the proxy processes
//! and writes the Deployment's status itself), admission plugins and
//! webhooks, ClusterRoles and ClusterRoleBindings (service accounts get
//! nothing cluster-wide; the administrator token gets everything), user
//! impersonation, defaulting and validation of built-in types,
//! `managedFields` in responses, conflicts between server-side apply and
//! other kinds of writes, merge keys of lists in server-side apply and
//! strategic merge patches (a list is replaced whole), JSON patches, the
//! `/scale` subresource, pagination (`limit` is ignored: a list is answered
//! in one page), `410 Gone` for old resourceVersions (the
//! whole history is kept), dry runs, and protobuf.

mod audit;
mod rbac;
mod schema;
mod selector;
mod store;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use claude_relay_testkit::http::serve_http;

pub use audit::Call;
pub use rbac::{ADMIN_TOKEN, service_account_token};
pub use selector::{FieldSelector, LabelSelector};
pub use store::{ApiError, Change, Key, PatchKind, ResourceType, Store};

type Body = UnsyncBoxBody<Bytes, Infallible>;

struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion; watches wake on it.
    changed: watch::Sender<u64>,
    /// One line per request: method, target, status, and the error if any.
    log: Mutex<Vec<String>>,
    /// Every request with its client and verb.
    calls: Mutex<Vec<Call>>,
    stop: watch::Sender<bool>,
    /// Bumped to end the watches in progress.
    watch_epoch: watch::Sender<u64>,
    /// The next this many watch requests answer 500.
    failing_watches: Mutex<usize>,
}

/// The API double, serving until dropped.
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.shared.stop.send(true);
        self.task.abort();
    }
}

impl ApiServer {
    /// Starts on a free loopback port with the `default` and `kube-system` namespaces.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the API double");
        let addr = listener.local_addr().expect("local address");
        let store = Store::default();
        let shared = Arc::new(Shared {
            changed: watch::channel(store.resource_version()).0,
            store: Mutex::new(store),
            log: Mutex::default(),
            calls: Mutex::default(),
            stop: watch::channel(false).0,
            watch_epoch: watch::channel(0).0,
            failing_watches: Mutex::new(0),
        });
        let task = tokio::spawn(serve(listener, shared.clone()));
        Self { addr, shared, task }
    }

    /// Writes an administrator's kubeconfig for this server to `path`,
    /// with `namespace` as the context's default.
    pub fn write_kubeconfig(&self, path: &Path, namespace: &str) -> std::io::Result<()> {
        self.write_kubeconfig_with_token(path, namespace, ADMIN_TOKEN)
    }

    /// Writes a kubeconfig that authenticates as service account
    /// `namespace/name`, which RBAC then limits to what its Roles allow.
    pub fn write_service_account_kubeconfig(
        &self,
        path: &Path,
        namespace: &str,
        name: &str,
    ) -> std::io::Result<()> {
        self.write_kubeconfig_with_token(path, namespace, &service_account_token(namespace, name))
    }

    fn write_kubeconfig_with_token(
        &self,
        path: &Path,
        namespace: &str,
        token: &str,
    ) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"http://{}\"}}\nusers:\n- name: e2e\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: e2e, namespace: {namespace}}}\ncurrent-context: double\n",
                self.addr
            ),
        )
    }

    /// Ends the watches in progress and answers the next `count` watch
    /// requests with 500, as an API server in trouble would.
    pub fn fail_watches(&self, count: usize) {
        *self.shared.failing_watches.lock().expect("fault lock") = count;
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Every request so far, one line each.
    pub fn requests(&self) -> Vec<String> {
        self.shared.log.lock().expect("log lock").clone()
    }

    /// Every request so far with its client (User-Agent) and verb.
    pub fn calls(&self) -> Vec<Call> {
        self.shared.calls.lock().expect("calls lock").clone()
    }

    /// The writes (create, update, patch, delete) made so far by clients
    /// whose User-Agent starts with `client`.
    pub fn writes(&self, client: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.is_write() && c.client.starts_with(client))
            .collect()
    }

    /// Reads or changes the objects directly (as a controller of the
    /// cluster would); watches see the changes.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let result = f(&mut self.shared.store.lock().expect("store lock"));
        let rv = self
            .shared
            .store
            .lock()
            .expect("store lock")
            .resource_version();
        self.shared.changed.send_replace(rv);
        result
    }

    /// Every object as YAML, for a failure report.
    pub fn dump(&self) -> String {
        let store = self.shared.store.lock().expect("store lock");
        let mut out = String::new();
        for (_, object) in store.all() {
            out.push_str("---\n");
            out.push_str(&serde_yaml_ng::to_string(object).unwrap_or_default());
        }
        out
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.stop.subscribe();
    let answering = shared.clone();
    let serving = serve_http(listener, move |request, _| {
        let shared = answering.clone();
        async move { handle(&shared, request).await }
    });
    tokio::select! {
        () = serving => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("header value"),
    );
    response
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                    Ok(b) => out.push(b),
                    Err(_) => out.extend_from_slice(&bytes[i..i + 3]),
                }
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What one request asks for.
struct Target {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: String,
    name: Option<String>,
    status: bool,
}

/// `/api/v1/...` or `/apis/GROUP/VERSION/...`; `None` for discovery paths.
fn parse_path(path: &str) -> Result<Option<Target>, ApiError> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Ok(None),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, sub) = match rest {
        [] => return Ok(None),
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some(name.to_string()), None),
        [plural, name, sub] => (*plural, Some(name.to_string()), Some(*sub)),
        _ => {
            return Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        }
    };
    let status = match sub {
        None => false,
        Some("status") => true,
        Some(other) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("the subresource {other} is not served by the API double"),
            ));
        }
    };
    Ok(Some(Target {
        group: group.into(),
        version: version.into(),
        namespace,
        plural: plural.into(),
        name,
        status,
    }))
}

async fn handle(shared: &Arc<Shared>, req: http::Request<hyper::body::Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let content_type = header(&req, "content-type");
    let accept = header(&req, "accept");
    let authorization = header(&req, "authorization");
    let user_agent = header(&req, "user-agent");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let query: Vec<(String, String)> = raw_query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    let request = Request {
        method,
        path,
        query,
        content_type,
        accept,
        authorization,
        body,
    };
    let line = format!(
        "{} {}{}{}",
        request.method,
        request.path,
        if raw_query.is_empty() { "" } else { "?" },
        decode(&raw_query)
    );
    let response = match route(shared, &request) {
        Ok(response) => response,
        Err(e) => with_note(json_response(e.code, &e.status()), &e),
    };
    // Requests of service accounts say who made them.
    let who = match rbac::User::authenticate(&request.authorization) {
        Ok(rbac::User::ServiceAccount { namespace, name }) => {
            format!(" [system:serviceaccount:{namespace}:{name}]")
        }
        _ => String::new(),
    };
    let mut entry = format!("{line}{who} -> {}", response.status().as_u16());
    if !response.status().is_success()
        && let Some(reason) = response.extensions().get::<ErrorNote>()
    {
        entry.push_str(&format!(" ({})", reason.0));
    }
    shared.log.lock().expect("log lock").push(entry);
    let named = parse_path(&request.path)
        .ok()
        .flatten()
        .is_some_and(|t| t.name.is_some());
    let watching = matches!(request.param("watch"), Some("true" | "1"));
    shared.calls.lock().expect("calls lock").push(Call {
        client: user_agent,
        verb: audit::verb(&request.method, named, watching),
        target: line,
        code: response.status().as_u16(),
    });
    response
}

/// The message of an error answer, kept for the request log.
#[derive(Clone)]
struct ErrorNote(String);

fn header(req: &http::Request<hyper::body::Incoming>, name: &str) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

struct Request {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: String,
    accept: String,
    authorization: String,
    body: Bytes,
}

impl Request {
    fn param(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json_body(&self) -> Result<Value, ApiError> {
        let parsed: Result<Value, String> = if self.content_type.contains("yaml") {
            serde_yaml_ng::from_slice(&self.body).map_err(|e| e.to_string())
        } else {
            serde_json::from_slice(&self.body).map_err(|e| e.to_string())
        };
        parsed.map_err(|e| {
            ApiError::new(
                400,
                "BadRequest",
                format!("the request body cannot be read: {e}"),
            )
        })
    }

    /// Lists and watch events as `PartialObjectMetadata` when the client asks for it.
    fn wants_metadata(&self) -> bool {
        self.accept.contains("as=PartialObjectMetadata")
    }
}

fn with_note(mut response: Response<Body>, error: &ApiError) -> Response<Body> {
    response
        .extensions_mut()
        .insert(ErrorNote(error.message.clone()));
    response
}

fn route(shared: &Arc<Shared>, req: &Request) -> Result<Response<Body>, ApiError> {
    if req.param("dryRun").is_some() {
        return Err(ApiError::new(
            400,
            "BadRequest",
            "dry runs are not served by the API double",
        ));
    }
    let user = rbac::User::authenticate(&req.authorization)?;
    let Some(target) = parse_path(&req.path)? else {
        return Ok(discovery(shared, &req.path));
    };
    let mut store = shared.store.lock().expect("store lock");
    let rt = store.resource(&target.group, &target.version, &target.plural)?;
    let namespace = target.namespace.clone().unwrap_or_default();
    if rt.namespaced && target.name.is_some() && target.namespace.is_none() {
        return Err(ApiError::new(
            404,
            "NotFound",
            "a namespaced object needs a namespace in the path",
        ));
    }
    let watching = matches!(req.param("watch"), Some("true" | "1"));
    let verb = match (&req.method, &target.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, _) => "delete",
        _ => "",
    };
    let selected_name = req
        .param("fieldSelector")
        .and_then(|f| f.strip_prefix("metadata.name="))
        .filter(|n| !n.contains(','));
    let resource = if target.status {
        format!("{}/status", rt.plural)
    } else {
        rt.plural.clone()
    };
    rbac::authorize(
        &store,
        &user,
        &rbac::Access {
            verb,
            group: &rt.group,
            resource: &resource,
            namespace: &namespace,
            name: target.name.as_deref().or(selected_name),
        },
    )?;
    if watching {
        let mut failing = shared.failing_watches.lock().expect("fault lock");
        if *failing > 0 {
            *failing -= 1;
            return Err(ApiError::new(
                500,
                "InternalError",
                "the API double was told to fail this watch",
            ));
        }
    }
    let manager = req.param("fieldManager").unwrap_or("unknown").to_string();
    let result = match (&req.method, &target.name) {
        (&Method::GET, Some(name)) => store.get(&rt, &namespace, name),
        (&Method::GET, None) => {
            let labels = LabelSelector::parse(req.param("labelSelector").unwrap_or(""))
                .map_err(|e| ApiError::new(400, "BadRequest", e))?;
            let fields = FieldSelector::parse(req.param("fieldSelector").unwrap_or(""))
                .map_err(|e| ApiError::new(400, "BadRequest", e))?;
            let ns = target.namespace.as_deref();
            if watching {
                let from = req
                    .param("resourceVersion")
                    .filter(|v| !v.is_empty() && *v != "0");
                let (start, initial) = match from {
                    Some(rv) => (
                        rv.parse().map_err(|_| {
                            ApiError::new(400, "BadRequest", "invalid resourceVersion")
                        })?,
                        Vec::new(),
                    ),
                    None => (
                        store.resource_version(),
                        store.list(&rt, ns, |o| labels.matches(o) && fields.matches(o)),
                    ),
                };
                drop(store);
                let timeout = req
                    .param("timeoutSeconds")
                    .and_then(|t| t.parse().ok())
                    .map(Duration::from_secs);
                let filter = WatchFilter {
                    resource: rt.key(),
                    type_meta: (rt.api_version(), rt.kind.clone()),
                    bookmarks: req.param("allowWatchBookmarks") == Some("true"),
                    namespace: target.namespace.clone(),
                    labels,
                    fields,
                    metadata_only: req.wants_metadata(),
                };
                return Ok(watch_stream(
                    shared.clone(),
                    filter,
                    start,
                    initial,
                    timeout,
                ));
            }
            let items = store.list(&rt, ns, |o| labels.matches(o) && fields.matches(o));
            let rv = store.resource_version().to_string();
            let list = if req.wants_metadata() {
                json!({
                    "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                    "metadata": {"resourceVersion": rv},
                    "items": items.iter().map(metadata_only).collect::<Vec<_>>(),
                })
            } else {
                json!({
                    "apiVersion": rt.api_version(), "kind": format!("{}List", rt.kind),
                    "metadata": {"resourceVersion": rv}, "items": items,
                })
            };
            return Ok(json_response(200, &list));
        }
        (&Method::POST, None) => {
            let body = req.json_body()?;
            let created = store.create(&rt, &namespace, body);
            return finish(shared, store, created, 201);
        }
        (&Method::PUT, Some(name)) => {
            let body = req.json_body()?;
            store.replace(&rt, &namespace, name, body, target.status)
        }
        (&Method::PATCH, Some(name)) => {
            let kind = if req.content_type.starts_with("application/apply-patch") {
                if req.param("fieldManager").is_none() {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    ));
                }
                PatchKind::Apply {
                    manager: manager.clone(),
                    force: req.param("force") == Some("true"),
                }
            } else if req.content_type.starts_with("application/merge-patch+json")
                || req
                    .content_type
                    .starts_with("application/strategic-merge-patch+json")
            {
                PatchKind::Merge
            } else {
                return Err(ApiError::new(
                    415,
                    "UnsupportedMediaType",
                    format!(
                        "the patch type {:?} is not served by the API double",
                        req.content_type
                    ),
                ));
            };
            let body = req.json_body()?;
            store.patch(&rt, &namespace, name, kind, body, target.status)
        }
        (&Method::DELETE, Some(name)) => {
            let orphan = req
                .json_body()
                .ok()
                .and_then(|b| {
                    b.get("propagationPolicy")
                        .and_then(Value::as_str)
                        .map(|p| p == "Orphan")
                })
                .unwrap_or(false);
            store.delete(&rt, &namespace, name, orphan)
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{} is not allowed here", req.method),
        )),
    };
    finish(shared, store, result, 200)
}

/// Answers a write, and wakes the watches.
fn finish(
    shared: &Arc<Shared>,
    store: std::sync::MutexGuard<'_, Store>,
    result: Result<Value, ApiError>,
    code: u16,
) -> Result<Response<Body>, ApiError> {
    let rv = store.resource_version();
    drop(store);
    shared.changed.send_replace(rv);
    match result {
        Ok(object) => Ok(json_response(code, &object)),
        Err(e) => Ok(with_note(json_response(e.code, &e.status()), &e)),
    }
}

fn metadata_only(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or(json!({})),
    })
}

/// `/api`, `/apis` and the resource lists of a group version, enough for a
/// client that discovers before it asks.
fn discovery(shared: &Arc<Shared>, path: &str) -> Response<Body> {
    let store = shared.store.lock().expect("store lock");
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let types = store.types();
    let body = match segments.as_slice() {
        ["api"] => json!({"kind": "APIVersions", "versions": ["v1"]}),
        ["apis"] => {
            let mut groups: Vec<(String, String)> = types
                .iter()
                .filter(|t| !t.group.is_empty())
                .map(|t| (t.group.clone(), t.version.clone()))
                .collect();
            groups.sort();
            groups.dedup();
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups.iter().map(|(g, v)| json!({
                "name": g,
                "versions": [{"groupVersion": format!("{g}/{v}"), "version": v}],
                "preferredVersion": {"groupVersion": format!("{g}/{v}"), "version": v},
            })).collect::<Vec<_>>()})
        }
        ["api", version] | ["apis", _, version] => {
            let group = if segments[0] == "api" {
                ""
            } else {
                segments[1]
            };
            let resources: Vec<Value> = types
                .iter()
                .filter(|t| t.group == group && t.version == *version)
                .flat_map(|t| {
                    let main = json!({"name": t.plural, "kind": t.kind, "namespaced": t.namespaced, "singularName": "",
                        "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]});
                    let status = t.status.then(|| json!({"name": format!("{}/status", t.plural), "kind": t.kind,
                        "namespaced": t.namespaced, "singularName": "", "verbs": ["get", "patch", "update"]}));
                    std::iter::once(main).chain(status)
                })
                .collect();
            if resources.is_empty() {
                return json_response(
                    404,
                    &ApiError::new(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    )
                    .status(),
                );
            }
            let gv = if group.is_empty() {
                version.to_string()
            } else {
                format!("{group}/{version}")
            };
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
        }
        ["version"] => {
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-e2e-double", "platform": "linux/amd64"})
        }
        _ => {
            return json_response(
                404,
                &ApiError::new(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                )
                .status(),
            );
        }
    };
    json_response(200, &body)
}

/// How often a watch that asked for bookmarks gets one.
const BOOKMARK_EVERY: Duration = Duration::from_secs(2);

struct WatchFilter {
    resource: String,
    /// (apiVersion, kind) of the type, for bookmarks.
    type_meta: (String, String),
    bookmarks: bool,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    metadata_only: bool,
}

impl WatchFilter {
    fn event(&self, kind: &str, object: &Value) -> String {
        let object = if self.metadata_only {
            metadata_only(object)
        } else {
            object.clone()
        };
        json!({"type": kind, "object": object}).to_string() + "\n"
    }

    fn selects(&self, object: &Value) -> bool {
        self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        }) && self.labels.matches(object)
            && self.fields.matches(object)
    }

    /// The event a change makes for this watch, if any: a modified object
    /// entering the selection is ADDED, one leaving it DELETED.
    fn event_of(&self, change: &Change) -> Option<String> {
        if change.resource != self.resource {
            return None;
        }
        let now = self.selects(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.selects(p));
        let kind = match (change.kind, before, now) {
            ("MODIFIED", false, true) => "ADDED",
            ("MODIFIED", true, false) => "DELETED",
            (kind, _, true) => kind,
            _ => return None,
        };
        Some(self.event(kind, &change.object))
    }

    fn bookmark(&self, resource_version: u64) -> String {
        let (api_version, kind) = &self.type_meta;
        let object = json!({"apiVersion": api_version, "kind": kind,
            "metadata": {"resourceVersion": resource_version.to_string()}});
        json!({"type": "BOOKMARK", "object": object}).to_string() + "\n"
    }
}

/// Watch events after resourceVersion `from` (after `initial`, sent as
/// ADDED), as they happen, with a bookmark now and then if asked, until the
/// client goes, the timeout or shutdown.
fn watch_stream(
    shared: Arc<Shared>,
    filter: WatchFilter,
    from: u64,
    initial: Vec<Value>,
    timeout: Option<Duration>,
) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut changed = shared.changed.subscribe();
        let mut stop = shared.stop.subscribe();
        let mut epoch = shared.watch_epoch.subscribe();
        let mut bookmarks = tokio::time::interval(BOOKMARK_EVERY);
        bookmarks.tick().await;
        for object in &initial {
            if tx
                .send(Bytes::from(filter.event("ADDED", object)))
                .await
                .is_err()
            {
                return;
            }
        }
        let mut sent = from;
        loop {
            let (events, latest): (Vec<String>, u64) = {
                let store = shared.store.lock().expect("store lock");
                let start = store
                    .changes
                    .partition_point(|c| c.resource_version <= sent);
                let events = store.changes[start..]
                    .iter()
                    .filter_map(|c| filter.event_of(c))
                    .collect();
                (events, store.resource_version())
            };
            for line in events {
                if tx.send(Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            sent = sent.max(latest);
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            let bookmark_due = tokio::select! {
                result = changed.changed() => if result.is_err() { return } else { false },
                _ = bookmarks.tick(), if filter.bookmarks => true,
                _ = stop.wait_for(|s| *s) => return,
                _ = epoch.changed() => return,
                () = until => return,
                () = tx.closed() => return,
            };
            if bookmark_due && tx.send(Bytes::from(filter.bookmark(sent))).await.is_err() {
                return;
            }
        }
    });
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(
        "content-type",
        "application/json".parse().expect("header value"),
    );
    response
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
    use kube::{Api, ResourceExt};

    use super::*;

    fn labelled(name: &str, app: Option<&str>) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some(name.into());
        cm.metadata.labels = app.map(|a| [("app".to_string(), a.to_string())].into());
        cm
    }

    /// A watch through kube's client: selected changes in order, objects
    /// entering and leaving the label selection, and bookmarks.
    #[tokio::test]
    async fn watches_follow_their_selection_and_bookmark() {
        let api = ApiServer::start().await;
        let dir = crate::cluster::work_dir();
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path, "default").unwrap();
        let client = crate::cluster::client_for(&path).await.unwrap();
        let maps: Api<ConfigMap> = Api::namespaced(client, "default");
        maps.create(&PostParams::default(), &labelled("before", Some("x")))
            .await
            .unwrap();
        let params = WatchParams::default().labels("app=x");
        let mut events = maps.watch(&params, "0").await.unwrap().boxed();
        let mut next = async || {
            tokio::time::timeout(Duration::from_secs(5), events.next())
                .await
                .expect("an event in time")
                .expect("the watch goes on")
                .expect("a readable event")
        };
        let describe = |event: WatchEvent<ConfigMap>| match event {
            WatchEvent::Added(o) => format!("ADDED {}", o.name_any()),
            WatchEvent::Modified(o) => format!("MODIFIED {}", o.name_any()),
            WatchEvent::Deleted(o) => format!("DELETED {}", o.name_any()),
            WatchEvent::Bookmark(b) => format!("BOOKMARK {}", b.metadata.resource_version),
            WatchEvent::Error(e) => format!("ERROR {e:?}"),
        };
        assert_eq!(
            describe(next().await),
            "ADDED before",
            "the current state first"
        );

        maps.create(&PostParams::default(), &labelled("a", Some("x")))
            .await
            .unwrap();
        maps.create(&PostParams::default(), &labelled("b", None))
            .await
            .unwrap();
        let relabel = |app: &str| Patch::Merge(json!({"metadata": {"labels": {"app": app}}}));
        maps.patch("a", &PatchParams::default(), &relabel("y"))
            .await
            .unwrap();
        maps.patch("b", &PatchParams::default(), &relabel("x"))
            .await
            .unwrap();
        let rv = maps.get("b").await.unwrap().resource_version().unwrap();
        assert_eq!(describe(next().await), "ADDED a");
        assert_eq!(describe(next().await), "DELETED a", "a left the selection");
        assert_eq!(describe(next().await), "ADDED b", "b entered it");
        assert_eq!(describe(next().await), format!("BOOKMARK {rv}"));
    }

    /// A client that discovers before it asks (as kubectl does) finds the
    /// core types and the custom resources of the installed CRDs.
    #[tokio::test]
    async fn discovery_lists_builtin_and_custom_resources() {
        use kube::CustomResourceExt;
        let api = ApiServer::start().await;
        let dir = crate::cluster::work_dir();
        let path = dir.path().join("kubeconfig");
        api.write_kubeconfig(&path, "default").unwrap();
        let client = crate::cluster::client_for(&path).await.unwrap();
        let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
            Api::all(client.clone());
        crds.create(
            &PostParams::default(),
            &claude_relay_crds::ClaudeRelay::crd(),
        )
        .await
        .unwrap();
        let discovery = kube::Discovery::new(client).run().await.unwrap();
        let found = |group: &str, kind: &str| {
            discovery
                .groups()
                .filter(|g| g.name() == group)
                .flat_map(|g| g.recommended_resources())
                .any(|(r, _)| r.kind == kind)
        };
        assert!(found("", "ConfigMap"));
        assert!(found("apps", "Deployment"));
        assert!(found("relay.claude-relay.dev", "ClaudeRelay"));
        assert!(
            !found("relay.claude-relay.dev", "UpstreamRegion"),
            "its CRD is not installed"
        );
    }
}
