//! Who a request comes from, and whether RBAC lets them: the token of the
//! kubeconfig names the user, and a service account is allowed what the
//! Roles bound to it in the request's namespace allow, as the real
//! authorizer decides it (`resourceNames` included: a list or watch needs a
//! `metadata.name` field selector naming an allowed object). ClusterRoles
//! and ClusterRoleBindings are not served: service accounts get nothing
//! cluster-wide.

use serde_json::Value;

use super::store::{ApiError, Store};

/// The bearer token of an administrator (the tests, the operator).
pub const ADMIN_TOKEN: &str = "e2e-admin";
const SERVICE_ACCOUNT_PREFIX: &str = "e2e-serviceaccount:";

/// The token that authenticates as service account `namespace/name`.
pub fn service_account_token(namespace: &str, name: &str) -> String {
    format!("{SERVICE_ACCOUNT_PREFIX}{namespace}:{name}")
}

pub enum User {
    Admin,
    ServiceAccount { namespace: String, name: String },
}

impl User {
    /// From the `Authorization` header; 401 without a known token.
    pub fn authenticate(authorization: &str) -> Result<Self, ApiError> {
        let token = authorization.strip_prefix("Bearer ").unwrap_or("");
        if token == ADMIN_TOKEN {
            return Ok(Self::Admin);
        }
        if let Some((namespace, name)) = token
            .strip_prefix(SERVICE_ACCOUNT_PREFIX)
            .and_then(|t| t.split_once(':'))
        {
            return Ok(Self::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
        Err(ApiError::new(401, "Unauthorized", "Unauthorized"))
    }
}

/// One request as RBAC sees it.
pub struct Access<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    /// `configmaps`, or `clauderelays/status` for a subresource.
    pub resource: &'a str,
    /// Empty for cluster-scoped requests.
    pub namespace: &'a str,
    /// The object's name; for a list or watch, the one a `metadata.name` field selector names.
    pub name: Option<&'a str>,
}

fn listed(rule: &Value, field: &str, wanted: &str) -> bool {
    rule.get(field)
        .and_then(Value::as_array)
        .is_some_and(|items| items.iter().any(|i| i == "*" || i == wanted))
}

pub fn authorize(store: &Store, user: &User, access: &Access<'_>) -> Result<(), ApiError> {
    let User::ServiceAccount { namespace, name } = user else {
        return Ok(());
    };
    let allowed = !access.namespace.is_empty()
        && store
            .role_rules_for(access.namespace, namespace, name)
            .iter()
            .any(|rule| {
                let names_ok = match rule.get("resourceNames").and_then(Value::as_array) {
                    None => true,
                    Some(names) if names.is_empty() => true,
                    Some(names) => access.name.is_some_and(|n| names.iter().any(|r| r == n)),
                };
                listed(rule, "verbs", access.verb)
                    && listed(rule, "apiGroups", access.group)
                    && listed(rule, "resources", access.resource)
                    && names_ok
            });
    if allowed {
        return Ok(());
    }
    let scope = if access.namespace.is_empty() {
        "at the cluster scope".to_string()
    } else {
        format!("in the namespace \"{}\"", access.namespace)
    };
    let (resource, subresource) = access
        .resource
        .split_once('/')
        .unwrap_or((access.resource, ""));
    let object = access.name.map(|n| format!(" \"{n}\"")).unwrap_or_default();
    let what = if subresource.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}/{subresource}")
    };
    Err(ApiError::new(
        403,
        "Forbidden",
        format!(
            "{what}{object} is forbidden: User \"system:serviceaccount:{namespace}:{name}\" cannot {} resource \"{what}\" in API group \"{}\" {scope}",
            access.verb, access.group
        ),
    ))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn store() -> Store {
        let mut store = Store::default();
        let roles = store
            .resource("rbac.authorization.k8s.io", "v1", "roles")
            .unwrap();
        let bindings = store
            .resource("rbac.authorization.k8s.io", "v1", "rolebindings")
            .unwrap();
        let role = json!({"metadata": {"name": "reader"}, "rules": [{"apiGroups": [""],
            "resources": ["configmaps"], "resourceNames": ["main-config"], "verbs": ["get", "list", "watch"]}]});
        store.create(&roles, "default", role).unwrap();
        let binding = json!({"metadata": {"name": "reader"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "proxy", "namespace": "default"}]});
        store.create(&bindings, "default", binding).unwrap();
        store
    }

    fn check(
        store: &Store,
        user: &User,
        verb: &str,
        resource: &str,
        namespace: &str,
        name: Option<&str>,
    ) -> Result<(), ApiError> {
        authorize(
            store,
            user,
            &Access {
                verb,
                group: "",
                resource,
                namespace,
                name,
            },
        )
    }

    #[test]
    fn a_service_account_gets_what_its_roles_grant() {
        let store = store();
        let proxy = User::authenticate(&format!(
            "Bearer {}",
            service_account_token("default", "proxy")
        ))
        .unwrap();
        for verb in ["get", "list", "watch"] {
            assert!(
                check(
                    &store,
                    &proxy,
                    verb,
                    "configmaps",
                    "default",
                    Some("main-config")
                )
                .is_ok(),
                "{verb}"
            );
        }
        // resourceNames: a list without the name, another name, another verb or resource is refused.
        let refused = check(&store, &proxy, "list", "configmaps", "default", None).unwrap_err();
        assert_eq!(refused.code, 403);
        assert!(
            refused.message.contains(
                "User \"system:serviceaccount:default:proxy\" cannot list resource \"configmaps\""
            ),
            "{}",
            refused.message
        );
        assert!(
            check(
                &store,
                &proxy,
                "get",
                "configmaps",
                "default",
                Some("other")
            )
            .is_err()
        );
        assert!(
            check(
                &store,
                &proxy,
                "update",
                "configmaps",
                "default",
                Some("main-config")
            )
            .is_err()
        );
        assert!(
            check(
                &store,
                &proxy,
                "get",
                "secrets",
                "default",
                Some("main-config")
            )
            .is_err()
        );
        assert!(
            check(
                &store,
                &proxy,
                "get",
                "configmaps",
                "kube-system",
                Some("main-config")
            )
            .is_err()
        );
        // Another service account has no binding.
        let other = User::authenticate(&format!(
            "Bearer {}",
            service_account_token("default", "other")
        ))
        .unwrap();
        assert!(
            check(
                &store,
                &other,
                "get",
                "configmaps",
                "default",
                Some("main-config")
            )
            .is_err()
        );
        // The administrator may do anything; no token is no one.
        let admin = User::authenticate(&format!("Bearer {ADMIN_TOKEN}")).unwrap();
        assert!(check(&store, &admin, "delete", "secrets", "", None).is_ok());
        assert_eq!(User::authenticate("").err().map(|e| e.code), Some(401));
    }
}
