//! The objects of the API double and what the API server does when they are
//! written: resourceVersions, generations, the status subresource,
//! server-side apply, validation of custom resources, finalizers and the
//! garbage collection of owned objects.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

use super::schema;

/// A kind of object the double serves.
#[derive(Clone, Debug)]
pub struct ResourceType {
    /// Empty for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a `/status` subresource: the main resource ignores `status` and
    /// counts `metadata.generation`.
    pub status: bool,
    /// The `openAPIV3Schema` of a custom resource.
    pub schema: Option<Value>,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status,
            schema: None,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `group/plural`: what identifies the type in the store.
    pub fn key(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }

    /// `deployments.apps`, as API errors name a type.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// The types every cluster has that the operator, the proxy and the tests use.
fn builtin_types() -> Vec<ResourceType> {
    vec![
        ResourceType::builtin("", "v1", "namespaces", "Namespace", false, true),
        ResourceType::builtin("", "v1", "configmaps", "ConfigMap", true, false),
        ResourceType::builtin("", "v1", "secrets", "Secret", true, false),
        ResourceType::builtin("", "v1", "services", "Service", true, true),
        ResourceType::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
        ResourceType::builtin("", "v1", "pods", "Pod", true, true),
        ResourceType::builtin("", "v1", "events", "Event", true, false),
        ResourceType::builtin("apps", "v1", "deployments", "Deployment", true, true),
        ResourceType::builtin(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            true,
            true,
        ),
        ResourceType::builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            true,
        ),
        ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "roles",
            "Role",
            true,
            false,
        ),
        ResourceType::builtin(
            "rbac.authorization.k8s.io",
            "v1",
            "rolebindings",
            "RoleBinding",
            true,
            false,
        ),
        ResourceType::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        ResourceType::builtin("events.k8s.io", "v1", "events", "Event", true, false),
        ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        ),
    ]
}

/// An error as the API server reports it (a `Status` object).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", rt.qualified()),
        )
    }

    pub fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// [`ResourceType::key`].
    pub resource: String,
    /// Empty for cluster-scoped objects.
    pub namespace: String,
    pub name: String,
}

/// One change, as watches report it.
#[derive(Clone, Debug)]
pub struct Change {
    pub resource_version: u64,
    pub resource: String,
    pub kind: &'static str,
    pub object: Value,
    /// The version before a modification, so that a watch with a selector
    /// can tell an object leaving or entering its selection.
    pub previous: Option<Value>,
}

/// How a PATCH body is to be read.
#[derive(Clone, Debug, PartialEq)]
pub enum PatchKind {
    /// Server-side apply by the field manager `manager`.
    Apply { manager: String, force: bool },
    /// RFC 7386; strategic merge patches are taken as merge patches.
    Merge,
}

/// Whose fields: (object, field manager, of the /status subresource).
type OwnerSlot = (Key, String, bool);
/// An object's ownership records (appliers, updaters), saved before a write.
type SavedOwnership = [Vec<(OwnerSlot, Value)>; 2];

pub struct Store {
    resource_version: u64,
    types: BTreeMap<String, ResourceType>,
    objects: BTreeMap<Key, Value>,
    /// The fields each applier owns, with the values it applied: (object,
    /// manager, to /status). Its last applied configuration, less the fields
    /// other managers took from it.
    applied: HashMap<OwnerSlot, Value>,
    /// The fields each manager of an Update (not an apply) owns, likewise.
    updated: HashMap<OwnerSlot, Value>,
    /// Every change since the start, in resourceVersion order.
    pub changes: Vec<Change>,
}

impl Default for Store {
    fn default() -> Self {
        let mut store = Self {
            resource_version: 1000,
            types: builtin_types().into_iter().map(|t| (t.key(), t)).collect(),
            objects: BTreeMap::new(),
            applied: HashMap::new(),
            updated: HashMap::new(),
            changes: Vec::new(),
        };
        let namespaces = store.types["/namespaces"].clone();
        for ns in ["default", "kube-system"] {
            store
                .create(&namespaces, "", json!({"metadata": {"name": ns}}))
                .expect("a fresh store takes the default namespaces");
        }
        store
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .expect("rounding to seconds")
        .to_string()
}

fn new_uid() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("random bytes");
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn meta<'a>(object: &'a Value, field: &str) -> Option<&'a Value> {
    object.get("metadata").and_then(|m| m.get(field))
}

fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    meta(object, field).and_then(Value::as_str)
}

fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.get("metadata").is_some_and(Value::is_object) {
        object["metadata"] = json!({});
    }
    object["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// Fields only the server sets; what clients send there is ignored.
const SERVER_FIELDS: [&str; 6] = [
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
    "managedFields",
    "deletionTimestamp",
];

impl Store {
    /// The rules of the Roles of `namespace` bound to service account
    /// `sa_namespace/sa_name`.
    pub fn role_rules_for(&self, namespace: &str, sa_namespace: &str, sa_name: &str) -> Vec<Value> {
        let in_namespace = |resource: &'static str| {
            self.objects
                .iter()
                .filter(move |(k, _)| k.resource == resource && k.namespace == namespace)
                .map(|(_, v)| v)
        };
        let mut rules = Vec::new();
        for binding in in_namespace("rbac.authorization.k8s.io/rolebindings") {
            let binds = binding["subjects"].as_array().is_some_and(|subjects| {
                subjects.iter().any(|s| {
                    s["kind"] == "ServiceAccount"
                        && s["name"] == sa_name
                        && s.get("namespace")
                            .and_then(Value::as_str)
                            .unwrap_or(namespace)
                            == sa_namespace
                })
            });
            if !binds || binding["roleRef"]["kind"] != "Role" {
                continue;
            }
            let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            if let Some(role) = in_namespace("rbac.authorization.k8s.io/roles")
                .find(|r| meta_str(r, "name") == Some(role_name))
            {
                rules.extend(role["rules"].as_array().cloned().unwrap_or_default());
            }
        }
        rules
    }

    /// The types served, built-in and custom.
    pub fn types(&self) -> Vec<ResourceType> {
        self.types.values().cloned().collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.resource_version
    }

    /// The type served at `group/version/plural`.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Result<ResourceType> {
        match self.types.get(&format!("{group}/{plural}")) {
            Some(rt) if rt.version == version => Ok(rt.clone()),
            _ => Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
        }
    }

    fn key(rt: &ResourceType, namespace: &str, name: &str) -> Key {
        Key {
            resource: rt.key(),
            namespace: if rt.namespaced {
                namespace.into()
            } else {
                String::new()
            },
            name: name.into(),
        }
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value> {
        self.objects
            .get(&Self::key(rt, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Objects of `rt` in `namespace` (all namespaces when `None`) that `keep` selects.
    pub fn list(
        &self,
        rt: &ResourceType,
        namespace: Option<&str>,
        keep: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let resource = rt.key();
        self.objects
            .iter()
            .filter(|(k, _)| k.resource == resource)
            .filter(|(k, _)| namespace.is_none_or(|ns| k.namespace == ns))
            .map(|(_, v)| v)
            .filter(|v| keep(v))
            .cloned()
            .collect()
    }

    /// Every object, for a dump.
    pub fn all(&self) -> impl Iterator<Item = (&Key, &Value)> {
        self.objects.iter()
    }

    fn check_namespace(&self, rt: &ResourceType, namespace: &str) -> Result<()> {
        if !rt.namespaced {
            return Ok(());
        }
        let key = Key {
            resource: "/namespaces".into(),
            namespace: String::new(),
            name: namespace.into(),
        };
        match self.objects.get(&key) {
            None => Err(ApiError::new(
                404,
                "NotFound",
                format!("namespaces \"{namespace}\" not found"),
            )),
            Some(ns) if meta(ns, "deletionTimestamp").is_some() => Err(ApiError::new(
                403,
                "Forbidden",
                format!(
                    "unable to create new content in namespace {namespace} because it is being terminated"
                ),
            )),
            Some(_) => Ok(()),
        }
    }

    pub fn create(&mut self, rt: &ResourceType, namespace: &str, mut body: Value) -> Result<Value> {
        self.check_namespace(rt, namespace)?;
        let metadata = metadata_mut(&mut body);
        if metadata
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
            && let Some(prefix) = metadata.get("generateName").and_then(Value::as_str)
        {
            let suffix: String = new_uid()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(5)
                .collect();
            metadata.insert("name".into(), json!(format!("{prefix}{suffix}")));
        }
        let name = meta_str(&body, "name").unwrap_or_default().to_string();
        let key = Self::key(rt, namespace, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", rt.qualified()),
            ));
        }
        if rt.status {
            body.as_object_mut().map(|o| o.remove("status"));
        }
        self.commit(rt, key, None, body)
    }

    /// PUT: the whole object, or its status. A `resourceVersion` in the body
    /// must be the current one (optimistic concurrency).
    pub fn replace(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        body: Value,
        status: bool,
    ) -> Result<Value> {
        let old = self.get(rt, namespace, name)?;
        let key = Self::key(rt, namespace, name);
        if let Some(rv) = meta_str(&body, "resourceVersion")
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(conflict(rt, name));
        }
        let new = if status || rt.status {
            with_status_of(&old, &body, status)
        } else {
            body
        };
        self.commit(rt, key, Some(&old), new)
    }

    pub fn patch(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        kind: PatchKind,
        patch: Value,
        status: bool,
    ) -> Result<Value> {
        let key = Self::key(rt, namespace, name);
        let old = self.objects.get(&key).cloned();
        match kind {
            PatchKind::Merge => {
                let old = old.ok_or_else(|| ApiError::not_found(rt, name))?;
                let mut merged = old.clone();
                merge_patch(&mut merged, &patch);
                let new = if status || rt.status {
                    with_status_of(&old, &merged, status)
                } else {
                    merged
                };
                self.commit(rt, key, Some(&old), new)
            }
            PatchKind::Apply { manager, force } => {
                let manager = manager.as_str();
                if old.is_none() && status {
                    return Err(ApiError::not_found(rt, name));
                }
                if old.is_none() {
                    self.check_namespace(rt, namespace)?;
                }
                let mut applied = patch;
                if meta_str(&applied, "name").is_some_and(|n| n != name) {
                    return Err(ApiError::new(
                        400,
                        "BadRequest",
                        "the name of the object does not match the name on the URL",
                    ));
                }
                let metadata = metadata_mut(&mut applied);
                for field in SERVER_FIELDS {
                    metadata.remove(field);
                }
                metadata.insert("name".into(), json!(name));
                let applied = if status {
                    json!({ "status": applied.get("status").cloned().unwrap_or(json!({})) })
                } else if rt.status {
                    let mut a = applied;
                    a.as_object_mut().map(|o| o.remove("status"));
                    a
                } else {
                    applied
                };
                let slot = (key.clone(), manager.to_string(), status);
                let others = self.other_owners(&key, manager, status);
                let conflicts = conflicts(&applied, &others);
                if !force && let Some((other, path)) = conflicts.first() {
                    return Err(ApiError::new(
                        409,
                        "Conflict",
                        format!(
                            "Apply failed with 1 conflict: conflict with \"{other}\": .{}",
                            path.join(".")
                        ),
                    ));
                }
                let mut new = old.clone().unwrap_or_else(|| json!({}));
                // A field this manager applied before and no longer does is
                // removed, unless another manager owns it too.
                if let Some(previous) = self.applied.get(&slot) {
                    for path in leaves(previous) {
                        let owned_elsewhere = others.iter().any(|(_, o)| has_path(o, &path));
                        if !has_path(&applied, &path) && !owned_elsewhere {
                            remove_path(&mut new, &path, &applied);
                        }
                    }
                }
                deep_merge(&mut new, &applied);
                let saved = self.ownership_of(&key);
                // A forced apply takes the conflicting fields from their owners.
                for (_, path) in &conflicts {
                    self.disown(&key, manager, status, path);
                }
                self.applied.insert(slot, applied);
                let result = match &old {
                    Some(old) => self.commit(rt, key.clone(), Some(old), new),
                    None => self.commit(rt, key.clone(), None, new),
                };
                if result.is_err() {
                    self.restore_ownership(&key, saved);
                }
                result
            }
        }
    }

    /// An Update (as a controller's PUT or PATCH, like the HPA controller's
    /// write of `spec.replicas` through the scale subresource) of the fields
    /// in `patch` (a merge patch) by `manager`: it owns them afterwards, and
    /// the managers that owned them before no longer do.
    pub fn update(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        manager: &str,
        patch: Value,
    ) -> Result<Value> {
        let old = self.get(rt, namespace, name)?;
        let key = Self::key(rt, namespace, name);
        let mut merged = old.clone();
        merge_patch(&mut merged, &patch);
        let saved = self.ownership_of(&key);
        let slot = (key.clone(), manager.to_string(), false);
        let mut owned = self
            .updated
            .get(&slot)
            .cloned()
            .unwrap_or_else(|| json!({}));
        for path in leaves(&patch) {
            self.disown(&key, manager, false, &path);
            match lookup(&merged, &path) {
                Some(value) => set_path(&mut owned, &path, value.clone()),
                None => remove_path(&mut owned, &path, &Value::Null),
            }
        }
        self.updated.insert(slot, owned);
        let new = with_status_of(&old, &merged, false);
        let result = self.commit(rt, key.clone(), Some(&old), new);
        if result.is_err() {
            self.restore_ownership(&key, saved);
        }
        result
    }

    /// What every manager but `manager` owns of the object (same subresource).
    fn other_owners(&self, key: &Key, manager: &str, status: bool) -> Vec<(String, Value)> {
        self.applied
            .iter()
            .chain(self.updated.iter())
            .filter(|((k, m, s), _)| k == key && m != manager && *s == status)
            .map(|((_, m, _), v)| (m.clone(), v.clone()))
            .collect()
    }

    /// Takes the field at `path` from every manager but `manager`.
    fn disown(&mut self, key: &Key, manager: &str, status: bool, path: &[String]) {
        for ((k, m, s), owned) in self.applied.iter_mut().chain(self.updated.iter_mut()) {
            if k == key && m != manager && *s == status && has_path(owned, path) {
                remove_path(owned, path, &Value::Null);
            }
        }
    }

    /// The ownership records of one object, to restore after a failed write.
    fn ownership_of(&self, key: &Key) -> SavedOwnership {
        let of = |map: &HashMap<OwnerSlot, Value>| {
            map.iter()
                .filter(|((k, _, _), _)| k == key)
                .map(|(slot, v)| (slot.clone(), v.clone()))
                .collect()
        };
        [of(&self.applied), of(&self.updated)]
    }

    fn restore_ownership(&mut self, key: &Key, saved: SavedOwnership) {
        let [applied, updated] = saved;
        self.applied.retain(|(k, _, _), _| k != key);
        self.updated.retain(|(k, _, _), _| k != key);
        self.applied.extend(applied);
        self.updated.extend(updated);
    }

    /// `metadata.managedFields` as the API server reports it: per manager and
    /// operation, the fields it owns (FieldsV1; a list is one field here).
    fn managed_fields(&self, key: &Key, api_version: &str) -> Vec<Value> {
        let mut entries: Vec<(&str, &str, bool, &Value)> = self
            .applied
            .iter()
            .map(|(slot, v)| (slot, "Apply", v))
            .chain(self.updated.iter().map(|(slot, v)| (slot, "Update", v)))
            .filter(|((k, _, _), _, _)| k == key)
            .map(|((_, m, s), op, v)| (m.as_str(), op, *s, v))
            .filter(|(_, _, _, owned)| **owned != json!({}))
            .collect();
        entries.sort_by(|a, b| (a.0, a.1, a.2).cmp(&(b.0, b.1, b.2)));
        entries
            .into_iter()
            .map(|(manager, operation, status, owned)| {
                let mut entry = json!({
                    "manager": manager,
                    "operation": operation,
                    "apiVersion": api_version,
                    "fieldsType": "FieldsV1",
                    "fieldsV1": fields_v1(owned),
                });
                if status {
                    entry["subresource"] = json!("status");
                }
                entry
            })
            .collect()
    }

    /// Deletes the object, or marks it for deletion while finalizers remain;
    /// owned objects follow unless `orphan`.
    pub fn delete(
        &mut self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        orphan: bool,
    ) -> Result<Value> {
        let old = self.get(rt, namespace, name)?;
        let key = Self::key(rt, namespace, name);
        let finalizers = meta(&old, "finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if finalizers || rt.key() == "/namespaces" {
            if meta(&old, "deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut marked = old.clone();
            metadata_mut(&mut marked).insert("deletionTimestamp".into(), json!(now()));
            let marked = self.store(rt, key.clone(), "MODIFIED", marked);
            if rt.key() == "/namespaces" {
                self.empty_namespace(name);
                if !finalizers {
                    return Ok(self.remove(&key, orphan));
                }
            }
            return Ok(marked);
        }
        Ok(self.remove(&key, orphan))
    }

    fn empty_namespace(&mut self, namespace: &str) {
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| k.namespace == namespace)
            .cloned()
            .collect();
        for key in keys {
            if self.objects.contains_key(&key) {
                self.remove(&key, false);
            }
        }
    }

    fn remove(&mut self, key: &Key, orphan: bool) -> Value {
        let Some(mut object) = self.objects.remove(key) else {
            return Value::Null;
        };
        self.applied.retain(|(k, _, _), _| k != key);
        self.updated.retain(|(k, _, _), _| k != key);
        self.resource_version += 1;
        metadata_mut(&mut object).insert(
            "resourceVersion".into(),
            json!(self.resource_version.to_string()),
        );
        self.changes.push(Change {
            resource_version: self.resource_version,
            resource: key.resource.clone(),
            kind: "DELETED",
            object: object.clone(),
            previous: None,
        });
        if key.resource == "apiextensions.k8s.io/customresourcedefinitions" {
            self.unregister(&object);
        }
        if let Some(uid) = meta_str(&object, "uid") {
            self.collect_garbage(uid, orphan);
        }
        object
    }

    /// What the garbage collector does once an owner is gone: its dependents
    /// are deleted, or with `orphan` lose the reference.
    fn collect_garbage(&mut self, owner_uid: &str, orphan: bool) {
        let owned_by = |object: &Value| {
            meta(object, "ownerReferences")
                .and_then(Value::as_array)
                .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner_uid))
        };
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(_, v)| owned_by(v))
            .map(|(k, _)| k.clone())
            .collect();
        for key in dependents {
            let Some(rt) = self.types.get(&key.resource).cloned() else {
                continue;
            };
            if orphan {
                let mut object = self.objects[&key].clone();
                if let Some(refs) = metadata_mut(&mut object)
                    .get_mut("ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r["uid"] != owner_uid);
                }
                self.store(&rt, key, "MODIFIED", object);
            } else {
                let _ = self.delete(&rt, &key.namespace, &key.name, false);
            }
        }
    }

    /// Admission and bookkeeping of a write: keeps server fields, ignores
    /// `status` on the main resource, validates custom resources, counts the
    /// generation; an unchanged object keeps its resourceVersion.
    fn commit(
        &mut self,
        rt: &ResourceType,
        key: Key,
        old: Option<&Value>,
        mut new: Value,
    ) -> Result<Value> {
        let object = new
            .as_object_mut()
            .ok_or_else(|| ApiError::new(400, "BadRequest", "the body is not an object"))?;
        object.insert("apiVersion".into(), json!(rt.api_version()));
        object.insert("kind".into(), json!(rt.kind));
        let metadata = metadata_mut(&mut new);
        for field in SERVER_FIELDS {
            metadata.remove(field);
        }
        if rt.namespaced {
            metadata.insert("namespace".into(), json!(key.namespace));
        } else {
            metadata.remove("namespace");
        }
        if metadata
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(invalid(
                rt,
                &key.name,
                &["metadata.name: Required value: name or generateName is required".into()],
            ));
        }
        if let Some(old) = old {
            let metadata = metadata_mut(&mut new);
            for field in SERVER_FIELDS {
                if let Some(v) = meta(old, field) {
                    metadata.insert(field.into(), v.clone());
                }
            }
        } else {
            let metadata = metadata_mut(&mut new);
            metadata.insert("uid".into(), json!(new_uid()));
            metadata.insert("creationTimestamp".into(), json!(now()));
        }
        let managed = self.managed_fields(&key, &rt.api_version());
        let metadata = metadata_mut(&mut new);
        if managed.is_empty() {
            metadata.remove("managedFields");
        } else {
            metadata.insert("managedFields".into(), json!(managed));
        }
        if key.resource == "/secrets" {
            string_data_into_data(&mut new);
        }
        if key.resource == "apps/deployments" {
            default_deployment(&mut new);
        }
        if let Some(schema) = &rt.schema {
            let errors = schema::admit(schema, &mut new, old);
            if !errors.is_empty() {
                return Err(invalid(rt, &key.name, &errors));
            }
        }
        if rt.status {
            let generation =
                meta(old.unwrap_or(&Value::Null), "generation").and_then(Value::as_i64);
            let changed =
                old.is_none_or(|old| without_meta_and_status(old) != without_meta_and_status(&new));
            let generation = match (generation, changed) {
                (Some(g), true) => g + 1,
                (Some(g), false) => g,
                (None, _) => 1,
            };
            metadata_mut(&mut new).insert("generation".into(), json!(generation));
        }
        if let Some(old) = old {
            if *old == new {
                return Ok(new);
            }
            let being_deleted = meta(&new, "deletionTimestamp").is_some();
            let finalizers = meta(&new, "finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            if being_deleted && !finalizers {
                return Ok(self.remove(&key, false));
            }
        }
        if key.resource == "apiextensions.k8s.io/customresourcedefinitions" {
            self.register(&mut new)?;
        }
        let kind = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let stored = self.store(rt, key.clone(), kind, new);
        if self.orphaned(&stored) {
            // What the garbage collector does with an object written after
            // its owner went (a controller's late write): it deletes it.
            self.remove(&key, false);
        }
        Ok(stored)
    }

    /// Whether `object` has owners and none of them exists any more.
    fn orphaned(&self, object: &Value) -> bool {
        let Some(refs) = meta(object, "ownerReferences")
            .and_then(Value::as_array)
            .filter(|r| !r.is_empty())
        else {
            return false;
        };
        !refs.iter().any(|r| {
            self.objects
                .values()
                .any(|o| meta(o, "uid") == r.get("uid"))
        })
    }

    /// Stores a new version with the next resourceVersion and records the change.
    fn store(
        &mut self,
        _rt: &ResourceType,
        key: Key,
        kind: &'static str,
        mut object: Value,
    ) -> Value {
        self.resource_version += 1;
        metadata_mut(&mut object).insert(
            "resourceVersion".into(),
            json!(self.resource_version.to_string()),
        );
        let previous = self.objects.get(&key).cloned();
        self.changes.push(Change {
            resource_version: self.resource_version,
            resource: key.resource.clone(),
            kind,
            object: object.clone(),
            previous,
        });
        self.objects.insert(key, object.clone());
        object
    }

    /// Serves the resource a CustomResourceDefinition defines (its storage
    /// version), and reports it Established at once.
    fn register(&mut self, crd: &mut Value) -> Result<()> {
        let spec = &crd["spec"];
        let version = spec["versions"]
            .as_array()
            .and_then(|vs| vs.iter().find(|v| v["storage"] == true).or(vs.first()))
            .ok_or_else(|| ApiError::new(422, "Invalid", "spec.versions: Required value"))?;
        let rt = ResourceType {
            group: spec["group"].as_str().unwrap_or_default().into(),
            version: version["name"].as_str().unwrap_or_default().into(),
            plural: spec["names"]["plural"].as_str().unwrap_or_default().into(),
            kind: spec["names"]["kind"].as_str().unwrap_or_default().into(),
            namespaced: spec["scope"] == "Namespaced",
            status: version.pointer("/subresources/status").is_some(),
            schema: version.pointer("/schema/openAPIV3Schema").cloned(),
        };
        self.types.insert(rt.key(), rt);
        crd["status"] = json!({
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found"},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted"},
            ],
            "acceptedNames": spec["names"],
            "storedVersions": [version["name"]],
        });
        Ok(())
    }

    fn unregister(&mut self, crd: &Value) {
        let key = format!(
            "{}/{}",
            crd["spec"]["group"].as_str().unwrap_or_default(),
            crd["spec"]["names"]["plural"].as_str().unwrap_or_default()
        );
        let Some(rt) = self.types.remove(&key) else {
            return;
        };
        let keys: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| k.resource == rt.key())
            .cloned()
            .collect();
        for k in keys {
            self.remove(&k, false);
        }
    }
}

/// A Secret's `stringData` is write-only: the server moves it into `data`, base64.
fn string_data_into_data(secret: &mut Value) {
    let Some(Value::Object(strings)) = secret.as_object_mut().and_then(|o| o.remove("stringData"))
    else {
        return;
    };
    if !secret.get("data").is_some_and(Value::is_object) {
        secret["data"] = json!({});
    }
    for (key, value) in strings {
        let bytes = value.as_str().unwrap_or_default().as_bytes().to_vec();
        secret["data"][key] =
            serde_json::to_value(k8s_openapi::ByteString(bytes)).expect("bytes serialize");
    }
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            rt.qualified()
        ),
    )
}

fn invalid(rt: &ResourceType, name: &str, errors: &[String]) -> ApiError {
    let group = if rt.group.is_empty() {
        String::new()
    } else {
        format!(".{}", rt.group)
    };
    ApiError::new(
        422,
        "Invalid",
        format!(
            "{}{group} \"{name}\" is invalid: {}",
            rt.kind,
            errors.join(", ")
        ),
    )
}

/// A write to `/status` changes the status of `old` and nothing else; a
/// write to the main resource changes everything but the status.
fn with_status_of(old: &Value, new: &Value, status: bool) -> Value {
    if !status {
        let mut out = new.clone();
        match old.get("status") {
            Some(s) => out["status"] = s.clone(),
            None => {
                out.as_object_mut().map(|o| o.remove("status"));
            }
        }
        return out;
    }
    let mut out = old.clone();
    match new.get("status") {
        Some(status) => out["status"] = status.clone(),
        None => {
            out.as_object_mut().map(|o| o.remove("status"));
        }
    }
    out
}

fn without_meta_and_status(object: &Value) -> Value {
    let mut out = object.clone();
    if let Some(o) = out.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    out
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("made an object");
    for (key, value) in patch {
        if value.is_null() {
            map.remove(key);
        } else {
            merge_patch(map.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

/// Maps merge key by key; anything else (lists included) is replaced whole.
fn deep_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(t), Value::Object(a)) => {
            for (key, value) in a {
                match t.get_mut(key) {
                    Some(existing) if existing.is_object() && value.is_object() => {
                        deep_merge(existing, value)
                    }
                    _ => {
                        t.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

/// The paths of the fields an applied object sets: map keys are walked into,
/// anything else (lists included) is one field.
fn leaves(value: &Value) -> Vec<Vec<String>> {
    fn walk(value: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, v) in map {
                    path.push(key.clone());
                    walk(v, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }
    let mut out = Vec::new();
    walk(value, &mut Vec::new(), &mut out);
    out
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |v, key| v.as_object()?.get(key))
}

fn has_path(value: &Value, path: &[String]) -> bool {
    lookup(value, path).is_some()
}

/// Removes the field at `path`, and the maps above it that it leaves empty
/// unless `applied` still sets them.
fn remove_path(target: &mut Value, path: &[String], applied: &Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    if let Some(Value::Object(parent)) = parents
        .iter()
        .try_fold(&mut *target, |v, key| v.as_object_mut()?.get_mut(key))
    {
        parent.remove(last);
    }
    for depth in (1..parents.len() + 1).rev() {
        let prefix = &path[..depth];
        let empty =
            lookup(target, prefix).is_some_and(|v| v.as_object().is_some_and(Map::is_empty));
        if empty && !has_path(applied, prefix) {
            remove_path(target, prefix, applied);
        } else {
            break;
        }
    }
}

/// The fields that `applied` sets to a value another manager set differently,
/// with that manager.
fn conflicts(applied: &Value, others: &[(String, Value)]) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for path in leaves(applied) {
        let value = lookup(applied, &path);
        for (manager, other) in others {
            if let Some(theirs) = lookup(other, &path)
                && Some(theirs) != value
            {
                found.push((manager.clone(), path.clone()));
            }
        }
    }
    found
}

/// Sets the field at `path`, making the maps above it.
fn set_path(target: &mut Value, path: &[String], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        *target = value;
        return;
    };
    let mut at = target;
    for key in parents {
        if !at.is_object() {
            *at = json!({});
        }
        at = at
            .as_object_mut()
            .expect("made an object")
            .entry(key.clone())
            .or_insert_with(|| json!({}));
    }
    if !at.is_object() {
        *at = json!({});
    }
    at.as_object_mut()
        .expect("made an object")
        .insert(last.clone(), value);
}

/// Owned fields as FieldsV1: `{"f:spec": {"f:replicas": {}}}`.
fn fields_v1(owned: &Value) -> Value {
    let mut out = json!({});
    for path in leaves(owned) {
        let path: Vec<String> = path.iter().map(|k| format!("f:{k}")).collect();
        set_path(&mut out, &path, json!({}));
    }
    out
}

/// The defaults the API server fills in a Deployment that the tests and
/// the operator rely on: one replica when `spec.replicas` is missing.
fn default_deployment(deployment: &mut Value) {
    if let Some(spec) = deployment.get_mut("spec").and_then(Value::as_object_mut)
        && !spec.contains_key("replicas")
    {
        spec.insert("replicas".into(), json!(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hpa::replica_owners;

    fn configmaps(store: &Store) -> ResourceType {
        store.resource("", "v1", "configmaps").unwrap()
    }

    fn apply(store: &mut Store, manager: &str, data: Value, force: bool) -> Result<Value> {
        let rt = configmaps(store);
        store.patch(
            &rt,
            "default",
            "cm",
            PatchKind::Apply {
                manager: manager.into(),
                force,
            },
            json!({"metadata": {"name": "cm"}, "data": data}),
            false,
        )
    }

    fn deployments(store: &Store) -> ResourceType {
        store.resource("apps", "v1", "deployments").unwrap()
    }

    fn apply_deployment(store: &mut Store, manager: &str, spec: Value) -> Value {
        let rt = deployments(store);
        store
            .patch(
                &rt,
                "default",
                "web",
                PatchKind::Apply {
                    manager: manager.into(),
                    force: true,
                },
                json!({"metadata": {"name": "web"}, "spec": spec}),
                false,
            )
            .unwrap()
    }

    #[test]
    fn a_field_dropped_by_its_only_applier_is_removed_then_defaulted() {
        let mut store = Store::default();
        let first = apply_deployment(&mut store, "op", json!({"replicas": 3, "paused": false}));
        assert_eq!(first["spec"]["replicas"], 3);
        assert_eq!(replica_owners(&first), ["op Apply"]);
        let second = apply_deployment(&mut store, "op", json!({"paused": false}));
        assert_eq!(second["spec"]["replicas"], 1, "removed, then defaulted");
        assert!(replica_owners(&second).is_empty());
    }

    #[test]
    fn a_field_another_manager_also_owns_survives_its_drop() {
        let mut store = Store::default();
        apply_deployment(&mut store, "op", json!({"replicas": 3, "paused": false}));
        let shared = apply_deployment(&mut store, "handover", json!({"replicas": 3}));
        assert_eq!(replica_owners(&shared), ["handover Apply", "op Apply"]);
        let dropped = apply_deployment(&mut store, "op", json!({"paused": false}));
        assert_eq!(dropped["spec"]["replicas"], 3);
        assert_eq!(replica_owners(&dropped), ["handover Apply"]);
    }

    #[test]
    fn an_update_takes_the_field_and_a_forced_apply_takes_it_back() {
        let mut store = Store::default();
        apply_deployment(&mut store, "op", json!({"replicas": 3, "paused": false}));
        let rt = deployments(&store);
        let scaled = store
            .update(
                &rt,
                "default",
                "web",
                "hpa",
                json!({"spec": {"replicas": 4}}),
            )
            .unwrap();
        assert_eq!(scaled["spec"]["replicas"], 4);
        assert_eq!(replica_owners(&scaled), ["hpa Update"]);
        // Not the operator's any more: dropping it changes nothing.
        let dropped = apply_deployment(&mut store, "op", json!({"paused": false}));
        assert_eq!(dropped["spec"]["replicas"], 4);
        // Without force, applying it again conflicts with the HPA.
        let conflict = store
            .patch(
                &rt,
                "default",
                "web",
                PatchKind::Apply {
                    manager: "op".into(),
                    force: false,
                },
                json!({"metadata": {"name": "web"}, "spec": {"replicas": 2}}),
                false,
            )
            .unwrap_err();
        assert_eq!(conflict.code, 409);
        assert!(
            conflict.message.contains("\"hpa\": .spec.replicas"),
            "{}",
            conflict.message
        );
        let forced = apply_deployment(&mut store, "op", json!({"replicas": 2, "paused": false}));
        assert_eq!(forced["spec"]["replicas"], 2);
        assert_eq!(replica_owners(&forced), ["op Apply"]);
    }

    #[test]
    fn apply_replaces_the_managers_own_fields_and_keeps_others() {
        let mut store = Store::default();
        let first = apply(&mut store, "op", json!({"a": "1", "b": "2"}), true).unwrap();
        let rt = configmaps(&store);
        store
            .patch(
                &rt,
                "default",
                "cm",
                PatchKind::Merge,
                json!({"data": {"c": "3"}}),
                false,
            )
            .unwrap();
        let second = apply(&mut store, "op", json!({"a": "1"}), true).unwrap();
        assert_eq!(
            second["data"],
            json!({"a": "1", "c": "3"}),
            "b dropped, c kept"
        );
        assert_eq!(first["metadata"]["uid"], second["metadata"]["uid"]);

        // The same apply again changes nothing, not even the resourceVersion.
        let rv = store.resource_version();
        let third = apply(&mut store, "op", json!({"a": "1"}), true).unwrap();
        assert_eq!(third, second);
        assert_eq!(store.resource_version(), rv);
    }

    #[test]
    fn apply_without_force_conflicts_with_another_manager() {
        let mut store = Store::default();
        apply(&mut store, "op", json!({"a": "1"}), false).unwrap();
        let err = apply(&mut store, "other", json!({"a": "2"}), false).unwrap_err();
        assert_eq!(err.code, 409, "{err:?}");
        assert!(apply(&mut store, "other", json!({"a": "2"}), true).is_ok());
    }

    #[test]
    fn deleting_an_owner_deletes_what_it_owns() {
        let mut store = Store::default();
        let owner = apply(&mut store, "op", json!({}), true).unwrap();
        let secrets = store.resource("", "v1", "secrets").unwrap();
        let owned = json!({"metadata": {"name": "s", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "cm", "uid": owner["metadata"]["uid"]}]}});
        store.create(&secrets, "default", owned).unwrap();
        store
            .create(&secrets, "default", json!({"metadata": {"name": "free"}}))
            .unwrap();
        store
            .delete(&configmaps(&store), "default", "cm", false)
            .unwrap();
        assert_eq!(store.get(&secrets, "default", "s").unwrap_err().code, 404);
        assert!(store.get(&secrets, "default", "free").is_ok());
    }

    #[test]
    fn an_object_written_after_its_owner_went_is_collected() {
        let mut store = Store::default();
        let secrets = store.resource("", "v1", "secrets").unwrap();
        let late = json!({"metadata": {"name": "late", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "no-such-uid"}]}});
        store.create(&secrets, "default", late).unwrap();
        assert_eq!(
            store.get(&secrets, "default", "late").unwrap_err().code,
            404
        );
        let kinds: Vec<&str> = store.changes.iter().rev().take(2).map(|c| c.kind).collect();
        assert_eq!(kinds, ["DELETED", "ADDED"]);
    }

    #[test]
    fn finalizers_hold_the_object_until_removed() {
        let mut store = Store::default();
        let rt = configmaps(&store);
        store
            .create(
                &rt,
                "default",
                json!({"metadata": {"name": "f", "finalizers": ["x/y"]}}),
            )
            .unwrap();
        let marked = store.delete(&rt, "default", "f", false).unwrap();
        assert!(marked["metadata"]["deletionTimestamp"].is_string());
        store
            .patch(
                &rt,
                "default",
                "f",
                PatchKind::Merge,
                json!({"metadata": {"finalizers": null}}),
                false,
            )
            .unwrap();
        assert_eq!(store.get(&rt, "default", "f").unwrap_err().code, 404);
    }

    #[test]
    fn string_data_of_a_secret_becomes_data() {
        let mut store = Store::default();
        let rt = store.resource("", "v1", "secrets").unwrap();
        let created = store
            .create(&rt, "default", json!({"metadata": {"name": "s"}, "data": {"a": "eA=="}, "stringData": {"b": "key"}}))
            .unwrap();
        assert_eq!(created["data"], json!({"a": "eA==", "b": "a2V5"}));
        assert!(created.get("stringData").is_none());
    }

    #[test]
    fn replace_checks_the_resource_version() {
        let mut store = Store::default();
        let rt = configmaps(&store);
        let created = store
            .create(&rt, "default", json!({"metadata": {"name": "l"}}))
            .unwrap();
        let mut stale = created.clone();
        stale["metadata"]["resourceVersion"] = json!("1");
        assert_eq!(
            store
                .replace(&rt, "default", "l", stale, false)
                .unwrap_err()
                .code,
            409
        );
        let mut fresh = created;
        fresh["data"] = json!({"k": "v"});
        assert_eq!(
            store.replace(&rt, "default", "l", fresh, false).unwrap()["data"]["k"],
            "v"
        );
    }

    #[test]
    fn status_is_written_only_through_the_subresource() {
        let mut store = Store::default();
        let rt = store.resource("apps", "v1", "deployments").unwrap();
        let created = store
            .create(&rt, "default", json!({"metadata": {"name": "d"}, "spec": {"replicas": 1}, "status": {"readyReplicas": 9}}))
            .unwrap();
        assert!(created.get("status").is_none());
        assert_eq!(created["metadata"]["generation"], 1);
        let updated = store
            .patch(
                &rt,
                "default",
                "d",
                PatchKind::Merge,
                json!({"status": {"readyReplicas": 1}}),
                true,
            )
            .unwrap();
        assert_eq!(updated["status"]["readyReplicas"], 1);
        assert_eq!(
            updated["metadata"]["generation"], 1,
            "status does not count"
        );
        let updated = store
            .patch(
                &rt,
                "default",
                "d",
                PatchKind::Merge,
                json!({"spec": {"replicas": 2}, "status": null}),
                false,
            )
            .unwrap();
        assert_eq!(updated["metadata"]["generation"], 2);
        assert_eq!(
            updated["status"]["readyReplicas"], 1,
            "main resource ignores status"
        );
    }
}
