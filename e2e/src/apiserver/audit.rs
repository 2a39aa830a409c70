//! Who asked what: each request with its client (the User-Agent header)
//! and verb, so tests can count a controller's writes as an audit log would.

/// One request the double answered.
#[derive(Clone, Debug)]
pub struct Call {
    /// The User-Agent, e.g. `claude-relay-operator/0.1.0`.
    pub client: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch` or `delete`.
    pub verb: &'static str,
    /// The path and query, e.g. `/api/v1/namespaces/a/configmaps/main-config?fieldManager=...`.
    pub target: String,
    pub code: u16,
}

impl Call {
    pub fn is_write(&self) -> bool {
        matches!(self.verb, "create" | "update" | "patch" | "delete")
    }
}

/// The verb of a request as the API server's audit log names it.
pub fn verb(method: &http::Method, has_name: bool, watching: bool) -> &'static str {
    match (method.as_str(), has_name) {
        ("GET", true) => "get",
        ("GET", false) if watching => "watch",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => "other",
    }
}
