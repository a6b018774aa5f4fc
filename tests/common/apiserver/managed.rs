//! `metadata.managedFields` as kube-apiserver 1.36 keeps them (transcripts 01–04, 07, 13,
//! 17, 18, 20): one entry per manager, operation and subresource, each listing the fields
//! that manager set, in `FieldsV1`.
//!
//! A write compares the stored object with the new one, as structured-merge-diff does: the
//! writer takes what it added or changed (from whoever held it), and what it removed leaves
//! every entry. A field is a path of `f:name`, `k:{"key":value}` (an item of a list keyed by
//! fields), `v:value` (an item of a set); a map, list or list item that comes into being is
//! itself a member (`"."`). The schema is the few facts Services, Events, Namespaces and
//! Nodes need; any other list is atomic. Not modelled: apply conflicts (an apply is forced)
//! and an applier's fields it stops applying.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::rules::now;

/// A field: the path elements from the object's root.
type Field = Vec<String>;
type Fields = BTreeSet<Field>;

/// Who writes, and how: one managedFields entry per distinct writer.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Writer {
    pub manager: String,
    /// `Update` or `Apply`.
    pub operation: &'static str,
    /// `status` for writes to the status subresource.
    pub subresource: Option<&'static str>,
}

impl Writer {
    pub fn update(manager: &str) -> Writer {
        Writer {
            manager: manager.to_owned(),
            operation: "Update",
            subresource: None,
        }
    }

    pub fn status(manager: &str) -> Writer {
        Writer {
            subresource: Some("status"),
            ..Writer::update(manager)
        }
    }

    /// Server-side apply (`application/apply-patch+yaml`).
    pub fn apply(manager: &str) -> Writer {
        Writer {
            operation: "Apply",
            ..Writer::update(manager)
        }
    }

    /// The manager the API server names for a request: the `fieldManager` parameter, else the
    /// User-Agent up to its first `/`, printable characters only, at most 128 bytes.
    pub fn manager_of(field_manager: Option<&str>, user_agent: &str) -> String {
        if let Some(manager) = field_manager.filter(|m| !m.is_empty()) {
            return manager.to_owned();
        }
        let mut manager = String::new();
        for c in user_agent.split('/').next().unwrap_or_default().chars() {
            if c.is_control() {
                continue;
            }
            if manager.len() + c.len_utf8() > 128 {
                break;
            }
            manager.push(c);
        }
        manager
    }

    fn is(&self, entry: &Value) -> bool {
        entry["manager"].as_str().unwrap_or_default() == self.manager
            && entry["operation"] == self.operation
            && entry["subresource"].as_str() == self.subresource
    }
}

/// Records a write of `new` over `old` (`None`: a create, compared with the empty object of
/// its kind, `{}` where Go always serialises a struct) by `writer`, into
/// `new.metadata.managedFields`. `applied` is the configuration an apply sent.
pub(super) fn record(
    old: Option<&Value>,
    new: &mut Value,
    writer: &Writer,
    applied: Option<&Value>,
) {
    let empty = empty_of(new);
    let old = old.unwrap_or(&empty);
    let mut diff = Diff::default();
    compare(&mut Vec::new(), Some(old), Some(new), &mut diff);
    let taken: Fields = diff.added.union(&diff.modified).cloned().collect();
    let mut entries: Vec<Value> = old["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    // Every entry, the writer's own included, loses what this write took or removed.
    let mut mine = None;
    for (i, entry) in entries.iter_mut().enumerate() {
        let left: Fields = decode(&entry["fieldsV1"])
            .into_iter()
            .filter(|f| !taken.contains(f) && !diff.removed.contains(f))
            .collect();
        if writer.is(entry) {
            mine = Some((i, left.clone()));
        }
        entry["fieldsV1"] = encode(&left);
    }
    let changed = !taken.is_empty() || !diff.removed.is_empty();
    // An update owns what it set, beside what it held; an apply owns what it applied.
    let (fields, touched) = match applied {
        Some(config) => {
            let mut fields = Fields::new();
            members(&mut Vec::new(), config, &mut fields);
            (fields, changed || mine.is_none())
        }
        None => {
            let mut fields = mine.as_ref().map(|(_, f)| f.clone()).unwrap_or_default();
            fields.extend(taken.iter().cloned());
            (fields, !taken.is_empty())
        }
    };
    match mine {
        Some((i, _)) if touched => entries[i] = entry(writer, new, &fields),
        Some((i, _)) => entries[i]["fieldsV1"] = encode(&fields),
        None if touched => entries.push(entry(writer, new, &fields)),
        None => {}
    }
    entries.retain(|e| e["fieldsV1"].as_object().is_some_and(|f| !f.is_empty()));
    entries.sort_by_key(order_key);
    if let Some(meta) = new["metadata"].as_object_mut() {
        if entries.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(entries));
        }
    }
}

fn entry(writer: &Writer, object: &Value, fields: &Fields) -> Value {
    let mut entry = Map::new();
    // Go omits an empty manager (a request with neither fieldManager nor User-Agent).
    if !writer.manager.is_empty() {
        entry.insert("manager".into(), json!(writer.manager));
    }
    entry.insert("operation".into(), json!(writer.operation));
    entry.insert("apiVersion".into(), object["apiVersion"].clone());
    entry.insert("time".into(), json!(now()));
    entry.insert("fieldsType".into(), json!("FieldsV1"));
    entry.insert("fieldsV1".into(), encode(fields));
    if let Some(subresource) = writer.subresource {
        entry.insert("subresource".into(), json!(subresource));
    }
    Value::Object(entry)
}

/// The API server's order: appliers first, then by time, manager, apiVersion, subresource.
fn order_key(entry: &Value) -> [String; 5] {
    ["operation", "time", "manager", "apiVersion", "subresource"]
        .map(|k| entry[k].as_str().unwrap_or_default().to_owned())
}

/// What Go serialises for an object of `object`'s kind with nothing set.
fn empty_of(object: &Value) -> Value {
    match object["kind"].as_str() {
        Some("Service") => json!({"metadata": {}, "spec": {}, "status": {"loadBalancer": {}}}),
        Some("Event") => json!({"metadata": {}}),
        _ => json!({"metadata": {}, "spec": {}, "status": {}}),
    }
}

#[derive(Default)]
struct Diff {
    added: Fields,
    modified: Fields,
    removed: Fields,
}

/// How a value at a path is tracked.
enum Shape<'a> {
    /// Owned as one field: scalars, atomic maps and lists, empty ones.
    Leaf,
    /// Fields by name (a struct or a granular map).
    Fields,
    /// A list of items keyed by these fields.
    Keyed(&'a [&'a str]),
    /// A list of distinct scalars.
    Set,
}

/// Metadata the API server keeps itself and never attributes to a manager.
const SERVER_META: [&str; 10] = [
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
];

fn shape<'a>(path: &[String], value: &Value) -> Shape<'a> {
    let at = |p: &[&str]| path.len() == p.len() && path.iter().zip(p).all(|(a, b)| a == b);
    match value {
        Value::Array(items) if !items.is_empty() => {
            if at(&["f:metadata", "f:finalizers"]) {
                Shape::Set
            } else if at(&["f:spec", "f:ports"]) {
                Shape::Keyed(&["port", "protocol"])
            } else if at(&["f:status", "f:conditions"]) {
                Shape::Keyed(&["type"])
            } else if at(&["f:metadata", "f:ownerReferences"]) {
                Shape::Keyed(&["uid"])
            } else {
                Shape::Leaf
            }
        }
        Value::Object(map) if !map.is_empty() => {
            // A Service's selector and an Event's references are atomic.
            let atomic =
                at(&["f:spec", "f:selector"]) || at(&["f:regarding"]) || at(&["f:related"]);
            if atomic { Shape::Leaf } else { Shape::Fields }
        }
        _ => Shape::Leaf,
    }
}

/// The children of a value, by path element.
fn children<'v>(path: &[String], value: &'v Value) -> BTreeMap<String, &'v Value> {
    match (shape(path, value), value) {
        (Shape::Fields, Value::Object(map)) => map
            .iter()
            .filter(|(k, _)| {
                !(path.is_empty() && (*k == "apiVersion" || *k == "kind"))
                    && !(path == ["f:metadata"] && SERVER_META.contains(&k.as_str()))
            })
            .map(|(k, v)| (format!("f:{k}"), v))
            .collect(),
        (Shape::Keyed(keys), Value::Array(items)) => items
            .iter()
            .map(|item| {
                let key: Vec<String> = keys
                    .iter()
                    .filter(|k| !item[**k].is_null())
                    .map(|k| format!("{}:{}", json!(k), item[*k]))
                    .collect();
                (format!("k:{{{}}}", key.join(",")), item)
            })
            .collect(),
        (Shape::Set, Value::Array(items)) => items
            .iter()
            .map(|item| (format!("v:{item}"), item))
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn is_leaf(path: &[String], value: &Value) -> bool {
    matches!(shape(path, value), Shape::Leaf)
}

/// structured-merge-diff's compare: a leaf that appears, changes or goes; a map, list or
/// item that appears or goes is itself added or removed.
fn compare(path: &mut Field, old: Option<&Value>, new: Option<&Value>, diff: &mut Diff) {
    let leaf = old.is_none_or(|v| is_leaf(path, v)) && new.is_none_or(|v| is_leaf(path, v));
    if leaf {
        match (old, new) {
            (None, Some(_)) => diff.added.insert(path.clone()),
            (Some(_), None) => diff.removed.insert(path.clone()),
            (Some(a), Some(b)) if a != b => diff.modified.insert(path.clone()),
            _ => false,
        };
        return;
    }
    let before: BTreeMap<String, &Value> = old.map(|v| children(path, v)).unwrap_or_default();
    let after: BTreeMap<String, &Value> = new.map(|v| children(path, v)).unwrap_or_default();
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for name in names {
        path.push(name.clone());
        compare(
            path,
            before.get(name).copied(),
            after.get(name).copied(),
            diff,
        );
        path.pop();
    }
    if !path.is_empty() {
        match (old, new) {
            (None, Some(_)) => diff.added.insert(path.clone()),
            (Some(_), None) => diff.removed.insert(path.clone()),
            _ => false,
        };
    }
}

/// The fields an applied configuration sets: its leaves and list items.
fn members(path: &mut Field, value: &Value, set: &mut Fields) {
    if is_leaf(path, value) {
        set.insert(path.clone());
        return;
    }
    let items = matches!(shape(path, value), Shape::Keyed(_));
    for (name, child) in children(path, value) {
        path.push(name);
        members(path, child, set);
        if items {
            set.insert(path.clone());
        }
        path.pop();
    }
}

/// A set as `FieldsV1`: a tree of path elements, `"."` marking a member with members below.
fn encode(fields: &Fields) -> Value {
    let mut root = Map::new();
    for field in fields {
        let mut node = &mut root;
        for element in field {
            node = node
                .entry(element.clone())
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .unwrap();
        }
    }
    for field in fields {
        let mut node = &mut root;
        for element in field {
            node = node.get_mut(element).unwrap().as_object_mut().unwrap();
        }
        if !node.is_empty() {
            node.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

/// The set a `FieldsV1` tree holds.
fn decode(tree: &Value) -> Fields {
    fn walk(path: &mut Field, node: &Map<String, Value>, set: &mut Fields) {
        for (element, child) in node {
            if element == "." {
                set.insert(path.clone());
                continue;
            }
            path.push(element.clone());
            match child.as_object() {
                Some(grand) if !grand.is_empty() => walk(path, grand, set),
                _ => {
                    set.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut set = Fields::new();
    if let Some(root) = tree.as_object() {
        walk(&mut Vec::new(), root, &mut set);
    }
    set
}
